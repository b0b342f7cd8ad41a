"""End-to-end runs of the console script: files produced, one-line errors, exit codes."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sherl_cache import open_cache
from sherl_cache.config.extract import ExtractConfig
from sherl_cache.config.predict import PredictConfig
from sherl_cache.config.settings import choices_of, default_of, field_types, flag_of
from sherl_cache.config.train import TrainConfig


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
    per_token = next(line for line in info.stdout.splitlines() if line.startswith("per token"))
    assert "states x 32" in per_token  # the tiny T5's hidden size
    manifest = json.loads(cli("info", path, "--json").stdout)["manifest"]
    assert manifest["model"]["family"] == "t5"

    out = tmp_path / "run"
    trained = cli(
        "train", "--cache", path, "--out", str(out), "--epochs", "2", "--batch-size", "8", "--quiet"
    )
    assert trained.stdout.strip().splitlines()[-1] == str(out)
    assert "held-out validation" in trained.stderr and "trainable" in trained.stderr
    assert {p.name for p in out.iterdir()} >= {
        "sherl_config.json",
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
    assert json.loads((tmp_path / "run2" / "sherl_config.json").read_text())["cache"] == path
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


def click_command(name: str):
    import typer.main

    from sherl_cache.cli import app

    return typer.main.get_command(app).commands[name]


@pytest.mark.parametrize(
    ("command", "cls", "not_derived"),
    [
        ("extract", ExtractConfig, ()),
        ("train", TrainConfig, ("cache", "out")),  # found and named by the CLI when left out
        ("predict", PredictConfig, ()),
        ("evaluate", PredictConfig, ()),
    ],
)
def test_options_are_the_settings_fields(command, cls, not_derived):
    options = {p.opts[0]: p for p in click_command(command).params}
    for f in dataclasses.fields(cls):
        option = options[flag_of(f)]
        assert option.help == f.metadata["help"]
        if f.name in not_derived:
            assert option.default is None
        elif f.default is dataclasses.MISSING:
            assert option.required
        else:
            assert option.default == default_of(cls, f.name), f.name
        choices = choices_of(field_types(cls)[f.name])
        if choices:
            assert option.metavar == "<" + "|".join(choices) + ">"


def test_every_option_has_help_and_choices_are_listed():
    import typer.main
    from typer.testing import CliRunner

    from sherl_cache.cli import app

    for name, command in typer.main.get_command(app).commands.items():
        for param in command.params:
            assert param.help, f"{name} {param.name}"
    shown = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output
    for choices in ("<frozen|full|lora>", "<linear|gated>", "<mean|first|last>", "<auto|cpu|cuda>"):
        assert choices in shown


def test_verify_device_default_is_the_library_default():
    from sherl_cache.store.verify import verify_cache

    (device,) = [p for p in click_command("verify").params if p.name == "device"]
    assert device.default == inspect.signature(verify_cache).parameters["device"].default


def test_bad_choice_is_one_line_naming_the_flag(tmp_path):
    result = cli(
        "train", "--cache", "c", "--out", str(tmp_path / "r"), "--late-mode", "half", check=False
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown --late-mode 'half': choose frozen, full, lora"
