"""Command-line habits: --version, ``python -m sherl_cache``, completion, --quiet/--verbose on
every command, progress bars only on a terminal, SHERL_CACHE_ROOT, logging, and cheap syntax
checks before anything is loaded."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sherl_cache
from sherl_cache import logs


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sherl_cache", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1", SHERL_CACHE_DEBUG="") | (env or {}),
        timeout=600,
    )


def test_version_and_python_m():
    version = run("--version")
    assert (
        version.returncode == 0
        and version.stdout.strip() == f"sherl-cache {sherl_cache.__version__}"
    )
    shown = run("--help")
    assert shown.returncode == 0 and "extract" in shown.stdout and "--version" in shown.stdout
    assert "--install-completion" in shown.stdout and "--show-completion" in shown.stdout


def test_every_command_takes_quiet_and_verbose():
    import typer.main

    from sherl_cache.cli import app

    commands = typer.main.get_command(app).commands
    assert len(commands) >= 9
    for name, command in commands.items():
        flags = {opt for p in command.params for opt in p.opts}
        assert {"--quiet", "--verbose"} <= flags, name


def test_piped_extract_draws_no_progress_and_honours_cache_root(tmp_path, tiny_models, glue_dir):
    root = tmp_path / "from-env"
    result = run(
        "extract", "--model", str(tiny_models["bert"]), "--task", "mrpc",
        "--data-dir", str(glue_dir), "--dtype", "float32", "--device", "cpu",
        env={"SHERL_CACHE_ROOT": str(root)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "compression" in result.stderr
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path.parent == root and (path / "zarr.json").exists()
    # train finds it there too, with no --cache-root.
    found = run(
        "train", "--task", "mrpc", "--model", str(tiny_models["bert"]), "--epochs", "1",
        "--batch-size", "8", "--out", str(tmp_path / "run"), "--verbose",
        env={"SHERL_CACHE_ROOT": str(root)},
    )  # fmt: skip
    assert found.returncode == 0, found.stderr
    assert "\r" not in found.stderr and "step(s) of" in found.stderr  # a debug line


def test_progress_only_on_a_terminal_and_without_tqdm_disable(monkeypatch):
    class Terminal:
        def isatty(self):
            return True

        def write(self, text):
            pass

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert logs.progress_allowed() and not logs.bar_disabled(True) and logs.bar_disabled(False)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert not logs.progress_allowed()
    monkeypatch.delenv("TQDM_DISABLE")
    monkeypatch.setattr(sys, "stderr", open(os.devnull, "w"))  # noqa: SIM115
    assert not logs.progress_allowed()


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["extract", "--layers", "foo"], "--layers"),
        (["extract", "--layers", "every:0"], "--layers"),
        (["train", "--cache", "c", "--out", "o", "--tap", "1,x"], "--tap"),
    ],
)
def test_bad_layer_specs_fail_at_once_without_loading(args, flag, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import sherl_cache.extraction.plan as plan
    from sherl_cache.cli import app

    def refuse(*_args, **_kwargs):
        raise AssertionError("loaded data or a model before checking the layer spec")

    monkeypatch.setattr(plan, "plan_extraction", refuse)
    if args[0] == "extract":
        args = [*args, "--model", str(tmp_path / "no-model"), "--task", "mrpc"]
        args += ["--data-dir", str(tmp_path)]
    began = time.perf_counter()
    result = CliRunner().invoke(app, args)
    elapsed = time.perf_counter() - began
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: {flag} must be default, all, every:N or indices")
    assert elapsed < 1.0


def test_library_logs_under_its_package_logger(caplog):
    from sherl_cache.training import loop, recipe

    assert loop.log.name.startswith("sherl_cache.") and recipe.log.name.startswith("sherl_cache.")
    with caplog.at_level(logging.INFO, logger="sherl_cache"):
        recipe.log.info("hello")
    assert "hello" in caplog.text


def test_cli_log_levels(capsys):
    logs.configure(logs.level_of(quiet=True, verbose=False))
    log = logging.getLogger("sherl_cache.test")
    log.info("hidden")
    log.warning("shown")
    logs.configure(logs.level_of(quiet=False, verbose=True))
    log.debug("detail")
    assert capsys.readouterr().err.splitlines() == ["shown", "detail"]
    logs.configure()


def test_zarr_private_api_still_works(tmp_path):
    """Fails by name when a Zarr release moves what ``store.zarr_private`` relies on."""
    import numpy as np
    import zarr

    from sherl_cache.store.zarr_private import read_raw

    array = zarr.create_array(tmp_path / "a", shape=(4,), chunks=(2,), dtype="int32")
    array[:2] = np.arange(2, dtype="int32")
    assert read_raw(array, "c/0") == (tmp_path / "a" / "c" / "0").read_bytes()
    assert read_raw(array, "c/1") is None


def test_declared_dependencies_cover_what_the_library_imports():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    declared = " ".join(project["dependencies"])
    for package in ("google-crc32c", "huggingface-hub", "zarr>=3.1.6"):
        assert package in declared
    assert project["license"] == "Apache-2.0"
    assert any(d.startswith("datasets") for d in project["optional-dependencies"]["hub"])
