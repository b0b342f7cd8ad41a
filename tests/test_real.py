"""The packaged MiniLM on real MRPC rows: exactness of the cache, and a short real training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from sherl_cache import open_cache
from sherl_cache.config.train import TrainConfig
from sherl_cache.extraction.extract import ExtractConfig, extract
from sherl_cache.training.recipe import train

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def real_subset(tmp_path_factory, real_glue_dir):
    """The first rows of the real MRPC files, kept verbatim (BOM, quotes and all)."""
    folder = tmp_path_factory.mktemp("glue") / "MRPC"
    folder.mkdir()
    for name, rows in (("train.tsv", 96), ("dev.tsv", 32)):
        lines = (real_glue_dir / "MRPC" / name).read_bytes().splitlines(keepends=True)
        (folder / name).write_bytes(b"".join(lines[: rows + 1]))
    return folder.parent


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_minilm_cache_equals_direct_forward(tmp_path, minilm_path, real_subset, dtype):
    path = extract(
        ExtractConfig(
            model=str(minilm_path),
            task="mrpc",
            data_dir=real_subset,
            cache_root=tmp_path,
            dtype=dtype,
            device="cpu",
        ),
        progress=False,
    ).path
    cache = open_cache(path)
    tok = AutoTokenizer.from_pretrained(minilm_path)
    model = AutoModel.from_pretrained(minilm_path).eval()
    lines = (real_subset / "MRPC" / "dev.tsv").read_text(encoding="utf-8-sig").splitlines()[1:]
    tol = {"float32": dict(atol=1e-4, rtol=1e-4), "float16": dict(atol=4e-3, rtol=1e-3)}[dtype]
    for i, line in enumerate(lines):
        a, b = line.split("\t")[3:5]
        enc = tok(a, b, truncation=True, max_length=128, return_tensors="pt")
        with torch.no_grad():
            states = model(**enc, output_hidden_states=True).hidden_states
        np.testing.assert_array_equal(cache.input_ids("validation", i), enc["input_ids"][0].numpy())
        for layer in cache.layers:
            torch.testing.assert_close(
                torch.from_numpy(cache.hidden("validation", layer, i)), states[layer][0], **tol
            )


def test_minilm_trains_from_real_cache(tmp_path, minilm_path, real_subset):
    path = extract(
        ExtractConfig(
            model=str(minilm_path),
            task="mrpc",
            data_dir=real_subset,
            cache_root=tmp_path,
            device="cpu",
        ),
        progress=False,
    ).path
    metrics = train(
        TrainConfig(cache=path, out=tmp_path / "run", epochs=2, batch_size=16), progress=False
    ).metrics
    assert metrics["epochs"][-1]["loss"] < metrics["epochs"][0]["loss"] * 1.5
    assert 0 <= metrics["best"]["accuracy"] <= 1
    assert metrics["trainable_params"] / metrics["total_params"] < 0.01
