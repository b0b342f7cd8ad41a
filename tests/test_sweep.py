"""Sweeps: trial specs, local and dask runs, failures, resume, results table, report, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from sherl_cache.cli import app
from sherl_cache.config.extract import ExtractConfig
from sherl_cache.config.train import TrainConfig
from sherl_cache.config.values import Range, parse_fixed, parse_grid, parse_range
from sherl_cache.errors import ConfigError, RunError
from sherl_cache.experiments.results import format_summary, read_results
from sherl_cache.experiments.sweep import SweepConfig, run_sweep, trial_id
from sherl_cache.extraction.extract import extract
from sherl_cache.training.recipe import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Compared between runs; times and memory legitimately differ.
METRIC_COLUMNS = ("trial", "status", "best_epoch", "best_loss", "accuracy", "f1")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on shared cores: one torch thread is many times faster than contended two."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_models, glue_dir) -> str:
    root = tmp_path_factory.mktemp("sweep-cache")
    config = ExtractConfig(
        model=str(tiny_models["bert"]),
        task="mrpc",
        data_dir=glue_dir,
        cache_root=root,
        dtype="float32",
        device="cpu",
        splits=("train", "validation"),
    )
    return extract(config, progress=False).path


def small(cache: str, out: Path, **changes) -> SweepConfig:
    values = dict(
        cache=cache,
        out=out,
        grid={"lr": [1e-2, 3e-2], "seed": [0, 1]},
        fixed={"epochs": 2, "batch_size": 8, "device": "cpu"},
    )
    return SweepConfig(**(values | changes))


def metric_rows(rows):
    return sorted(tuple(row.get(k) for k in METRIC_COLUMNS) for row in rows)


# --- specs -------------------------------------------------------------------------------------


def test_grid_values_take_the_field_types():
    grid = parse_grid(["lr=1e-3,3e-3", "seed=0,1,2", "tap=0,1;default", "late-mode=frozen,lora"])
    assert grid == {
        "lr": (0.001, 0.003),
        "seed": (0, 1, 2),
        "tap": ("0,1", "default"),
        "late_mode": ("frozen", "lora"),
    }
    assert parse_grid(["max_train_examples=none,8"]) == {"max_train_examples": (None, 8)}
    assert parse_fixed(["epochs=3", "device=cpu"]) == {"epochs": 3, "device": "cpu"}


@pytest.mark.parametrize(
    ("items", "match"),
    [
        (["lrr=1e-3"], r"unknown --grid key 'lrr'"),
        (["seed=0,x"], r"--grid seed='x': seed takes an integer"),
        (["lr=fast"], r"--grid lr='fast': lr takes a number"),
        (["late_mode=half"], r"--grid late_mode='half': choose one of frozen, full, lora"),
        (["lr="], r"--grid lr= lists no values"),
        (["lr"], r"--grid 'lr': expected key=value"),
        (["cache=a,b"], r"unknown --grid key 'cache'"),
        (["device=cpu"], r"unknown --grid key 'device'"),
    ],
)
def test_bad_grid_is_one_config_error(items, match):
    with pytest.raises(ConfigError, match=match):
        parse_grid(items)


def test_bad_sweeps_are_refused_before_running(tmp_path):
    with pytest.raises(ConfigError, match="empty sweep.*--grid"):
        SweepConfig(cache="c", out=tmp_path)
    with pytest.raises(ConfigError, match="--range needs --random"):
        SweepConfig(cache="c", out=tmp_path, ranges=(parse_range("lr=1e-4:1e-2:log"),))
    with pytest.raises(ConfigError, match="--workers N or --scheduler"):
        SweepConfig(cache="c", out=tmp_path, grid={"seed": [0]}, workers=2, scheduler="tcp://x:1")
    with pytest.raises(ConfigError, match="both swept.*and fixed"):
        SweepConfig(cache="c", out=tmp_path, grid={"lr": [0.1]}, fixed={"lr": 0.2})
    with pytest.raises(ConfigError, match="--range pool: not a numeric"):
        parse_range("pool=1:2")
    with pytest.raises(ConfigError, match="log range needs low > 0"):
        Range("lr", 0.0, 1.0, log=True)
    # values TrainConfig rejects fail while building the trial list, naming the flag
    with pytest.raises(ConfigError, match=r"trial lr=-1.0.*--lr must be a positive"):
        SweepConfig(cache="c", out=tmp_path, grid={"lr": [-1.0]}).trials()


def test_grid_expands_to_trials_with_readable_ids(tmp_path):
    config = SweepConfig(
        cache="c",
        out=tmp_path,
        grid=parse_grid(["lr=1e-3,1e-2", "reduction=4,8", "seed=0,1,2"]),
        fixed={"epochs": 3},
    )
    trials = config.trials()
    assert len(trials) == 12 and len({t.id for t in trials}) == 12
    assert trials[0].id == "lr=0.001_reduction=4_seed=0"
    assert trials[0].config.out == tmp_path.absolute() / "trials" / trials[0].id
    assert all(t.config.epochs == 3 for t in trials)
    assert trial_id({"tap": "every:2"}) == "tap=every-2"


def test_random_sampling_is_seeded_and_crosses_seeds(tmp_path):
    def sample(seed):
        return SweepConfig(
            cache="c",
            out=tmp_path,
            random=4,
            random_seed=seed,
            grid={"seed": [0, 1], "reduction": [4, 8]},
            ranges=(parse_range("lr=1e-4:1e-2:log"), parse_range("late_layers=1:2")),
        ).trials()

    first = sample(0)
    assert [t.id for t in first] == [t.id for t in sample(0)]
    assert [t.id for t in first] != [t.id for t in sample(1)]
    assert len(first) == 8  # every sampled point with each seed
    for t in first:
        assert 1e-4 <= t.values["lr"] <= 1e-2 and t.values["late_layers"] in (1, 2)
        assert t.values["reduction"] in (4, 8)
    assert {t.values["seed"] for t in first[:2]} == {0, 1}


# --- running -------------------------------------------------------------------------------------


def test_trial_equals_direct_train_and_failures_do_not_stop_the_sweep(tmp_path, cache):
    """One trial with a tap above the split fails at run time; the others still run, and a
    trial's metrics equal a direct ``train()`` with the same configuration."""
    config = small(cache, tmp_path / "sweep", grid={"tap": ["0,1", "0,4"], "seed": [0, 1]})
    result = run_sweep(config)
    rows = read_results(tmp_path / "sweep")
    assert len(rows) == 4 and rows == [dict(r) for r in pq.read_table(result.table).to_pylist()]
    by_id = {r["trial"]: r for r in rows}
    for seed in (0, 1):
        ok, bad = by_id[f"tap=0,1_seed={seed}"], by_id[f"tap=0,4_seed={seed}"]
        assert ok["status"] == "ok" and ok["error"] is None and ok["peak_memory_bytes"] >= 0
        assert ok["tap"] == "0,1" and ok["seed"] == seed and ok["seconds"] > 0
        assert bad["status"] == "failed" and "above the split" in bad["error"]
    direct = train(
        TrainConfig(
            cache=cache,
            out=tmp_path / "direct",
            tap="0,1",
            seed=1,
            epochs=2,
            batch_size=8,
            device="cpu",
        ),
        progress=False,
    ).metrics
    swept = json.loads(
        (tmp_path / "sweep" / "trials" / "tap=0,1_seed=1" / "metrics.json").read_text()
    )
    assert swept["best"] == direct["best"] and swept["epochs"] == direct["epochs"]
    assert {p.name for p in (tmp_path / "sweep" / "trials" / "tap=0,1_seed=1").iterdir()} == {
        "sherl_config.json",
        "trainable.safetensors",
        "metrics.json",
    }
    summary = format_summary(rows, result.swept, result.main_metric)
    assert "failed: 2 trial(s)" in summary and "mean ± std of accuracy over seeds" in summary
    assert "tap=0,1: " in summary and "(n=2)" in summary


