"""Using a trained run: on-the-fly predictions equal cached evaluation; files, CLI, errors."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import FAMILIES, build_tiny_model
from typer.testing import CliRunner

from sherl_cache import load_run, open_cache
from sherl_cache.cli import app
from sherl_cache.config.train import TrainConfig
from sherl_cache.data.files import load_glue
from sherl_cache.data.tasks import get_task
from sherl_cache.errors import CacheMismatchError, ConfigError, DataError, RunError
from sherl_cache.extraction.extract import ExtractConfig, extract
from sherl_cache.inference.evaluate import evaluate_run, write_submission
from sherl_cache.inference.predictions import Predictions, load_input, write_predictions
from sherl_cache.training.features import CachedFeatures
from sherl_cache.training.loop import evaluate
from sherl_cache.training.recipe import train

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def make_run(tmp_path_factory, tiny_models, glue_dir):
    """Train (once per module) a tiny MRPC run of a family, late mode and cache dtype."""
    root = tmp_path_factory.mktemp("predict")
    caches: dict[tuple[str, str], str] = {}
    runs: dict[tuple[str, str, str], Path] = {}

    def make(family: str, late_mode: str = "frozen", dtype: str = "float32") -> Path:
        if (family, dtype) not in caches:
            config = ExtractConfig(
                model=str(tiny_models[family]),
                task="mrpc",
                data_dir=glue_dir,
                cache_root=root / "caches",
                dtype=dtype,
                device="cpu",
            )
            caches[family, dtype] = extract(config, progress=False).path
        key = (family, late_mode, dtype)
        if key not in runs:
            config = TrainConfig(
                cache=caches[family, dtype],
                out=root / "-".join(key),
                late_layers=2,
                late_mode=late_mode,
                epochs=1,
                batch_size=8,
                select_on="same",  # "best" then holds the whole validation split's figures
                lr=1e-2,
                device="cpu",
            )
            runs[key] = train(config, progress=False).out
        return runs[key]

    return make


def cached_and_online(run_path: Path, glue_dir: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """Training's evaluation from the cache, and predictions computed from the text."""
    run = load_run(run_path, device="cpu")
    cache = open_cache(run.record.cache)
    source = CachedFeatures(cache, "validation", run.taps, run.split_index)
    cached, metrics = evaluate(run.model, source, run.task, CPU, 8)
    split = load_glue(run.task, glue_dir, ["validation"]).splits["validation"]
    online = run.predict_split(split, batch_size=4).outputs
    return cached, online, metrics


@pytest.mark.slow
@pytest.mark.parametrize("late_mode", ["frozen", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_predictions_equal_cached_evaluation(make_run, glue_dir, family, late_mode):
    """No cache needed: same outputs as training's evaluation, and the reloaded checkpoint
    scores what metrics.json recorded for the best epoch."""
    path = make_run(family, late_mode)
    cached, online, metrics = cached_and_online(path, glue_dir)
    torch.testing.assert_close(
        torch.from_numpy(online), torch.from_numpy(cached), atol=1e-5, rtol=1e-4
    )
    best = json.loads((path / "metrics.json").read_text())["best"]
    assert metrics == pytest.approx({name: best[name] for name in metrics})


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "late_mode", "dtype"), [("bert", "frozen", "float16"), ("t5", "lora", "bfloat16")]
)
def test_rounded_caches_match_within_their_dtype(make_run, glue_dir, family, late_mode, dtype):
    """States are rounded to the cache dtype on the fly too, so outputs differ only where float32
    noise moves a value across a rounding step: bounded by a few steps of that dtype."""
    cached, online, _ = cached_and_online(make_run(family, late_mode, dtype), glue_dir)
    step = torch.finfo(getattr(torch, dtype)).eps
    torch.testing.assert_close(
        torch.from_numpy(online), torch.from_numpy(cached), atol=4 * step, rtol=4 * step
    )
    # Rounding on the fly is what makes nearly every row float32-exact (unrounded bfloat16
    # states move outputs by ~1e-2 here).
    assert np.mean(np.abs(online - cached).max(axis=1) <= 1e-5) >= 0.9


def test_predict_api(make_run):
    run = load_run(make_run("bert"), device="cpu")
    found = run.predict([("The cat sat.", "A cat was sitting."), ("the company said", "")])
    assert [p.id for p in found] == ["0", "1"]
    for prediction in found:
        assert prediction.label in run.task.label_names
        assert set(prediction.scores) == set(run.task.label_names)
        assert sum(prediction.scores.values()) == pytest.approx(1.0)
        assert prediction.label == max(prediction.scores, key=prediction.scores.get)
    assert run.predict([]) == []
    with pytest.raises(DataError, match="takes 2 text"):
        run.predict(["only one text"])


