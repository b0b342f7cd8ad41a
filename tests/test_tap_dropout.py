"""``--tap-dropout``: noise on the cached states while training, none while evaluating."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_extract_config

from sherl_cache.config.train import TrainConfig
from sherl_cache.errors import ConfigError
from sherl_cache.extraction.extract import extract
from sherl_cache.store.cache import open_cache
from sherl_cache.training.discovery import late_weights_path, task_of
from sherl_cache.training.features import CachedFeatures
from sherl_cache.training.model import build_model


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_models, glue_dir) -> dict[str, str]:
    """Every hidden state of the tiny BERT, in float32 and in bfloat16 (kept in its dtype)."""
    root = tmp_path_factory.mktemp("tap-dropout")
    bert = tiny_models["bert"]
    return {
        dtype: extract(
            tiny_extract_config(bert, glue_dir, root, dtype=dtype, layers="all"), progress=False
        ).path
        for dtype in ("float32", "bfloat16")
    }


def model_and_batch(cache_path, tmp_path, tap_dropout):
    config = TrainConfig(
        cache=cache_path, out=tmp_path, late_layers=1, tap_dropout=tap_dropout, device="cpu"
    )
    cache = open_cache(cache_path)
    split = cache.num_layers - 1
    taps = list(range(split + 1))  # the split layer is a tap too: one tensor, read twice
    model = build_model(config, cache, task_of(cache, None), taps, late_weights_path(cache, None))
    source = CachedFeatures(cache, "train", taps, split)
    return model, source.batch(np.arange(8), torch.device("cpu"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tap_dropout_drops_and_rescales_states_in_training_only(caches, dtype, tmp_path):
    model, batch = model_and_batch(caches[dtype], tmp_path, 0.5)
    assert batch.last is batch.taps[-1]
    model.eval()
    taps, last = model._perturbed(batch)
    assert last is batch.last and all(a is b for a, b in zip(taps, batch.taps, strict=True))

    model.train()
    torch.manual_seed(0)
    taps, last = model._perturbed(batch)
    assert last is taps[-1], "a state read twice gets one mask"
    for dropped, state in zip(taps, batch.taps, strict=True):
        assert dropped.dtype == state.dtype
        valid = state != 0
        kept = dropped != 0
        share = float((kept & valid).sum() / valid.sum())
        assert 0.45 < share < 0.55
        torch.testing.assert_close(dropped[kept].float(), 2 * state[kept].float())
    torch.manual_seed(0)
    again, _ = model._perturbed(batch)
    torch.testing.assert_close(again[0], taps[0])  # seeded like every other dropout


def test_no_tap_dropout_leaves_batches_untouched(caches, tmp_path):
    model, batch = model_and_batch(caches["float32"], tmp_path, 0.0)
    model.train()
    taps, last = model._perturbed(batch)
    assert last is batch.last and all(a is b for a, b in zip(taps, batch.taps, strict=True))


def test_tap_dropout_is_a_fraction():
    with pytest.raises(ConfigError, match="--tap-dropout must be in"):
        TrainConfig(cache="c", out="o", tap_dropout=1.0)
    with pytest.raises(ConfigError, match="--tap-dropout"):
        TrainConfig(cache="c", out="o", tap_dropout=-0.1)