# metrics.json keys that time or measure the run; everything else must match exactly
TIMING_KEYS = {"train_seconds", "step_seconds_median", "peak_memory_bytes", "fused_trials"}


@pytest.mark.parametrize("batching", ["random", "bucketed"])
def test_fused_sweep_equals_trials_run_alone(tmp_path, cache, batching):
    """Trials sharing batches train fused by default; every trial's folder holds what a lone
    run writes: same epochs, choice, report, weights and table row."""
    from safetensors.torch import load_file

    grid = {"lr": [1e-2, 3e-2], "reduction": [4, 8], "seed": [0, 1]}
    fixed = {"epochs": 2, "batch_size": 8, "device": "cpu", "batching": batching}
    fused = run_sweep(small(cache, tmp_path / "fused", grid=grid, fixed=fixed))
    alone = run_sweep(small(cache, tmp_path / "alone", grid=grid, fixed=fixed, fuse=False))
    assert metric_rows(fused.rows) == metric_rows(alone.rows)
    assert all(row["status"] == "ok" for row in fused.rows) and len(fused.rows) == 8
    for trial in (tmp_path / "alone" / "trials").iterdir():
        other = tmp_path / "fused" / "trials" / trial.name
        a, b = (json.loads((t / "metrics.json").read_text()) for t in (trial, other))
        assert b["fused_trials"] == 4 and "fused_trials" not in a
        assert {k: v for k, v in a.items() if k not in TIMING_KEYS} == {
            k: v for k, v in b.items() if k not in TIMING_KEYS
        }
        wa, wb = (load_file(t / "trainable.safetensors") for t in (trial, other))
        assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)
        ca, cb = (json.loads((t / "sherl_config.json").read_text()) for t in (trial, other))
        assert ca == cb | {"out": ca["out"]}


