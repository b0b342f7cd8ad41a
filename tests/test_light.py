"""Commands that only read (``--help``, ``info``, ``report``) must not import torch or
transformers: they run in a fresh interpreter and the test looks at its ``sys.modules``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "transformers")

# Runs the console script's main() with the given arguments, then reports what it imported.
PROBE = """
import json, sys
from sherl_cache.cli import main
sys.argv = ["sherl-cache", *json.loads(sys.argv[1])]
try:
    main()
    code = 0
except SystemExit as exc:
    code = exc.code or 0
heavy = [name for name in {heavy!r} if name in sys.modules]
print("PROBE " + json.dumps({{"code": code, "heavy": heavy}}), file=sys.stderr)
"""


def probe(*args: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", SHERL_CACHE_DEBUG="")
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), json.dumps(args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    line = next(x for x in result.stderr.splitlines() if x.startswith("PROBE "))
    outcome = json.loads(line.removeprefix("PROBE "))
    outcome["output"] = result.stdout + result.stderr
    return outcome


@pytest.fixture(scope="module")
def cache(bert_cache) -> str:
    return bert_cache


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, cache) -> Path:
    import torch

    from sherl_cache.experiments.sweep import SweepConfig, run_sweep

    out = tmp_path_factory.mktemp("light-sweep") / "s"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_sweep(
            SweepConfig(
                cache=cache,
                out=out,
                grid={"seed": [0, 1]},
                fixed={"epochs": 1, "batch_size": 8, "device": "cpu"},
            )
        )
    finally:
        torch.set_num_threads(before)
    return out


def assert_light(outcome: dict) -> None:
    assert outcome["code"] == 0, outcome["output"]
    assert outcome["heavy"] == [], f"imported {outcome['heavy']}"


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["extract", "--help"]])
def test_help_is_light(args):
    assert_light(probe(*args))


def test_info_is_light(cache):
    outcome = probe("info", cache)
    assert_light(outcome)
    assert "always stored" in outcome["output"]


def test_report_is_light(sweep_dir, tmp_path):
    pytest.importorskip("matplotlib")
    outcome = probe("report", str(sweep_dir), "--out", str(tmp_path / "report"))
    assert_light(outcome)
    assert (tmp_path / "report").is_dir()
