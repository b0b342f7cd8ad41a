"""Training habits of transformers' Trainer: accumulation, clipping, early stopping,
``get_scheduler`` schedules, bf16 autocast of the late route, ``--report-to``."""

from __future__ import annotations

import sys

import pytest
import torch

from sherl_cache.config.train import TrainConfig
from sherl_cache.errors import ConfigError
from sherl_cache.store.cache import open_cache
from sherl_cache.training.discovery import family_of_cache, late_weights_path, task_of
from sherl_cache.training.features import CachedFeatures
from sherl_cache.training.loop import fit, late_bf16
from sherl_cache.training.model import build_model, with_family_defaults
from sherl_cache.training.recipe import train
from sherl_cache.training.tracking import TensorBoard, check_tracker

TAPS = [0, 1, 2]


@pytest.fixture(scope="module")
def cache(bert_cache) -> str:
    return bert_cache


def fitted(
    cache_path, tiny_models, tmp_path, max_steps=None, evaluation=False, hook=None, **overrides
):
    values = dict(
        cache=cache_path,
        out=tmp_path / "run",
        late_layers=2,
        late_mode="full",
        fusion_dropout=0.0,
        head_dropout=0.0,
        warmup_ratio=0.0,
        lr=1e-2,
        epochs=1,
        batch_size=16,
    )
    config = TrainConfig(**(values | overrides))
    cache = open_cache(cache_path)
    task = task_of(cache, None)
    split = cache.num_layers - config.late_layers
    model = build_model(config, cache, task, TAPS, str(tiny_models["bert"]))
    for module in model.modules():  # the late layers' own dropout too
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if hook is not None:
        model.late.register_forward_hook(hook)
    source = CachedFeatures(cache, "train", TAPS, split)
    held_out = CachedFeatures(cache, "validation", TAPS, split) if evaluation else None
    device = torch.device("cuda" if config.device == "cuda" else "cpu")
    result = fit(model, source, held_out, task, config, device, max_steps=max_steps, progress=False)
    return model, result


def test_accumulating_two_batches_of_8_equals_one_batch_of_16(
    cache, tiny_models, tmp_path, monkeypatch
):
    # Compared where the optimiser sees them: Adam's first update is about lr * sign(grad), so
    # float noise in a near-zero gradient would hide the comparison in the weights.
    steps = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        steps.append([p.grad.clone() for group in self.param_groups for p in group["params"]])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    fitted(cache, tiny_models, tmp_path, max_steps=1, batch_size=16)
    _, result = fitted(cache, tiny_models, tmp_path, max_steps=1, batch_size=8, grad_accum=2)
    fitted(cache, tiny_models, tmp_path, max_steps=1, batch_size=8)
    assert len(steps) == 3 and len(result.step_losses) == 2  # two passes, one optimiser step
    big, accumulated, small = steps
    for a, b in zip(accumulated, big, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(small, big, strict=True))


def test_early_stopping_stops_after_patience(cache, tiny_models, tmp_path):
    # A learning rate too small to change any prediction: the metric never improves.
    _, result = fitted(
        cache, tiny_models, tmp_path, evaluation=True, lr=1e-12, epochs=6, early_stopping=2
    )
    assert result.stopped_early == 3 and len(result.epochs) == 3
    _, full = fitted(cache, tiny_models, tmp_path, evaluation=True, lr=1e-12, epochs=4)
    assert full.stopped_early is None and len(full.epochs) == 4


def test_clipping_uses_max_grad_norm(cache, tiny_models, tmp_path, monkeypatch):
    seen = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(
        torch.nn.utils, "clip_grad_norm_", lambda p, n, **k: seen.append(n) or real(p, n, **k)
    )
    fitted(cache, tiny_models, tmp_path, max_steps=2, batch_size=8, max_grad_norm=0.5)
    assert seen == [0.5, 0.5]
    seen.clear()
    fitted(cache, tiny_models, tmp_path, max_steps=2, batch_size=8)
    assert seen == []


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_scheduler_is_transformers_get_scheduler(cache, tiny_models, tmp_path, schedule):
    from transformers import get_scheduler

    class Lrs:
        def __init__(self):
            self.lrs = []

        def step(self, step, loss, lr):
            self.lrs.append(lr)

        def epoch(self, epoch, values):
            pass

        def close(self):
            pass

    config = TrainConfig(
        cache=cache,
        out=tmp_path / "r",
        late_layers=2,
        epochs=2,
        batch_size=8,
        lr_scheduler=schedule,
    )
    c = open_cache(cache)
    task = task_of(c, None)
    model = build_model(config, c, task, TAPS, str(tiny_models["bert"]))
    tracker = Lrs()
    source = CachedFeatures(c, "train", TAPS, c.num_layers - 2)
    fit(model, source, None, task, config, torch.device("cpu"), progress=False, tracker=tracker)
    total = len(tracker.lrs)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    name = {"constant": "constant_with_warmup"}.get(schedule, schedule)
    reference = get_scheduler(
        name, optimizer, num_warmup_steps=int(0.06 * total), num_training_steps=total
    )
    expected = []
    for _ in range(total):
        optimizer.step()
        reference.step()
        expected.append(reference.get_last_lr()[0])
    assert tracker.lrs == pytest.approx(expected)


