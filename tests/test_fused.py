"""Fused trials: each trial of a fused group equals the same trial run alone by ``fit``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sherl_cache.config.train import TrainConfig
from sherl_cache.errors import ConfigError
from sherl_cache.store.cache import open_cache
from sherl_cache.training.discovery import late_weights_path, task_of
from sherl_cache.training.features import CachedFeatures
from sherl_cache.training.fused import Member, fit_fused, groups
from sherl_cache.training.loop import FitResult, fit
from sherl_cache.training.model import build_model
from sherl_cache.training.taps import resolve_taps

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(bert_cache):
    cache = open_cache(bert_cache)
    task = task_of(cache, None)
    taps = resolve_taps("default", cache, 1)
    split = cache.num_layers - 1
    sources = {name: CachedFeatures(cache, name, taps, split) for name in ("train", "validation")}
    return cache, task, taps, sources


def configs(cache: str, *, dropout: float, batching: str = "random", seed: int = 0):
    base = TrainConfig(
        cache=cache,
        out=Path("unused"),
        epochs=3,
        batch_size=6,
        device="cpu",
        seed=seed,
        batching=batching,
        fusion_dropout=dropout,
        head_dropout=dropout,
    )
    return [
        base,
        replace(base, lr=1e-2, reduction=4),
        replace(base, lr=3e-4, warmup_ratio=0.0, lr_scheduler="cosine", max_grad_norm=0.5),
        replace(base, late_mode="lora", epochs=2),
        replace(base, fusion_init="residual", weight_decay=0.1),
    ]


def lone(setup, config: TrainConfig) -> FitResult:
    cache, task, taps, sources = setup
    model = build_model(config, cache, task, taps, late_weights_path(cache, None))
    return fit(model, sources["train"], sources["validation"], task, config, CPU, progress=False)


def fused(setup, group: list[TrainConfig]) -> list[FitResult]:
    cache, task, taps, sources = setup
    path = late_weights_path(cache, None)
    members = [Member(build_model(c, cache, task, taps, path), c) for c in group]
    results = fit_fused(members, sources["train"], sources["validation"], task, CPU)
    assert all(isinstance(r, FitResult) for r in results)
    return results  # type: ignore[return-value]


def assert_same(a: FitResult, b: FitResult) -> None:
    assert [e.to_dict() for e in a.epochs] == [e.to_dict() for e in b.epochs]
    assert a.step_losses == b.step_losses
    assert a.best is not None and b.best is not None and a.best.epoch == b.best.epoch
    assert a.best_state is not None and b.best_state is not None
    assert a.best_state.keys() == b.best_state.keys()
    for name in a.best_state:
        assert torch.equal(a.best_state[name], b.best_state[name]), name


@pytest.mark.parametrize(
    ("dropout", "batching"), [(0.0, "random"), (0.1, "random"), (0.1, "bucketed")]
)
def test_fused_trials_equal_lone_runs(bert_cache, setup, dropout, batching):
    """Same batches, own optimiser, schedule and RNG stream: bitwise what fit gives alone,
    dropout off or on (the late route's own dropout included)."""
    group = configs(bert_cache, dropout=dropout, batching=batching)
    together = fused(setup, group)
    for config, result in zip(group, together, strict=True):
        assert_same(result, lone(setup, config))
    # the trials really differ, so equality above is not one trial compared with itself
    assert len({r.step_losses[-1] for r in together}) == len(group)


def test_grad_accumulation_and_a_windowed_split(bert_cache, setup):
    """Accumulated steps and a split read in windows (block shuffle) fuse the same way."""
    cache, task, taps, sources = setup
    hidden = open_cache(bert_cache).hidden_size
    windowed = CachedFeatures(
        open_cache(bert_cache), "train", taps, cache.num_layers - 1, memory_budget=hidden * 4 * 60
    )
    assert len(windowed.windows) > 1
    group = [replace(c, grad_accum=2) for c in configs(bert_cache, dropout=0.1)[:3]]
    windowed_setup = (cache, task, taps, {**sources, "train": windowed})
    for config, result in zip(group, fused(windowed_setup, group), strict=True):
        assert_same(result, lone(windowed_setup, config))


def test_fused_run_repeats_exactly(bert_cache, setup):
    group = configs(bert_cache, dropout=0.1, batching="bucketed")
    for a, b in zip(fused(setup, group), fused(setup, group), strict=True):
        assert_same(a, b)


def test_early_stopping_leaves_the_others_running(bert_cache, setup):
    group = [replace(c, epochs=4) for c in configs(bert_cache, dropout=0.1)[:2]]
    group[0] = replace(group[0], early_stopping=1, lr=1e-6)
    together = fused(setup, group)
    for config, result in zip(group, together, strict=True):
        assert_same(result, lone(setup, config))
        assert result.stopped_early == lone(setup, config).stopped_early


def test_only_trials_reading_the_same_batches_are_grouped(bert_cache):
    group = configs(bert_cache, dropout=0.1)
    other_seed = replace(group[0], seed=1)
    other_batch = replace(group[0], batch_size=4)
    n = len(group)
    assert groups([*group, other_seed, other_batch]) == [list(range(n)), [n], [n + 1]]


def test_unfusable_trials_are_refused(bert_cache, setup):
    cache, task, taps, sources = setup
    a, b = configs(bert_cache, dropout=0.1)[0], replace(configs(bert_cache, dropout=0.1)[0], seed=1)
    path = late_weights_path(cache, None)
    members = [Member(build_model(c, cache, task, taps, path), c) for c in (a, b)]
    with pytest.raises(ConfigError, match="same batches"):
        fit_fused(members, sources["train"], sources["validation"], task, CPU)
