"""A cache read by the ecosystem: consolidated metadata for xarray and dask, floats back."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import zarr
from test_extract import small_config

from sherl_cache import open_cache
from sherl_cache.extraction.extract import extract
from sherl_cache.runtime import from_storage
from sherl_cache.store.cache import hidden_name, scale_name


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_xarray_and_dask_open_a_cache_without_warnings(tmp_path, tiny_models, glue_dir, dtype):
    import dask.array as da

    xr = pytest.importorskip("xarray")
    path = extract(
        small_config(tmp_path, tiny_models["bert"], glue_dir, dtype=dtype), progress=False
    ).path
    cache = open_cache(path)
    assert zarr.open_group(path, mode="r").metadata.consolidated_metadata is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(path, group="train")
        lazy = da.from_zarr(path, component=f"train/{hidden_name(0)}")
    assert ds[hidden_name(0)].dims == ("token", "hidden")
    # The README's recipe: floats back from the stored representation with numpy alone.
    values = ds[hidden_name(0)].values
    if dtype == "bfloat16":
        floats = (values.astype(np.uint32) << 16).view(np.float32)
    else:
        floats = values.astype(np.float32) * ds[scale_name(0)].values[:, None]
    np.testing.assert_array_equal(floats, cache.hidden_tokens("train", 0, 0, len(values)))
    np.testing.assert_array_equal(lazy.compute(), values)
    kwargs = {"scales": ds[scale_name(0)].values} if dtype == "int8" else {}
    np.testing.assert_array_equal(from_storage(values, dtype, **kwargs), floats)