def test_other_backbone_is_refused(make_run, tmp_path):
    other = build_tiny_model("bert", tmp_path / "other", seed=1)
    with pytest.raises(CacheMismatchError, match=r"backbone\.weights_sha256.*--model"):
        load_run(make_run("bert"), model=str(other))


@pytest.mark.parametrize(
    ("remove", "match"),
    [
        ("trainable.safetensors", "no checkpoint trainable.safetensors"),
        ("sherl_config.json", "no sherl_config.json"),
        ("metrics.json", "incomplete.*metrics.json"),
    ],
)
def test_incomplete_run_folders(make_run, tmp_path, remove, match):
    broken = tmp_path / "run"
    shutil.copytree(make_run("bert"), broken)
    (broken / remove).unlink()
    with pytest.raises(RunError, match=match):
        load_run(broken)


def test_checkpoint_of_another_configuration_is_refused(make_run, tmp_path):
    broken = tmp_path / "run"
    shutil.copytree(make_run("bert"), broken)
    shutil.copy(make_run("bert", "lora") / "trainable.safetensors", broken)
    with pytest.raises(RunError, match="does not fit.*unexpected"):
        load_run(broken)
    with pytest.raises(RunError, match="no run folder"):
        load_run(tmp_path / "nowhere")


def write_pairs(path: Path, columns=("id", "sentence1", "sentence2"), rows=3) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for i in range(rows):
            writer.writerow([f"p{i}", "the company said, today", f"shares rose {i} percent"])
    return path


def test_input_columns(make_run, tmp_path):
    task = get_task("mrpc")
    split = load_input(write_pairs(tmp_path / "pairs.csv"), task)  # hub spelling, own ids
    assert split.ids == ["p0", "p1", "p2"] and split.labels is None
    with pytest.raises(DataError, match=r"lacks the text column.*'#1 String'.*--text-columns"):
        load_input(write_pairs(tmp_path / "bad.csv", ("id", "a", "b")), task)
    split = load_input(tmp_path / "bad.csv", task, text_columns=("a", "b"))
    assert split.texts[1][0] == "shares rose 0 percent"


