"""End-to-end runs of the console script: files produced, one-line errors, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sherl_cache import open_cache


def cli(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", SHERL_CACHE_DEBUG="")
    result = subprocess.run(
        [sys.executable, "-m", "sherl_cache.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def test_extract_info_train_end_to_end(tmp_path, tiny_models, glue_dir):
    extracted = cli(
        "extract",
        "--model",
        str(tiny_models["t5"]),
        "--task",
        "mrpc",
        "--data-dir",
        str(glue_dir),
        "--cache-root",
        str(tmp_path / "cache"),
        "--quiet",
    )
    path = extracted.stdout.strip().splitlines()[-1]
    assert Path(path).parent == tmp_path / "cache" and open_cache(path).complete
    assert "compression" in extracted.stderr

    info = cli("info", path)
    assert "bfloat16" in info.stdout and "always stored" in info.stdout and "train" in info.stdout
    manifest = json.loads(cli("info", path, "--json").stdout)["manifest"]
    assert manifest["model"]["family"] == "t5"

    out = tmp_path / "run"
    trained = cli(
        "train", "--cache", path, "--out", str(out), "--epochs", "2", "--batch-size", "8", "--quiet"
    )
    assert trained.stdout.strip().splitlines()[-1] == str(out)
    assert "best epoch" in trained.stderr and "trainable" in trained.stderr
    assert {p.name for p in out.iterdir()} >= {
        "config.json",
        "metrics.json",
        "trainable.safetensors",
    }

    found = cli(
        "train",
        "--task",
        "mrpc",
        "--model",
        str(tiny_models["t5"]),
        "--cache-root",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "run2"),
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--quiet",
    )
    assert json.loads((tmp_path / "run2" / "config.json").read_text())["cache"] == path
    assert found.returncode == 0


def test_extract_own_files(tmp_path, tiny_models):
    rows = "question,answer,label\n" + "".join(
        f'"what is {i}, really?",the answer is {i} .,{"yes" if i % 2 else "no"}\n'
        for i in range(12)
    )
    (tmp_path / "train.csv").write_text(rows)
    (tmp_path / "dev.csv").write_text(rows)
    result = cli(
        "extract",
        "--model",
        str(tiny_models["roberta"]),
        "--data",
        f"train={tmp_path / 'train.csv'},validation={tmp_path / 'dev.csv'}",
        "--text-columns",
        "question,answer",
        "--label-column",
        "label",
        "--cache-root",
        str(tmp_path / "cache"),
        "--quiet",
    )
    cache = open_cache(result.stdout.strip().splitlines()[-1])
    assert cache.splits == ["train", "validation"]
    assert cache.manifest["task"]["label_names"] == ["no", "yes"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["extract", "--model", "{bert}", "--task", "nope", "--data-dir", "{glue}"],
            "unknown task 'nope'",
        ),
        (
            ["extract", "--model", "{bert}", "--task", "mrpc", "--data-dir", "/nonexistent"],
            "/nonexistent",
        ),
        (
            [
                "extract",
                "--model",
                "{bert}",
                "--task",
                "mrpc",
                "--data-dir",
                "{glue}",
                "--layers",
                "0,99",
            ],
            "--layers",
        ),
        (
            ["extract", "--model", "/no/such/model", "--task", "mrpc", "--data-dir", "{glue}"],
            "/no/such/model",
        ),
        (
            [
                "extract",
                "--model",
                "{bert}",
                "--task",
                "mrpc",
                "--data-dir",
                "{glue}",
                "--dtype",
                "int4",
            ],
            "--dtype",
        ),
        (["info", "/no/such/cache"], "no cache"),
        (["train", "--cache", "/no/such/cache", "--out", "{tmp}/r"], "no cache"),
        (
            ["train", "--task", "mrpc", "--model", "{bert}", "--cache-root", "{tmp}/empty"],
            "sherl-cache extract",
        ),
    ],
)
def test_bad_input_is_one_line(tmp_path, tiny_models, glue_dir, args, message):
    filled = [a.format(bert=tiny_models["bert"], glue=glue_dir, tmp=tmp_path) for a in args]
    result = cli(*filled, check=False)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr


def test_debug_shows_traceback(tmp_path):
    result = cli("--debug", "info", str(tmp_path / "missing"), check=False)
    assert result.returncode != 0 and "Traceback" in result.stderr
