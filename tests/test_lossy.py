"""Lossy caches (int8, float8 e4m3): held to their documented error bound, decoded on read."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from test_extract import direct_hidden_states, small_config
from typer.testing import CliRunner

from sherl_cache import open_cache
from sherl_cache.cli.app import app
from sherl_cache.errors import CacheError
from sherl_cache.extraction.extract import extract
from sherl_cache.runtime import (
    FLOAT8_E4M3,
    dequantize,
    error_bound,
    from_storage,
    quantize,
    round_to_storage,
)
from sherl_cache.store.cache import hidden_name, scale_name
from sherl_cache.store.verify import verify_cache
from sherl_cache.training.features import CachedFeatures

LOSSY = ("int8", "float8_e4m3")
COMPUTE = 1e-4  # float32 compute differences between the cache and a direct forward pass


def test_float8_table_decodes_every_code_as_torch_does():
    torch_values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(np.isnan(FLOAT8_E4M3), np.isnan(torch_values))
    finite = ~np.isnan(torch_values)
    np.testing.assert_array_equal(FLOAT8_E4M3[finite], torch_values[finite])


@pytest.mark.parametrize("dtype", LOSSY)
def test_quantize_stays_within_its_bound_and_decodes_alike_in_numpy(dtype):
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(3, 17, 64, generator=generator) * 4
    states[..., 5] *= 40  # an outlier channel, as real activations have
    states[1, 2] = 0  # an all-zero token decodes to zeros
    codes, scales = quantize(states, dtype)
    decoded = dequantize(codes, scales, dtype)
    numpy_decoded = from_storage(codes.numpy(), dtype, scales.numpy())
    np.testing.assert_array_equal(decoded.numpy(), numpy_decoded)
    error = (decoded - states).abs().numpy()
    assert (error <= error_bound(states.numpy(), dtype) * (1 + 1e-6)).all()
    assert error.max() > 0  # lossy indeed: never taken for an exact dtype
    assert (decoded[1, 2] == 0).all()
    torch.testing.assert_close(round_to_storage(states, dtype), decoded, rtol=0, atol=0)
    with pytest.raises(ValueError, match="scales"):
        from_storage(codes.numpy(), dtype)


@pytest.mark.parametrize("family", ["bert", "t5"])
@pytest.mark.parametrize("dtype", LOSSY)
def test_lossy_cache_matches_a_direct_forward_within_its_bound(
    tmp_path, tiny_models, glue_dir, family, dtype
):
    from sherl_cache.data.files import load_glue
    from sherl_cache.data.tasks import get_task

    config = small_config(tmp_path, tiny_models[family], glue_dir, dtype=dtype, layers="all")
    cache = open_cache(extract(config, progress=False).path)
    assert cache.dtype == dtype and cache.manifest["quantization"]["lossy"] is True
    assert cache.layer_array("train", 0).dtype == (np.int8 if dtype == "int8" else np.uint8)
    assert cache.scale_array("train", 0).shape == (cache.num_tokens("train"),)
    rows = load_glue(get_task("mrpc"), glue_dir).splits["validation"]
    for i in range(len(rows)):
        texts = tuple(column[i] for column in rows.texts)
        _, states = direct_hidden_states(tiny_models[family], family, texts, 40)
        for layer in cache.layers:
            expected = states[layer][0].numpy()
            cached = cache.hidden("validation", layer, i)
            bound = error_bound(expected, dtype) + COMPUTE * (np.abs(expected) + 1)
            assert (np.abs(cached - expected) <= bound).all(), (layer, i)

    report = verify_cache(cache.path, recompute=4, seed=0, device="cpu")
    assert report.ok and report.recomputed == 4, report.lines()


def test_cached_features_decode_lossy_batches(tmp_path, tiny_models, glue_dir):
    config = small_config(tmp_path, tiny_models["bert"], glue_dir, dtype="int8", layers="all")
    cache = open_cache(extract(config, progress=False).path)
    # A tiny memory budget: windows, and batches that cross a window edge.
    features = CachedFeatures(cache, "train", [0, 2], 3, memory_budget=4000)
    assert len(features.windows) > 1
    indices = np.array([0, 5, len(features) - 1])
    batch = features.batch(indices, torch.device("cpu"))
    for row, i in enumerate(indices):
        n = int(cache.offsets("train")[i + 1] - cache.offsets("train")[i])
        for tap, layer in zip(batch.taps, [0, 2], strict=True):
            np.testing.assert_array_equal(tap[row, :n].numpy(), cache.hidden("train", layer, i))
        np.testing.assert_array_equal(batch.last[row, :n].numpy(), cache.hidden("train", 3, i))
        assert (batch.last[row, n:] == 0).all()


def test_info_and_verify_know_a_lossy_cache(tmp_path, tiny_models, glue_dir):
    config = small_config(tmp_path, tiny_models["bert"], glue_dir, dtype="float8_e4m3")
    path = extract(config, progress=False).path
    shown = CliRunner().invoke(app, ["info", path])
    assert shown.exit_code == 0 and "LOSSY" in shown.stdout and "float8_e4m3" in shown.stdout
    # A wrong scale is found by the recomputation: the bound is the documented one, not "any".
    scales = zarr.open_array(f"{path}/train/{scale_name(0)}", mode="r+")
    scales[:] = scales[:] * 1.5
    report = verify_cache(path, recompute=30, seed=0, device="cpu")
    assert not report.ok
    assert any(f.array == hidden_name(0) and "tolerance" in f.what for f in report.problems)


def test_torch_dataset_over_a_cache_split_decodes_like_the_cache(tmp_path, tiny_models, glue_dir):
    from torch.utils.data import DataLoader

    from sherl_cache.training.dataset import CacheDataset

    config = small_config(tmp_path, tiny_models["bert"], glue_dir, dtype="int8", layers="0,2")
    cache = open_cache(extract(config, progress=False).path)
    dataset = CacheDataset(cache.path, "train", layers=[2])
    assert len(dataset) == cache.num_examples("train")
    item = dataset[3]
    np.testing.assert_array_equal(item["hidden"][2].numpy(), cache.hidden("train", 2, 3))
    assert int(item["label"]) == int(cache.labels("train")[3])
    loader = DataLoader(dataset, batch_size=5, collate_fn=CacheDataset.collate, num_workers=1)
    batch = next(iter(loader))
    n = int(batch["attention_mask"][3].sum())
    np.testing.assert_array_equal(batch["hidden"][2][3, :n].numpy(), cache.hidden("train", 2, 3))
    assert (batch["hidden"][2][3, n:] == 0).all() and batch["label"].shape == (5,)
    with pytest.raises(CacheError, match="does not store hidden-state index 4"):
        CacheDataset(cache.path, "train", layers=[4])