def test_prediction_files(make_run, tmp_path):
    run = load_run(make_run("bert"), device="cpu")
    predictions = run.predict_split(load_input(write_pairs(tmp_path / "pairs.csv"), run.task))
    write_predictions(predictions, tmp_path / "out.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["p0", "p1", "p2"]
    assert rows[0]["label"] in run.task.label_names and set(rows[0]["scores"]) == set(
        run.task.label_names
    )
    write_predictions(predictions, tmp_path / "out.csv")
    with (tmp_path / "out.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert table[0].keys() == {"id", "label", "score_not_equivalent", "score_equivalent"}
    assert float(table[0]["score_equivalent"]) == pytest.approx(rows[0]["scores"]["equivalent"])
    with pytest.raises(ConfigError, match="--output"):
        write_predictions(predictions, tmp_path / "out.txt")


def test_evaluate_from_cache_or_on_the_fly(make_run, glue_dir, tmp_path):
    run = load_run(make_run("t5"), device="cpu")
    from_cache = evaluate_run(run, "validation", data_dir=glue_dir, progress=False)
    assert from_cache.source.startswith("cache ")
    assert from_cache.written == run.path / "eval-validation.json"
    written = json.loads(from_cache.written.read_text())
    assert written["metrics"] == from_cache.metrics and written["examples"] == 10
    gone = dataclasses.replace(run.record.config, cache=str(tmp_path / "gone"))
    run.record = dataclasses.replace(run.record, config=gone)
    online = evaluate_run(
        run, "validation", data_dir=glue_dir, output=tmp_path / "e.json", progress=False
    )
    assert online.source == "computed on the fly"
    assert online.metrics == pytest.approx(from_cache.metrics)
    with pytest.raises(ConfigError, match="--data-dir"):
        evaluate_run(run, "validation")


def test_evaluate_input_file_matches_cache_by_fingerprint(make_run, glue_dir, tmp_path):
    """The same rows in another file (hub column names) still match the cache; other rows
    are computed on the fly."""
    run = load_run(make_run("bert"), device="cpu")
    dev = load_glue(run.task, glue_dir, ["validation"]).splits["validation"]

    def write(path: Path, first: str) -> Path:
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["sentence1", "sentence2", "label"])
            for i, (a, b) in enumerate(zip(*dev.texts, strict=True)):
                writer.writerow([first if i == 0 else a, b, int(dev.labels[i])])
        return path

    same = evaluate_run(run, "validation", input_file=write(tmp_path / "dev.csv", dev.texts[0][0]))
    assert same.source.startswith("cache ")
    changed = write(tmp_path / "changed.csv", "a different first sentence")
    other = evaluate_run(run, "validation", input_file=changed, progress=False)
    assert other.source == "computed on the fly" and other.examples == len(dev)
    with pytest.raises(ConfigError, match="not both"):
        evaluate_run(run, "validation", input_file=changed, data_dir=glue_dir)


def test_explicit_cache_must_match(make_run, glue_dir):
    run = load_run(make_run("bert"), device="cpu")
    other = load_run(make_run("bert", "frozen", "float16"), device="cpu").record.cache
    with pytest.raises(CacheMismatchError, match=r"--cache.*field dtype: cache has 'float16'"):
        evaluate_run(run, "validation", data_dir=glue_dir, cache=other)


def test_test_split_gives_glue_submission(make_run, glue_dir, tmp_path):
    run = load_run(make_run("bert"), device="cpu")
    result = evaluate_run(run, "test", data_dir=glue_dir, progress=False)
    assert result.written == run.path / "MRPC.tsv" and result.metrics == {}
    lines = result.written.read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 7
    assert [line.split("\t")[0] for line in lines[1:]] == [str(i) for i in range(6)]
    assert {line.split("\t")[1] for line in lines[1:]} <= {"0", "1"}


@pytest.mark.parametrize(
    ("task", "split", "name", "outputs", "values"),
    [
        ("rte", "test", "RTE", [[2.0, 1.0], [0.0, 1.0]], ["entailment", "not_entailment"]),
        ("wnli", "test", "WNLI", [[2.0, 1.0], [0.0, 1.0]], ["0", "1"]),
        (
            "mnli",
            "test_mismatched",
            "MNLI-mm",
            [[0, 0, 1.0], [1.0, 0, 0]],
            ["contradiction", "entailment"],
        ),
        ("stsb", "test", "STS-B", [3.14159, 0.5], ["3.142", "0.500"]),
    ],
)
def test_submission_formats(tmp_path, task, split, name, outputs, values):
    spec = get_task(task)
    predictions = Predictions(["0", "1"], np.asarray(outputs, dtype=np.float32), spec)
    written = write_submission(SimpleNamespace(task=spec, path=tmp_path), split, predictions, None)
    assert written.name == f"{name}.tsv"
    assert written.read_text() == "index\tprediction\n" + "".join(
        f"{i}\t{v}\n" for i, v in enumerate(values)
    )


def test_cli_predict_and_evaluate(make_run, glue_dir, tmp_path):
    run = make_run("roberta", "lora")
    pairs = write_pairs(tmp_path / "pairs.csv", rows=5)
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "predict",
            str(run),
            "--input",
            str(pairs),
            "--output",
            str(tmp_path / "p.jsonl"),
            "--device",
            "cpu",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 5
    result = runner.invoke(
        app, ["evaluate", str(run), "--data-dir", str(glue_dir), "--device", "cpu", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "eval-validation.json").read_text())["metrics"]
    assert f"accuracy {metrics['accuracy']:.4f}" in result.stdout


def test_cli_errors_are_one_line(make_run, tmp_path):
    broken = tmp_path / "run"
    shutil.copytree(make_run("bert"), broken)
    (broken / "trainable.safetensors").unlink()
    bad_input = write_pairs(tmp_path / "bad.csv", ("id", "a", "b"))
    other = build_tiny_model("bert", tmp_path / "other", seed=1)
    runner = CliRunner()
    cases = [
        ["predict", str(broken), "--input", str(bad_input), "--output", str(tmp_path / "p.jsonl")],
        [
            "predict",
            str(make_run("bert")),
            "--input",
            str(bad_input),
            "--output",
            str(tmp_path / "p.jsonl"),
        ],
        ["evaluate", str(make_run("bert")), "--model", str(other), "--split", "validation"],
    ]
    for args, match in zip(
        cases, ("no checkpoint", "lacks the text column", "weights_sha256"), strict=True
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_predictions_on_gpu_match_cpu(make_run, glue_dir):
    path = make_run("bert", "lora")
    split = load_glue(get_task("mrpc"), glue_dir, ["validation"]).splits["validation"]
    on_cpu = load_run(path, device="cpu").predict_split(split).outputs
    gpu_run = load_run(path, device="cuda")
    assert next(gpu_run.model.parameters()).is_cuda
    on_gpu = gpu_run.predict_split(split).outputs
    torch.testing.assert_close(
        torch.from_numpy(on_gpu), torch.from_numpy(on_cpu), atol=1e-3, rtol=1e-3
    )
