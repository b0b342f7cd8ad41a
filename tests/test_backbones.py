"""The late route must reproduce the full backbone exactly, reading as little as possible."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, build_tiny_model
from transformers import BertForSequenceClassification, BertModel, OPTConfig, OPTModel

from sherl_cache.backbone import hub
from sherl_cache.backbone.frozen import load_backbone, run_lower_layers
from sherl_cache.backbone.hub import inspect_backbone, resolve_model_dir
from sherl_cache.backbone.late import build_late_route, load_late_state_dict
from sherl_cache.errors import ConfigError, ModelLoadError
from sherl_cache.families import FAMILIES as REGISTERED_FAMILIES
from sherl_cache.families import get_family
from sherl_cache.runtime import pad

SENTENCES = [
    "the company said shares rose .",
    "a new report was told to the court on monday after the market closed .",
    "police said .",
]
TOL = {"atol": 1e-5, "rtol": 1e-4}


def _padded_batch(tokenizer, family) -> dict[str, torch.Tensor]:
    """SENTENCES as the family encodes them, right-padded to the longest."""
    ids, mask = pad(
        family.encode(tokenizer, [SENTENCES], None)["input_ids"], family.pad_id(tokenizer)
    )
    return {"input_ids": ids, "attention_mask": mask}


def _forward(path: Path) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, ...], int]:
    """A padded batch of different lengths and the full model's hidden states on it."""
    model, tokenizer, info = load_backbone(str(path))
    batch = _padded_batch(tokenizer, get_family(info.family))
    assert batch["attention_mask"].min() == 0  # the batch really is padded
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    assert len(out.hidden_states) == info.num_layers + 1
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)
    return batch, out.hidden_states, info.num_layers


def _assert_route_exact(path: Path, k: int) -> None:
    batch, states, num_layers = _forward(path)
    route = build_late_route(path, k).eval()
    assert (route.k, route.first_layer) == (k, num_layers - k)
    with torch.no_grad():
        got = route(states[num_layers - k], batch["attention_mask"])
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], states[num_layers][real], **TOL)


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_late_route_reproduces_full_model(tiny_models, family, k):
    _assert_route_exact(tiny_models[family], k)


@pytest.mark.real
@pytest.mark.parametrize("k", [1, 2])
def test_late_route_reproduces_minilm(minilm_path, k):
    _assert_route_exact(minilm_path, k)


def test_bert_reads_only_late_layers(tiny_models):
    names = set(load_late_state_dict(tiny_models["bert"], 2))
    assert names
    assert all(n.startswith(("encoder.layer.2.", "encoder.layer.3.")) for n in names)
    assert any(n.startswith("encoder.layer.2.") for n in names)


@pytest.mark.parametrize("k", [2, 4])
def test_t5_reads_late_blocks_final_norm_and_position_bias(tiny_models, k):
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    names = set(load_late_state_dict(tiny_models["t5"], k))
    late = {n for n in names if any(n.startswith(f"encoder.block.{i}.") for i in range(4 - k, 4))}
    assert names - late - {bias} == {"encoder.final_layer_norm.weight"}
    assert bias in names
    assert not any(n.startswith(("shared", "decoder", "lm_head")) for n in names)


def test_task_checkpoint_prefix(tiny_models, tmp_path):
    """A BertForSequenceClassification save stores the encoder under ``bert.``."""
    classifier = BertForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=2)
    classifier.save_pretrained(tmp_path)
    shutil.copy(tiny_models["bert"] / "vocab.txt", tmp_path)
    shutil.copy(tiny_models["bert"] / "tokenizer_config.json", tmp_path)
    assert all(n.startswith("bert.encoder.layer.3.") for n in load_late_state_dict(tmp_path, 1))
    _assert_route_exact(tmp_path, 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_checkpoint(tmp_path, family):
    path = build_tiny_model(family, tmp_path / family)
    model, _, _ = load_backbone(str(path))
    (path / "model.safetensors").unlink()
    model.save_pretrained(path, max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("model-*.safetensors"))) > 1
    _assert_route_exact(path, 2)


def test_gradients_reach_input_through_frozen_route(tiny_models):
    for family in FAMILIES:
        route = build_late_route(tiny_models[family], 2).train().requires_grad_(False)
        hidden = torch.randn(2, 5, 32, requires_grad=True)
        mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
        route(hidden, mask).sum().backward()
        assert hidden.grad is not None and hidden.grad.abs().sum() > 0
        assert all(p.grad is None for p in route.parameters())


