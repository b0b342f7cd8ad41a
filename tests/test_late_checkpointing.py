"""``--late-checkpointing``: the late layers recompute their activations in the backward pass,
with the same dropout masks, so training is unchanged step for step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FAMILIES, tiny_extract_config

from sherl_cache.config.train import TrainConfig
from sherl_cache.errors import ConfigError
from sherl_cache.extraction.extract import extract
from sherl_cache.store.cache import open_cache
from sherl_cache.training.discovery import task_of
from sherl_cache.training.features import CachedFeatures
from sherl_cache.training.model import build_model

# One encoder and one decoder-only family of each layer layout, every late mode among them.
CASES = [("bert", "lora"), ("llama", "full"), ("gpt2", "frozen"), ("t5", "lora")]


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_models, glue_dir) -> dict[str, str]:
    root = tmp_path_factory.mktemp("checkpointing")
    made = {}
    for family, _ in CASES:
        config = tiny_extract_config(tiny_models[family], glue_dir, root, layers="all")
        made[family] = extract(config, progress=False).path
    return made


def steps(cache_path, model_dir, tmp_path, late_mode, checkpointing, inner_calls=None):
    """Losses and final trainable weights of three seeded AdamW steps, dropout on."""
    config = TrainConfig(
        cache=cache_path,
        out=tmp_path,
        late_layers=2,
        late_mode=late_mode,
        late_checkpointing=checkpointing,
        device="cpu",
    )
    cache = open_cache(cache_path)
    split = cache.num_layers - 2
    taps = list(range(split + 1))
    model = build_model(config, cache, task_of(cache, None), taps, str(model_dir))
    if inner_calls is not None:  # inner modules run again when a layer is recomputed
        leaves = (m for m in model.late.layers[0].modules() if not list(m.children()))
        first = next(m for m in leaves if list(m.parameters(recurse=False)))
        first.register_forward_hook(lambda *_: inner_calls.append(1))
    source = CachedFeatures(cache, "train", taps, split)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    torch.manual_seed(0)
    losses = []
    for start in (0, 8, 16):
        batch = source.batch(np.arange(start, start + 8), torch.device("cpu"))
        loss = model.loss(model(batch), batch.labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    weights = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    return torch.stack(losses), weights


@pytest.mark.parametrize(("family", "late_mode"), [c for c in CASES if c[0] in FAMILIES])
def test_checkpointed_late_layers_train_exactly_as_without(
    caches, tiny_models, tmp_path, family, late_mode
):
    plain_calls, checkpointed_calls = [], []
    plain = steps(
        caches[family], tiny_models[family], tmp_path / "a", late_mode, False, plain_calls
    )
    checkpointed = steps(
        caches[family], tiny_models[family], tmp_path / "b", late_mode, True, checkpointed_calls
    )
    assert len(checkpointed_calls) == 2 * len(plain_calls) == 6  # recomputed once per step
    torch.testing.assert_close(checkpointed[0], plain[0], rtol=0, atol=0)
    assert checkpointed[1].keys() == plain[1].keys()
    for name, value in plain[1].items():
        torch.testing.assert_close(checkpointed[1][name], value, rtol=0, atol=0, msg=name)


def test_checkpointing_without_late_layers_is_refused(caches, tiny_models, tmp_path):
    cache = open_cache(caches["bert"])
    config = TrainConfig(
        cache=caches["bert"], out=tmp_path, late_layers=0, late_checkpointing=True, device="cpu"
    )
    taps = list(range(cache.num_layers + 1))
    with pytest.raises(ConfigError, match="--late-checkpointing recomputes late layers"):
        build_model(config, cache, task_of(cache, None), taps, str(tiny_models["bert"]))
