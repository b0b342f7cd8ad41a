"""Distributed extraction: bit-identical to ``extract()``, resumable after kills, fsspec URLs.

One module-scoped LocalCluster (two worker processes, one thread each, loopback only) serves
every test; tests that change a worker's environment (fault-injection hooks) restore it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import stored_files

from sherl_cache import open_cache
from sherl_cache.errors import ConfigError
from sherl_cache.extraction.distributed import UnitJob, extract_distributed
from sherl_cache.extraction.extract import ExtractConfig, extract
from sherl_cache.families import get_family
from sherl_cache.runtime import FLOAT8_E4M3, is_scaled
from sherl_cache.store.writer import KILL_AT_ENV, UNIT_DELAY_ENV

pytestmark = pytest.mark.slow

VOLATILE = ("created", "completed", "command")  # differ between any two runs or paths


def config_for(model: Path, glue_dir: Path, cache: str, **overrides) -> ExtractConfig:
    values = dict(
        model=str(model),
        task="mrpc",
        data_dir=glue_dir,
        cache=cache,
        batch_size=4,
        max_length=40,
        chunk_tokens=64,
        shard_chunks=2,  # 128-token units: the 24-row train split has 6 of them
        device="cpu",
        layers="all",
    )
    values.update(overrides)
    return ExtractConfig(**values)


@pytest.fixture(scope="module")
def client():
    """Two worker processes forked from a server that has imported torch and transformers
    once, so the workers the kill tests restart are up in a second, not after a re-import."""
    import dask
    from distributed import Client, LocalCluster
    from distributed.utils import get_mp_context

    with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}):
        get_mp_context().set_forkserver_preload(
            ["distributed", "sherl_cache.extraction.distributed"]
        )
        cluster = LocalCluster(
            n_workers=2,
            processes=True,
            threads_per_worker=1,
            host="127.0.0.1",
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
        client = Client(cluster, set_as_default=False)
        yield client
        client.close()
        cluster.close()


@pytest.fixture(scope="module")
def reference(tiny_models, glue_dir, tmp_path_factory) -> str:
    """The single-process cache every distributed one must equal, byte for byte."""
    path = str(tmp_path_factory.mktemp("reference") / "cache")
    extract(config_for(tiny_models["bert"], glue_dir, path), progress=False)
    return path


def _set_env(values: dict[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def manifest(path: str) -> dict:
    attrs = dict(zarr.open_group(path, mode="r").attrs)
    return {k: v for k, v in attrs.items() if k not in VOLATILE}


def array_bytes(path: str) -> dict[str, bytes]:
    """Every array of every split, decoded: comparable across local paths and URLs."""
    root = zarr.open_group(path, mode="r")
    out = {}
    for split, group in root.groups():
        for name, array in group.arrays():
            out[f"{split}/{name}"] = array[...].tobytes()
    return out


def assert_identical(path: str, reference: str) -> None:
    assert open_cache(path).complete
    assert manifest(path) == manifest(reference)
    got, want = array_bytes(path), array_bytes(reference)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], f"{name} differs"
    if "://" not in path:
        assert stored_files(path) == stored_files(reference)


def test_distributed_cache_is_bit_identical(client, tiny_models, glue_dir, reference, tmp_path):
    path = str(tmp_path / "dist")
    messages: list[str] = []
    config = config_for(tiny_models["bert"], glue_dir, path)
    result = extract_distributed(config, client=client, report=messages.append, progress=False)
    assert result.path == path and not result.resumed and not result.already_complete
    assert_identical(path, reference)
    assert result.tokens == open_cache(reference).manifest["stats"]["tokens"]
    # The same command finishes a cache whichever way it was started.
    assert zarr.open_group(path).attrs["command"].startswith("sherl-cache extract --model")
    again = extract_distributed(config, client=client, report=messages.append, progress=False)
    assert again.already_complete and any("already complete" in m for m in messages)


@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3"])
def test_distributed_lossy_cache_equals_the_local_one(
    client, tiny_models, glue_dir, tmp_path, dtype
):
    """Workers compute codes and per-token scales as one process does. Not bit for bit: a
    worker runs torch on one thread, and float32 sums in another order move a state's last
    bits, which a float16 cache rounds away but a per-token scale (max |x| / code range) keeps.
    So scales agree to float32 noise and codes to one step, the documented bound."""
    local = str(tmp_path / "local")
    extract(config_for(tiny_models["bert"], glue_dir, local, dtype=dtype), progress=False)
    path = str(tmp_path / "dist")
    config = config_for(tiny_models["bert"], glue_dir, path, dtype=dtype)
    extract_distributed(config, client=client, progress=False)
    assert is_scaled(dtype) and open_cache(path).complete
    assert manifest(path) == manifest(local)
    got, want = zarr.open_group(path, mode="r"), zarr.open_group(local, mode="r")
    changed = total = 0
    for split, group in want.groups():
        for name, array in group.arrays():
            mine, theirs = got[split][name][...], array[...]
            assert mine.dtype == theirs.dtype and mine.shape == theirs.shape
            if name.startswith("scale"):
                np.testing.assert_allclose(mine, theirs, rtol=1e-5)
            elif name.startswith("hidden"):
                a, b = code_values(mine, dtype), code_values(theirs, dtype)
                assert np.all(np.abs(a - b) <= code_step(b, dtype)), f"{split}/{name}"
                changed, total = changed + np.count_nonzero(a != b), total + a.size
            else:
                np.testing.assert_array_equal(mine, theirs)
    assert changed <= 0.01 * total  # a code moves only where a value sat on a rounding edge


def code_values(codes: np.ndarray, dtype: str) -> np.ndarray:
    """Stored codes as numbers (float8 codes are stored as their raw bytes)."""
    return FLOAT8_E4M3[codes] if dtype == "float8_e4m3" else codes.astype(np.float32)


def code_step(values: np.ndarray, dtype: str) -> np.ndarray:
    """One code step at each value: 1 for int8, one e4m3 ulp (3 mantissa bits) for float8."""
    if dtype == "int8":
        return np.ones_like(values)
    return np.maximum(np.abs(values), 2.0**-6) / 8


def test_resume_of_half_flagged_cache(client, tiny_models, glue_dir, reference, tmp_path):
    """Units left unflagged (as a kill leaves them) are recomputed; flagged ones are kept."""
    path = str(tmp_path / "half")
    config = config_for(tiny_models["bert"], glue_dir, path)
    extract(config, progress=False)
    root = zarr.open_group(path, mode="r+")
    root.attrs["complete"] = False
    done = root["train"]["units_done"]
    done[1::2] = 0
    for name in ("input_ids", "hidden_004"):  # a torn unit: shards rewritten with garbage
        root["train"][name][128:256] = 7
    result = extract_distributed(config, client=client, progress=False)
    assert result.resumed
    assert_identical(path, reference)


def test_unit_job_round_trip(tiny_models, glue_dir):
    from sherl_cache.backbone.frozen import load_tokenizer
    from sherl_cache.data.files import load_glue
    from sherl_cache.data.tasks import get_task
    from sherl_cache.extraction.inputs import tokenize_split

    split = load_glue(get_task("mrpc"), glue_dir).splits["train"]
    tokens = tokenize_split(get_family("bert"), load_tokenizer(tiny_models["bert"]), split, 40)
    offsets = tokens.offsets
    job = UnitJob.cut(
        tokens, offsets, 2, 256, 384, path="p", store_id="s", layers=(0,), batch_size=4, pad_id=0
    )
    local, local_offsets = job.tokens()
    assert local.input_ids == tokens.input_ids[job.first : job.first + len(local.input_ids)]
    assert (
        local.token_type_ids == tokens.token_type_ids[job.first : job.first + len(local.input_ids)]
    )
    assert local_offsets[0] == 0 and job.base <= 256 < job.base + local_offsets[1]
    assert job.base + local_offsets[-1] >= 384
    assert job.input_ids.nbytes < 4 * 1024  # a task carries token ids, never states or models


def test_worker_killed_mid_unit_is_rescheduled(client, tiny_models, glue_dir, reference, tmp_path):
    """Every worker that starts writing train unit 1 dies half way (SIGKILL); dask reruns the
    unit on a fresh worker, which rewrites the same bytes."""
    before = set(client.run(os.getpid).values())
    client.run(_set_env, {KILL_AT_ENV: "unit-partly-written:train:1"})
    try:
        path = str(tmp_path / "killed-worker")
        extract_distributed(
            config_for(tiny_models["bert"], glue_dir, path), client=client, progress=False
        )
    finally:
        client.run(_set_env, {KILL_AT_ENV: None})
    client.wait_for_workers(2, timeout=120)
    assert set(client.run(os.getpid).values()) != before, "no worker was killed"
    assert_identical(path, reference)


CLIENT_SCRIPT = """
import sys
from sherl_cache.cli import main
sys.argv = ["sherl-cache", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("cluster", ["scheduler", "workers"])
def test_client_killed_then_rerun_is_bit_identical(
    client, tiny_models, glue_dir, reference, tmp_path, cluster
):
    """SIGKILL a CLI run after two units; a rerun finishes the cache bit for bit.

    ``--scheduler``: the cluster outlives the client and may still finish its in-flight units
    (same bytes). ``--workers 2``: the client's own local cluster dies with it, workers too.
    """
    path = str(tmp_path / "killed-client")
    args = [
        "extract", "--model", str(tiny_models["bert"]), "--task", "mrpc", "--data-dir",
        str(glue_dir), "--cache", path, "--batch-size", "4", "--max-length", "40",
        "--chunk-tokens", "64", "--shard-chunks", "2", "--device", "cpu", "--quiet",
        "--layers", "all",
    ]  # fmt: skip
    env = dict(os.environ)
    if cluster == "scheduler":
        args += ["--scheduler", client.scheduler.address]
        client.run(_set_env, {UNIT_DELAY_ENV: "0.4"})
    else:
        args += ["--workers", "2"]
        env[UNIT_DELAY_ENV] = "0.4"  # inherited by the workers the CLI starts
    proc = subprocess.Popen(
        [sys.executable, "-c", CLIENT_SCRIPT, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,  # its own process group: the test can see every child go
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                flags = zarr.open_group(path, mode="r")["train"]["units_done"][:]
            except Exception:  # not created yet
                flags = np.zeros(1)
            if flags.sum() >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGKILL)  # the client only; its workers must notice
        proc.wait()
        if cluster == "workers":
            assert _group_gone(proc.pid, timeout=30), "local workers outlived their client"
    finally:
        client.run(_set_env, {UNIT_DELAY_ENV: None})
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert not open_cache(path, allow_incomplete=True).complete
    time.sleep(1.0)  # in-flight units of the --scheduler run may still land (same bytes)
    result = extract_distributed(
        config_for(tiny_models["bert"], glue_dir, path), client=client, progress=False
    )
    assert result.resumed
    assert_identical(path, reference)


def _group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


@pytest.fixture
def s3_server(monkeypatch, client):
    """A moto S3 server on loopback, its credentials in the env of this process and workers."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    client.run(_set_env, env)
    import boto3

    boto3.client("s3").create_bucket(Bucket="sherl-test")
    try:
        yield "s3://sherl-test"
    finally:
        client.run(_set_env, dict.fromkeys(env))
        server.stop()


def test_s3_cache_is_bit_identical_and_trainable(
    client, s3_server, tiny_models, glue_dir, reference, tmp_path
):
    url = f"{s3_server}/caches/mrpc-bert"
    messages: list[str] = []
    config = config_for(tiny_models["bert"], glue_dir, url)
    result = extract_distributed(config, client=client, report=messages.append, progress=False)
    assert result.path == url
    assert_identical(url, reference)
    cache = open_cache(url)
    np.testing.assert_array_equal(
        cache.hidden("validation", 4, 3), open_cache(reference).hidden("validation", 4, 3)
    )
    # Stage two reads the same URL (credentials and endpoint from the environment).
    from sherl_cache.training.recipe import TrainConfig, train

    run = train(
        TrainConfig(
            cache=url,
            out=tmp_path / "run",
            epochs=1,
            batch_size=8,
            max_train_examples=8,
            device="cpu",
        ),
        progress=False,
    )
    assert json.loads((run.out / "metrics.json").read_text())["best"]


def test_needs_a_cluster(tiny_models, glue_dir, tmp_path):
    config = config_for(tiny_models["bert"], glue_dir, str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="--workers"):
        extract_distributed(config, workers=0)
    with pytest.raises(ConfigError, match="--workers.*--scheduler"):
        extract_distributed(config, workers=2, scheduler="tcp://127.0.0.1:1")


def test_unreachable_scheduler_is_one_line(monkeypatch, tiny_models, glue_dir, tmp_path):
    import sherl_cache.extraction.distributed as dist

    monkeypatch.setattr(dist, "CONNECT_TIMEOUT_S", 1.0)
    config = config_for(tiny_models["bert"], glue_dir, str(tmp_path / "y"))
    with pytest.raises(ConfigError, match="cannot reach the dask scheduler"):
        extract_distributed(config, scheduler="tcp://127.0.0.1:9", progress=False)
