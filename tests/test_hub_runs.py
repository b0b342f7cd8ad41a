"""Runs as Hugging Face Hub-style folders: save_pretrained / from_pretrained / push_to_hub,
hub ids in load_run, the record's own file name, and the LoRA route as a PEFT adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sherl_cache import Run, load_run
from sherl_cache.config.extract import ExtractConfig
from sherl_cache.config.train import TrainConfig
from sherl_cache.errors import RunError
from sherl_cache.extraction.extract import extract
from sherl_cache.training.recipe import train

PAIRS = [("The cat sat.", "A cat was sitting."), ("It rains.", "The sun is out today.")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models, glue_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub-runs")
    cache = extract(
        ExtractConfig(
            model=str(tiny_models["bert"]),
            task="mrpc",
            data_dir=glue_dir,
            cache_root=root / "caches",
            dtype="float32",
            device="cpu",
        ),
        progress=False,
    ).path
    made = {}
    for mode in ("frozen", "lora"):
        config = TrainConfig(
            cache=cache, out=root / mode, late_layers=2, late_mode=mode, epochs=1, batch_size=8
        )
        made[mode] = train(config, progress=False).out
    return made


def scores(run: Run) -> list:
    return [p.scores for p in run.predict(PAIRS)]


def test_run_folder_names_do_not_clash_with_hf_config(runs):
    names = {p.name for p in runs["frozen"].iterdir()}
    assert {"sherl_config.json", "trainable.safetensors", "metrics.json"} <= names
    assert "config.json" not in names and "late_adapter" not in names


@pytest.mark.parametrize("mode", ["frozen", "lora"])
def test_save_pretrained_round_trips_to_identical_predictions(runs, tmp_path, mode):
    run = load_run(runs[mode], device="cpu")
    run.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "README.md").read_text().startswith("---\nlibrary_name: ")
    again = Run.from_pretrained(tmp_path / "saved", device="cpu")
    assert scores(again) == scores(run)
    for name, tensor in run.model.state_dict().items():
        torch.testing.assert_close(again.model.state_dict()[name], tensor, rtol=0, atol=0)


def test_runs_written_with_config_json_still_load(runs, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(runs["frozen"], old)
    (old / "sherl_config.json").rename(old / "config.json")
    assert scores(load_run(old, device="cpu")) == scores(load_run(runs["frozen"], device="cpu"))


def test_lora_adapter_loads_with_peft_onto_the_rebuilt_late_layers(runs, tiny_models):
    from peft import PeftModel

    from sherl_cache.backbone.late import build_late_route

    run = load_run(runs["lora"], device="cpu")
    adapter = runs["lora"] / "late_adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    late = build_late_route(str(tiny_models["bert"]), run.config.late_layers)
    peft_late = PeftModel.from_pretrained(late, str(adapter)).eval()
    loaded = {n: p for n, p in peft_late.named_parameters() if "lora_" in n}
    ours = {n: p for n, p in run.model.late.named_parameters() if "lora_" in n}
    assert len(loaded) == len(ours) > 0
    assert any(p.abs().sum() > 0 for n, p in loaded.items() if "lora_B" in n)  # trained, not init
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, run.model.fusion.config.hidden_size)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        torch.testing.assert_close(peft_late(hidden, mask), run.model.late(hidden, mask))


def test_load_run_takes_a_hub_id(runs, monkeypatch):
    import huggingface_hub

    asked = []

    def snapshot_download(repo_id, **kwargs):
        asked.append((repo_id, kwargs.get("revision")))
        return str(runs["frozen"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    run = load_run("someone/mrpc-run", device="cpu")
    assert asked == [("someone/mrpc-run", None)] and run.task.name == "mrpc"
    Run.from_pretrained("someone/mrpc-run", revision="v1", device="cpu")
    assert asked[-1] == ("someone/mrpc-run", "v1")


def test_missing_hub_run_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RunError, match="no run folder nobody/nothing here, and hub repo"):
        load_run("nobody/nothing", device="cpu")


def test_push_to_hub_uploads_the_run_folder(runs, monkeypatch):
    import huggingface_hub

    calls = {}

    class Api:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls["create"] = (repo_id, private, exist_ok)
            return type("Url", (), {"repo_id": repo_id})()

        def upload_folder(self, *, repo_id, folder_path, commit_message, revision, create_pr):
            calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            calls["adapter"] = sorted(
                p.name for p in (Path(folder_path) / "late_adapter").iterdir()
            )
            return "commit"

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    run = load_run(runs["lora"], device="cpu")
    assert run.push_to_hub("me/lora-run", private=True, token="t") == "commit"
    assert calls["create"] == ("me/lora-run", True, True) and calls["token"] == "t"
    assert calls["files"] == [
        "README.md", "late_adapter", "metrics.json", "sherl_config.json", "trainable.safetensors"
    ]  # fmt: skip
    assert calls["adapter"] == ["adapter_config.json", "adapter_model.safetensors"]
