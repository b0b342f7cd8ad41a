"""Held-out scores: the epoch is chosen on examples that are never reported, seeded apart from
the trial's seed; and the routes the frontier study needs (a probe, a late learning rate)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sherl_cache.config.train import SelectOn, TrainConfig
from sherl_cache.errors import CacheMismatchError, ConfigError
from sherl_cache.store.cache import open_cache
from sherl_cache.training.discovery import task_of
from sherl_cache.training.features import CachedFeatures
from sherl_cache.training.loop import param_groups, warmup_steps
from sherl_cache.training.model import build_model
from sherl_cache.training.recipe import train
from sherl_cache.training.selection import Subset, plan_selection, result_line


def plan(spec: str, n_train: int = 3000, n_eval: int = 408, seed: int = 42):
    return plan_selection(SelectOn.parse(spec), "train", n_train, "validation", n_eval, seed)


def test_auto_follows_the_reference_split_by_task_size():
    small, large = plan("auto", n_train=3668), plan("auto", n_train=50_000)
    assert small.protocol == "validation:0.5"
    assert (small.select.count, small.report.count, small.train.count) == (204, 204, 3668)
    assert large.protocol == "train:1000"
    assert (large.select.split, large.select.count) == ("train", 1000)
    assert (large.report.split, large.report.indices) == ("validation", None)
    assert large.train.count == 49_000


@pytest.mark.parametrize("spec", ["validation:0.3", "train:200"])
def test_selection_and_report_sets_are_disjoint_and_seeded(spec):
    first, again, other = plan(spec), plan(spec), plan(spec, seed=7)
    if spec.startswith("validation"):
        chosen, reported = set(first.select.indices), set(first.report.indices)
        assert chosen.isdisjoint(reported) and chosen | reported == set(range(408))
        assert len(chosen) == int(408 * 0.3)
    else:
        chosen, trained = set(first.select.indices), set(first.train.indices)
        assert chosen.isdisjoint(trained) and chosen | trained == set(range(3000))
        assert first.report.indices is None  # the whole validation split is reported
    np.testing.assert_array_equal(first.select.indices, again.select.indices)
    assert not np.array_equal(first.select.indices, other.select.indices)


def test_same_is_labelled_biased():
    same = plan("same")
    assert same.biased and same.describe()["biased"]
    assert same.select == same.report


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("validation:1.5", "--select-on must be"),
        ("train:0", "--select-on must be"),
        ("half", "--select-on must be"),
    ],
)
def test_bad_select_on_names_the_flag(tmp_path, spec, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(cache="c", out=tmp_path, select_on=spec)


def test_holding_out_every_training_example_is_refused():
    with pytest.raises(ConfigError, match="holds out every training example"):
        plan("train:3000")
    with pytest.raises(ConfigError, match="no examples to choose or to report on"):
        plan("validation:0.1", n_eval=5)


class Windowed:
    """A source whose epoch order visits two blocks in turn."""

    labels = np.arange(10)

    def __len__(self):
        return 10

    def order(self, generator):
        return np.array([5, 6, 7, 8, 9, 0, 1, 2, 3, 4])


def test_subset_keeps_the_sources_block_order_and_visits_each_once():
    subset = Subset(Windowed(), np.array([1, 3, 6, 8]))
    order = subset.order(torch.Generator())
    np.testing.assert_array_equal(subset.indices[order], [6, 8, 1, 3])
    np.testing.assert_array_equal(subset.labels, [1, 3, 6, 8])


def run(cache: str, tmp_path, **overrides) -> dict:
    values = dict(cache=cache, out=tmp_path / "run", epochs=2, batch_size=16, device="cpu")
    result = train(TrainConfig(**(values | overrides)), progress=False)
    return json.loads((result.out / "metrics.json").read_text())


def test_default_run_reports_the_half_it_did_not_choose_on(bert_cache, tmp_path):
    cache = open_cache(bert_cache)
    n_eval = cache.num_examples("validation")
    metrics = run(bert_cache, tmp_path)
    assert metrics["protocol"] == "validation:0.5" and not metrics["biased"]
    chosen, shown = metrics["selected_on"], metrics["reported_on"]
    assert chosen["split"] == shown["split"] == "validation"
    assert chosen["examples"] + shown["examples"] == n_eval
    assert metrics["reported"]["epoch"] == metrics["best"]["epoch"]
    assert "accuracy" in metrics["reported"] and "accuracy" in metrics["best"]
    assert "held-out validation" in result_line(metrics)


def test_same_reports_the_chosen_epochs_own_figures(bert_cache, tmp_path):
    metrics = run(bert_cache, tmp_path, select_on="same")
    assert metrics["biased"]
    assert metrics["reported"] == {k: v for k, v in metrics["best"].items() if k != "loss"}
    assert "biased upward" in result_line(metrics)


def test_training_holdout_trains_on_fewer_examples(bert_cache, tmp_path):
    n_train = open_cache(bert_cache).num_examples("train")
    metrics = run(bert_cache, tmp_path, select_on="train:8")
    assert metrics["selected_on"] == {"split": "train", "examples": 8}
    assert metrics["reported_on"]["split"] == "validation"
    # Steps of one epoch count the examples left to train on.
    assert metrics["steps"] == 2 * -(-(n_train - 8) // 16)


def test_probe_without_late_layers_needs_and_reads_the_last_state(bert_cache, tmp_path):
    cache = open_cache(bert_cache)
    if cache.num_layers in cache.layers:
        metrics = run(bert_cache, tmp_path, late_layers=0)
        assert metrics["reported"]
    else:
        with pytest.raises(CacheMismatchError, match="--layers"):
            run(bert_cache, tmp_path, late_layers=0)


def test_probe_trains_on_a_cache_with_every_state(tmp_path, tiny_models, glue_dir):
    from sherl_cache.config.extract import ExtractConfig
    from sherl_cache.extraction.extract import extract

    path = extract(
        ExtractConfig(
            model=str(tiny_models["bert"]),
            task="mrpc",
            data_dir=glue_dir,
            cache_root=tmp_path / "caches",
            dtype="float32",
            device="cpu",
            layers="all",
        ),
        progress=False,
    ).path
    metrics = run(path, tmp_path, late_layers=0)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "run" / "trainable.safetensors")
    assert saved and not any(name.startswith("late.") for name in saved)
    assert metrics["reported"]["accuracy"] >= 0


def test_late_mode_needs_late_layers(tmp_path):
    with pytest.raises(ConfigError, match="--late-layers 0"):
        TrainConfig(cache="c", out=tmp_path, late_layers=0, late_mode="full")


def test_late_lr_applies_to_the_late_layers_only(bert_cache, tiny_models, tmp_path):
    config = TrainConfig(cache=bert_cache, out=tmp_path, late_mode="full", lr=1e-3, late_lr=1e-5)
    cache = open_cache(bert_cache)
    taps = [0, 1]
    model = build_model(config, cache, task_of(cache, None), taps, str(tiny_models["bert"]))
    early, late = param_groups(model, config)
    assert (early["lr"], late["lr"]) == (1e-3, 1e-5)
    late_ids = {id(p) for p in model.late.parameters()}
    assert all(id(p) in late_ids for p in late["params"])
    assert not any(id(p) in late_ids for p in early["params"])
    frozen = TrainConfig(cache=bert_cache, out=tmp_path, lr=1e-3, late_lr=1e-5)
    frozen_model = build_model(frozen, cache, task_of(cache, None), taps, str(tiny_models["bert"]))
    assert len(param_groups(frozen_model, frozen)) == 1  # nothing late trains


def test_warmup_steps_replace_the_ratio(tmp_path):
    assert warmup_steps(TrainConfig(cache="c", out=tmp_path, warmup_ratio=0.1), 200) == 20
    config = TrainConfig(cache="c", out=tmp_path, warmup_ratio=0.1, warmup_steps=500)
    assert warmup_steps(config, 200) == 500


def test_cached_features_subset_reads_the_same_rows(bert_cache):
    cache = open_cache(bert_cache)
    split = cache.num_layers - 1
    source = CachedFeatures(cache, "validation", [0], split)
    subset = Subset(source, np.array([2, 5]))
    whole = source.batch(np.array([5]), torch.device("cpu"))
    part = subset.batch(np.array([1]), torch.device("cpu"))
    torch.testing.assert_close(part.last, whole.last)
    assert part.labels.tolist() == whole.labels.tolist()


def test_subset_windows_follow_the_sources_in_subset_positions():
    class Source(Windowed):
        windows = [(0, 5), (5, 10)]

        def lengths(self):
            return np.arange(10) + 1

    subset = Subset(Source(), np.array([8, 1, 3, 6]))
    assert subset.windows == [(0, 2), (2, 4)]
    np.testing.assert_array_equal(subset.lengths(), [2, 4, 7, 9])
    assert Subset(Windowed(), np.array([1])).windows is None