def test_existing_sweep_needs_resume(tmp_path, cache):
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "sweep.json").write_text("{}")
    with pytest.raises(RunError, match="--resume"):
        run_sweep(small(cache, tmp_path / "sweep"))


def test_resume_refuses_a_different_sweep_in_the_same_folder(tmp_path, cache):
    run_sweep(
        small(cache, tmp_path / "s", grid={"seed": [0]}, fixed={"epochs": 1, "batch_size": 8})
    )
    with pytest.raises(RunError, match="epochs=1.*asks for 2"):
        run_sweep(small(cache, tmp_path / "s", grid={"seed": [0]}, resume=True))


@pytest.mark.slow
def test_killed_sweep_resumes_to_the_same_table(tmp_path, cache):
    """SIGKILL a sweep subprocess mid-way; --resume keeps complete trials, reruns the rest and
    ends with the table an uninterrupted sweep gives."""
    grid = ["--grid", "lr=1e-2,2e-2,3e-2", "--grid", "seed=0,1"]
    common = [
        "sweep",
        "--cache",
        cache,
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        *grid,
    ]
    killed = tmp_path / "killed"
    env = os.environ | {"SHERL_CACHE_DEBUG": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sherl_cache.cli", *common, "--out", str(killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(killed.glob("trials/*/metrics.json"))) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(killed.glob("trials/*/metrics.json")))
    assert 2 <= done < 6
    runner = CliRunner()
    refused = runner.invoke(app, [*common, "--out", str(killed)])
    assert refused.exit_code == 2 and "--resume" in refused.output
    resumed = runner.invoke(app, [*common, "--out", str(killed), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert f"{6 - done} trial(s) run, {done} already complete" in resumed.output
    fresh = run_sweep(
        small(
            cache,
            tmp_path / "fresh",
            grid=parse_grid(grid[1::2]),
            fixed={"epochs": 2, "batch_size": 4, "device": "cpu"},
        )
    )
    assert len(fresh.rows) == 6
    assert metric_rows(read_results(killed)) == metric_rows(fresh.rows)


@pytest.mark.slow
def test_dask_local_cluster_gives_the_same_results(tmp_path, cache):
    local = run_sweep(small(cache, tmp_path / "local"))
    distributed = run_sweep(small(cache, tmp_path / "dask", workers=2))
    assert metric_rows(distributed.rows) == metric_rows(local.rows)
    pids = {json.loads(p.read_text())["pid"] for p in (tmp_path / "dask" / "status").glob("*.json")}
    assert os.getpid() not in pids  # trials ran in the worker processes


def test_unreachable_scheduler_fails_before_any_trial(tmp_path, cache):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = small(cache, tmp_path / "s", scheduler=f"tcp://127.0.0.1:{port}", connect_timeout=1.0)
    began = time.monotonic()
    with pytest.raises(ConfigError, match=r"cannot reach the dask scheduler.*--scheduler"):
        run_sweep(config)
    assert time.monotonic() - began < 30
    assert not (tmp_path / "s").exists()


# --- report and CLI ------------------------------------------------------------------------------


def test_report_writes_valid_pngs_also_for_a_running_sweep(tmp_path, cache):
    pytest.importorskip("matplotlib")
    from sherl_cache.experiments.report import write_report

    out = tmp_path / "s"
    run_sweep(small(cache, out, grid={"lr": [1e-2, 3e-2], "seed": [0, 1]}))
    # a still-running sweep: one trial has no metrics.json yet
    (out / "trials" / "lr=0.03_seed=1" / "metrics.json").unlink()
    result = write_report(out)
    names = {p.name for p in result.plots}
    assert names == {"accuracy_by_lr.png", "learning_curves.png", "memory_vs_metric.png"}
    for path in result.plots:
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000
    assert len(result.rows) == 3 and "best configuration: lr=" in result.table


def test_cli_sweep_and_report(tmp_path, cache):
    runner = CliRunner()
    out = tmp_path / "cli"
    args = [
        "sweep",
        "--cache",
        cache,
        "--out",
        str(out),
        "--grid",
        "reduction=4,8",
        "--grid",
        "seed=0,1",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--device",
        "cpu",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == str(out)
    assert lines[0].split()[:4] == ["rank", "reduction", "seed", "accuracy"]
    assert any(line.startswith("best configuration: reduction=") for line in lines)
    assert len(read_results(out)) == 4
    if pytest.importorskip("matplotlib"):
        shown = runner.invoke(app, ["report", str(out)])
        assert shown.exit_code == 0, shown.output
        assert shown.stdout.strip().splitlines()[-1] == str(out / "report")


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--grid", "lr=abc"], "error: --grid lr='abc': lr takes a number"),
        (["--grid", "lrr=1"], "error: unknown --grid key 'lrr'"),
        ([], "error: empty sweep"),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path, extra, match):
    result = CliRunner().invoke(
        app, ["sweep", "--cache", "nowhere", "--out", str(tmp_path / "x"), *extra]
    )
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [result.output.strip()]
    assert result.output.startswith(match)
