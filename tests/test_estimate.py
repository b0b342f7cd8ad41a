"""Knowing a cache's size before it is written: estimate, free-space refusal, default contents."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sherl_cache import open_cache
from sherl_cache.cli.app import app
from sherl_cache.errors import CacheError, CacheMismatchError
from sherl_cache.extraction import estimate as estimate_module
from sherl_cache.extraction import extract as extract_module
from sherl_cache.extraction.estimate import estimate_plan, stage_two_memory
from sherl_cache.extraction.extract import ExtractConfig, extract
from sherl_cache.extraction.plan import MAX_DEFAULT_LATE_LAYERS, plan_extraction, stored_layers
from sherl_cache.families import get_family


def config(tmp_path, model, glue_dir, **overrides) -> ExtractConfig:
    values = dict(
        model=str(model),
        task="mrpc",
        data_dir=glue_dir,
        cache_root=tmp_path / "cache",
        batch_size=8,
        device="cpu",
    )
    return ExtractConfig(**(values | overrides))


@pytest.mark.real
def test_estimate_lands_within_ten_percent_of_the_real_size(tmp_path, minilm_path, real_glue_dir):
    """Real activations (MiniLM on 300 MRPC rows): the codec ratio the estimate assumes holds."""
    import shutil

    mrpc = tmp_path / "glue" / "MRPC"
    mrpc.mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv"):
        lines = (real_glue_dir / "MRPC" / name).read_text(encoding="utf-8-sig").splitlines()
        (mrpc / name).write_text("\n".join(lines[:301]) + "\n", encoding="utf-8")
    shutil.copy(real_glue_dir / "MRPC" / "test.tsv", mrpc / "test.tsv")
    cfg = config(tmp_path, minilm_path, tmp_path / "glue", batch_size=32)
    predicted = estimate_plan(plan_extraction(cfg))
    result = extract(cfg, progress=False)
    assert predicted.tokens == result.tokens
    assert abs(predicted.total_bytes - result.bytes_stored) <= 0.1 * result.bytes_stored


def test_estimate_counts_tokens_exactly_and_sizes_states(tmp_path, tiny_models, glue_dir):
    cfg = config(tmp_path, tiny_models["bert"], glue_dir, layers="0,2")
    predicted = estimate_plan(plan_extraction(cfg))
    result = extract(cfg, progress=False)
    cache = open_cache(result.path)
    assert predicted.path == result.path
    assert predicted.layers == cache.layers == [0, 2, 3]  # L-1 always
    assert predicted.bytes_per_state == cache.hidden_size * 2  # float16
    for split in cache.splits:
        assert predicted.splits[split].tokens == cache.num_tokens(split)
        assert predicted.splits[split].rows == cache.num_examples(split)
    hidden_raw = sum(
        array.nbytes
        for split in cache.splits
        for name, array in cache.arrays(split)
        if name.startswith("hidden_")
    )
    assert predicted.tokens * predicted.bytes_per_state * 3 == hidden_raw
    # Rerunning a complete cache writes nothing: nothing is still needed.
    again = estimate_plan(plan_extraction(cfg))
    assert again.existing_bytes > 0 and again.needed_bytes < predicted.total_bytes


def test_extract_refuses_before_any_forward_pass_when_the_disk_is_too_small(
    tmp_path, tiny_models, glue_dir, monkeypatch
):
    cfg = config(tmp_path, tiny_models["bert"], glue_dir)

    def no_model(*args, **kwargs):
        raise AssertionError("the backbone was loaded although the disk cannot hold the cache")

    monkeypatch.setattr(estimate_module, "free_space", lambda path: 1000)
    monkeypatch.setattr(extract_module, "load_extraction_model", no_model)
    lines: list[str] = []
    with pytest.raises(CacheError, match="only 1000 B is free.*--ignore-free-space"):
        extract(cfg, report=lines.append, progress=True)
    assert any("on disk" in line for line in lines)  # the figures came first
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").glob("mrpc-*/"))
    monkeypatch.undo()
    monkeypatch.setattr(estimate_module, "free_space", lambda path: 1000)
    result = extract(
        config(tmp_path, tiny_models["bert"], glue_dir, ignore_free_space=True), progress=False
    )
    assert open_cache(result.path).complete


def test_estimate_command_prints_json_for_scripts(tmp_path, tiny_models, glue_dir):
    args = ["estimate", "--model", str(tiny_models["bert"]), "--task", "mrpc", "--data-dir"]
    args += [str(glue_dir), "--cache-root", str(tmp_path / "c"), "--json", "--late-layers", "2"]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    figures = json.loads(out.stdout)
    assert figures["total_bytes"] > 0 and figures["free_bytes"] > 0
    assert set(figures["splits"]) == {"train", "validation"}  # labelled splits by default
    assert figures["stage_two"]["late_layers"] == 2
    assert not (tmp_path / "c").exists()  # an estimate writes nothing
    bad = CliRunner().invoke(app, [*args[:-2], "--late-mode", "nope"])
    assert bad.exit_code == 2 and "--late-mode" in bad.output


def test_stage_two_estimate_grows_with_batch_and_trainable_layers(tmp_path, tiny_models, glue_dir):
    plan = plan_extraction(config(tmp_path, tiny_models["bert"], glue_dir))
    frozen = stage_two_memory(plan, late_layers=1, late_mode="frozen", batch_size=8)
    assert stage_two_memory(plan, late_layers=1, batch_size=64)["peak_bytes"] > frozen["peak_bytes"]
    full = stage_two_memory(plan, late_layers=1, late_mode="full", batch_size=8)
    lora = stage_two_memory(plan, late_layers=1, late_mode="lora", batch_size=8)
    assert full["optimiser_bytes"] > lora["optimiser_bytes"] > frozen["optimiser_bytes"]
    assert stage_two_memory(plan, late_layers=2)["parameters_bytes"] > frozen["parameters_bytes"]


@pytest.mark.parametrize("num_layers", [4, 6, 12, 24])
def test_default_layers_store_exactly_what_default_taps_read(num_layers):
    family = get_family("bert")
    stored = set(stored_layers("default", family, num_layers))
    read: set[int] = set()
    for k in range(1, MAX_DEFAULT_LATE_LAYERS + 1):
        read |= {*family.default_taps(num_layers, k), num_layers - k}
    assert stored == read | {num_layers - 1}
    assert stored_layers("all", family, num_layers) == tuple(range(num_layers + 1))
    if num_layers == 24:  # deep models: about half the states
        assert len(stored) == 14


def test_default_cache_holds_labelled_splits_and_what_default_train_reads(
    tmp_path, tiny_models, glue_dir
):
    from sherl_cache.data.tasks import get_task
    from sherl_cache.training.taps import check_stored, resolve_taps

    result = extract(config(tmp_path, tiny_models["bert"], glue_dir), progress=False)
    cache = open_cache(result.path)
    assert cache.splits == ["train", "validation"]
    assert cache.layers == [0, 1, 2, 3]  # 4 layers: all but the final output
    for k in range(1, MAX_DEFAULT_LATE_LAYERS + 1):
        check_stored(cache, resolve_taps("default", cache, k), 4 - k, get_task("mrpc"))
    with pytest.raises(
        CacheMismatchError, match=r"extend it .*--cache-root \S+ --layers 0,1,2,3,4 \(new states"
    ):
        check_stored(cache, (0, 4), 4, get_task("mrpc"))
    test_only = extract(
        config(tmp_path, tiny_models["bert"], glue_dir, splits=("test",)), progress=False
    )
    assert open_cache(test_only.path).splits == ["test"]
