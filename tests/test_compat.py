"""Caches written before the package was reorganised still open, verify and train."""

from __future__ import annotations

from pathlib import Path

import pytest

from sherl_cache import open_cache
from sherl_cache.backbone.frozen import load_tokenizer, tokenizer_identity
from sherl_cache.config.train import TrainConfig
from sherl_cache.families import get_family
from sherl_cache.store.verify import verify_cache
from sherl_cache.training.recipe import train

LEGACY = Path(__file__).parent / "data" / "legacy_v1"


def test_legacy_cache_opens_and_verifies():
    cache = open_cache(str(LEGACY / "cache"))
    assert cache.complete and cache.layers == [0, 1, 2] and cache.dtype == "float16"
    assert cache.num_examples("train") == 8 and cache.num_examples("validation") == 4
    report = verify_cache(str(LEGACY / "cache"))
    assert report.ok, report.lines()


def test_legacy_tokenizer_identity_is_unchanged():
    """The identity feeds the cache key: the same tokenizer must still hash the same."""
    recorded = open_cache(str(LEGACY / "cache")).manifest["tokenizer"]
    found = tokenizer_identity(
        load_tokenizer(LEGACY / "model"), LEGACY / "model", get_family("bert")
    )
    assert {k: v for k, v in found.items() if k != "name"} == {
        k: v for k, v in recorded.items() if k != "name"
    }


@pytest.mark.parametrize("late_mode", ["frozen", "lora"])
def test_legacy_cache_trains(tmp_path, late_mode):
    config = TrainConfig(
        cache=str(LEGACY / "cache"),
        out=tmp_path / "run",
        model=str(LEGACY / "model"),  # the recorded path was a temporary folder
        late_mode=late_mode,
        epochs=2,
        batch_size=4,
    )
    metrics = train(config, progress=False).metrics
    assert metrics["steps"] == 4 and set(metrics["best"]) >= {"accuracy", "f1"}