def test_route_is_trainable_and_dropout_applies_in_train_mode(tiny_models):
    route = build_late_route(tiny_models["bert"], 1)
    assert all(p.requires_grad for p in route.parameters())
    hidden, mask = torch.randn(2, 6, 32), torch.ones(2, 6, dtype=torch.long)
    torch.manual_seed(0)
    assert not torch.equal(route.train()(hidden, mask), route(hidden, mask))
    assert torch.equal(route.eval()(hidden, mask), route(hidden, mask))


@pytest.mark.parametrize("family", FAMILIES)
def test_run_lower_layers_matches_hidden_states(tiny_models, family):
    model, tokenizer, info = load_backbone(str(tiny_models[family]))
    batch = _padded_batch(tokenizer, get_family(family))
    with torch.no_grad():
        full = model(**batch, output_hidden_states=True).hidden_states
        for n in (0, 2, info.num_layers):
            lower = run_lower_layers(model, batch["input_ids"], batch["attention_mask"], n)
            assert len(lower) == n + 1
            for mine, ref in zip(lower, full, strict=False):
                torch.testing.assert_close(mine, ref)


@pytest.mark.parametrize("k", [0, 5])
def test_late_layers_out_of_range(tiny_models, k):
    with pytest.raises(ConfigError, match=r"--late-layers must be between 1 and 4"):
        build_late_route(tiny_models["bert"], k)


def test_missing_model_folder(tmp_path):
    with pytest.raises(ModelLoadError, match=r"does not exist"):
        build_late_route(tmp_path / "nope", 1)
    with pytest.raises(ModelLoadError, match=r"--model"):
        inspect_backbone(str(tmp_path / "nope"))


def test_folder_without_safetensors(tiny_models, tmp_path):
    shutil.copy(tiny_models["bert"] / "config.json", tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(ModelLoadError, match=r"no model\.safetensors.*\.bin"):
        build_late_route(tmp_path, 1)


def test_unsupported_architecture(tmp_path):
    OPTModel(
        OPTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            ffn_dim=64,
            num_attention_heads=4,
            vocab_size=100,
            word_embed_proj_dim=32,
        )
    ).save_pretrained(tmp_path)
    message = rf"unsupported architecture 'opt' \(--model\): supported: {', '.join(FAMILIES)}"
    for call in (inspect_backbone, load_backbone, lambda m: build_late_route(m, 1)):
        with pytest.raises(ModelLoadError, match=message):
            call(str(tmp_path))


def test_every_family_has_a_test_fixture():
    assert set(FAMILIES) == set(REGISTERED_FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_inspect_backbone(tiny_models, family):
    info = inspect_backbone(str(tiny_models[family]))
    saved = json.loads((tiny_models[family] / "config.json").read_text())["architectures"][0]
    assert (info.family, info.architecture) == (family, saved)
    assert (info.num_layers, info.hidden_size, info.revision) == (4, 32, None)
    assert info.to_dict()["weights_sha256"] == info.weights_sha256
    assert len(info.weights_sha256) == 64


def test_weights_sha256_stable_and_tracks_weights(tmp_path):
    path = build_tiny_model("bert", tmp_path / "m", seed=0)
    first = inspect_backbone(str(path)).weights_sha256
    hub._sha256_cached.cache_clear()  # the second read must hash the bytes again
    assert inspect_backbone(str(path)).weights_sha256 == first
    build_tiny_model("bert", path, seed=1)
    assert inspect_backbone(str(path)).weights_sha256 != first


def test_hub_id_resolves_from_cache_offline(tiny_models, tmp_path, monkeypatch):
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-bert"
    shutil.copytree(tiny_models["bert"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    folder, revision = resolve_model_dir("tiny-org/tiny-bert")
    assert (folder.name, revision) == (commit, commit)
    assert inspect_backbone("tiny-org/tiny-bert").revision == commit
    with pytest.raises(ModelLoadError, match=r"cannot find model 'tiny-org/other' \(--model\)"):
        resolve_model_dir("tiny-org/other")


def test_bert_model_save_without_pooler(tiny_models, tmp_path):
    """Checkpoints differ in which optional modules they carry; the route never needs them."""
    BertModel.from_pretrained(tiny_models["bert"], add_pooling_layer=False).save_pretrained(
        tmp_path
    )
    assert len(load_late_state_dict(tmp_path, 1)) == 16