def test_tensorboard_gets_step_losses_and_epoch_metrics(cache, tiny_models, tmp_path):
    class Writer:
        def __init__(self):
            self.scalars, self.closed = [], False

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, step))

        def close(self):
            self.closed = True

    writer = Writer()
    config = TrainConfig(cache=cache, out=tmp_path / "r", late_layers=2, epochs=2, batch_size=8)
    c = open_cache(cache)
    task = task_of(c, None)
    model = build_model(config, c, task, TAPS, str(tiny_models["bert"]))
    split = c.num_layers - 2
    tracker = TensorBoard(tmp_path / "tb", writer=writer)
    fit(
        model,
        CachedFeatures(c, "train", TAPS, split),
        CachedFeatures(c, "validation", TAPS, split),
        task,
        config,
        torch.device("cpu"),
        progress=False,
        tracker=tracker,
    )
    tags = {tag for tag, _ in writer.scalars}
    assert {"train/loss", "train/learning_rate", "eval/loss", "eval/accuracy", "eval/f1"} <= tags
    assert [s for t, s in writer.scalars if t == "eval/accuracy"] == [1, 2]


def test_report_to_tensorboard_without_the_package_names_the_flag(cache, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ConfigError, match=r"--report-to tensorboard.*sherl-cache\[tensorboard\]"):
        check_tracker("tensorboard")
    with pytest.raises(ConfigError, match="--report-to"):
        train(TrainConfig(cache=cache, out=tmp_path / "r", report_to="tensorboard"))
    assert not (tmp_path / "r").exists()  # refused before the run folder is made


def test_bad_training_settings_name_their_flag(tmp_path):
    with pytest.raises(ConfigError, match="--grad-accum must be positive, got 0"):
        TrainConfig(cache="c", out=tmp_path, grad_accum=0)
    with pytest.raises(ConfigError, match="unknown --scheduler 'step'"):
        TrainConfig(cache="c", out=tmp_path, lr_scheduler="step")
    with pytest.raises(ConfigError, match="--early-stopping must be positive"):
        TrainConfig(cache="c", out=tmp_path, early_stopping=0)
    with pytest.raises(ConfigError, match="--tap must be default, all"):
        TrainConfig(cache="c", out=tmp_path, tap="first")


def test_late_route_autocasts_bf16_on_cuda_or_when_asked():
    cpu = torch.device("cpu")
    assert not late_bf16("auto", cpu) and late_bf16("bf16", cpu)
    assert not late_bf16("float32", torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_late_route_runs_in_bf16_on_cuda(cache, tiny_models, tmp_path):
    seen = []
    hook = lambda module, args, output: seen.append(output.dtype)  # noqa: E731
    _, result = fitted(
        cache, tiny_models, tmp_path, max_steps=2, batch_size=8, device="cuda", hook=hook
    )
    assert seen and set(seen) == {torch.bfloat16}
    assert all(torch.isfinite(torch.tensor(result.step_losses)))
    seen.clear()
    fitted(
        cache,
        tiny_models,
        tmp_path,
        max_steps=1,
        batch_size=8,
        device="cuda",
        hook=hook,
        precision="float32",
    )
    assert set(seen) == {torch.float32}


@pytest.mark.parametrize(
    ("late_mode", "given", "expected"),
    [
        ("frozen", None, "reference"),
        ("lora", None, "residual"),
        ("full", None, "residual"),
        ("full", "reference", "reference"),
        ("frozen", "residual", "residual"),
    ],
)
def test_fusion_start_defaults_by_late_mode_and_is_recorded(
    bert_cache, tmp_path, late_mode, given, expected
):
    """Tuned late layers start from the pre-trained network unless told otherwise; the run
    records the start it took, and the built fusion has it (an open gate, a zero branch)."""
    config = TrainConfig(
        cache=bert_cache, out=tmp_path, late_mode=late_mode, fusion_init=given, device="cpu"
    )
    cache = open_cache(bert_cache)
    resolved = with_family_defaults(config, family_of_cache(cache))
    assert resolved.fusion_init == expected
    taps = list(range(cache.num_layers))
    model = build_model(config, cache, task_of(cache, None), taps, late_weights_path(cache, None))
    assert model.fusion.config.init == expected
    assert (model.fusion.gate_value().item() == 1.0) == (expected == "residual")
