"""Crash safety, integrity and input robustness of stage one (GitHub issue 4).

Kills are real SIGKILLs of real processes: the extraction runs in a child (forked from a
server that has torch preloaded, so each child starts in a second instead of ~10) which kills
itself at a named point (``SHERL_CACHE_TEST_KILL_AT``), plus one ``python -m sherl_cache.cli``
subprocess killed from outside mid-way. After every kill, a rerun with the same arguments
must leave a cache whose files are byte-identical to an uninterrupted run's.
"""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from sherl_cache import open_cache
from sherl_cache.cli import app
from sherl_cache.errors import CacheIncompleteError, CacheLockedError, CacheMismatchError
from sherl_cache.extraction.extract import ExtractConfig, extract
from sherl_cache.store.cache import hidden_name
from sherl_cache.store.verify import verify_cache
from sherl_cache.store.writer import KILL_AT_ENV, UNIT_DELAY_ENV

SETTINGS = {  # many small units (16-token chunks, 2 per shard), few stored layers
    "layers": "0,2",  # stores 0, 2 and 3 (the last layer's input is always kept)
    "max_length": 40,
    "batch_size": 4,
    "chunk_tokens": 16,
    "shard_chunks": 2,
    "device": "cpu",
}
VOLATILE = ("created", "completed", "command")  # manifest fields that name a time or path
ALL_SPLITS = ("train", "validation", "test")  # the unlabelled test split only when named


# --- helpers -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from conftest import build_tiny_model

    return build_tiny_model("bert", tmp_path_factory.mktemp("rel-model") / "bert")


def config_for(model: Path, glue_dir: Path, cache: Path, **overrides) -> ExtractConfig:
    values = dict(model=str(model), task="mrpc", data_dir=glue_dir, cache=str(cache), **SETTINGS)
    return ExtractConfig(**(values | {"splits": ALL_SPLITS} | overrides))


def cli_args(model: Path, glue_dir: Path, cache: Path) -> list[str]:
    args = ["extract", "--model", str(model), "--task", "mrpc", "--data-dir", str(glue_dir)]
    args += ["--cache", str(cache), "--quiet", "--splits", ",".join(ALL_SPLITS)]
    for name, value in SETTINGS.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    return args


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory) -> Path:
    """Smaller than conftest's: still 19 units over three splits, at half the compute."""
    from conftest import write_glue_mrpc

    return write_glue_mrpc(tmp_path_factory.mktemp("rel-glue"), n_train=10, n_dev=4)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model, glue_dir) -> Path:
    """An uninterrupted extraction: what every interrupted-and-resumed one must equal."""
    path = tmp_path_factory.mktemp("rel-ref") / "cache"
    extract(config_for(model, glue_dir, path), progress=False)
    return path


def stored_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(".partial")
    }


def assert_identical(expected: Path, found: Path) -> None:
    """Every array's bytes, every stored file and the manifest (bar times and paths) equal."""
    a, b = stored_files(expected), stored_files(found)
    manifest_a = json.loads(a.pop("zarr.json"))["attributes"]
    manifest_b = json.loads(b.pop("zarr.json"))["attributes"]
    assert sorted(a) == sorted(b)
    assert [name for name in a if a[name] != b[name]] == []
    for field in VOLATILE:
        manifest_a.pop(field, None), manifest_b.pop(field, None)
    assert manifest_a == manifest_b
    ca, cb = open_cache(str(expected)), open_cache(str(found))
    for split in ca.splits:
        for name, array in ca.arrays(split):
            other = dict(cb.arrays(split))[name]
            assert array.dtype == other.dtype and array.shape == other.shape
            assert array[:].tobytes() == other[:].tobytes(), f"{split}/{name}"


def _cli_child(argv: list[str], env: dict[str, str]) -> None:
    """Body of a child process: the real CLI, with the test hooks in its environment."""
    os.environ.update(env)
    sys.argv = ["sherl-cache", *argv]
    from sherl_cache.cli import main

    main()


@pytest.fixture(scope="module")
def forkserver():
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["sherl_cache.cli", "sherl_cache.extraction.extract"])
    return context


def run_child(context, argv: list[str], env: dict[str, str], timeout: float = 300) -> int:
    process = context.Process(target=_cli_child, args=(argv, env))
    process.start()
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()
        pytest.fail(f"child did not finish in {timeout}s")
    return process.exitcode


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def assert_one_line_error(result, *fragments: str, code: int = 2) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == code, (result.exit_code, result.output)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def assert_refused_by_train(path: Path, tmp_path: Path) -> None:
    result = cli("train", "--cache", str(path), "--out", str(tmp_path / "run"), "--quiet")
    assert_one_line_error(result, "incomplete", "sherl-cache extract")


# --- 1. kill at any point, resume, bit-identical ----------------------------------------


KILL_POINTS = [
    "store-created",  # root group and marker exist, no arrays
    "split-created:train",  # some splits' arrays exist, no manifest yet
    "manifest-written",  # all arrays and the manifest, no unit yet
    "unit-done:train:0",  # after one unit
    "unit-partly-written:train:3",  # units 0-2 done, unit 3 has input_ids + one layer only
    "unit-written:validation:1",  # all shards of a unit stored, its flag not yet
    "before-finalize",  # every unit flagged, `complete` still false
]


@pytest.mark.slow
@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_then_rerun_is_bit_identical(
    tmp_path, model, glue_dir, reference, forkserver, point
):
    path = tmp_path / "cache"
    code = run_child(forkserver, cli_args(model, glue_dir, path), {KILL_AT_ENV: point})
    assert code == -signal.SIGKILL

    with pytest.raises(CacheIncompleteError, match="sherl-cache extract"):
        open_cache(str(path))
    assert_refused_by_train(path, tmp_path)
    if point.startswith("unit-partly-written"):
        root = zarr.open_group(str(path), mode="r")
        assert list(root["train"]["units_done"][:4]) == [1, 1, 1, 0]
        assert (path / "train" / "input_ids" / "c" / "3").is_file()  # written, not taken as done
        assert not (path / "train" / hidden_name(3) / "c" / "3" / "0").exists()

    messages: list[str] = []
    result = extract(config_for(model, glue_dir, path), report=messages.append, progress=False)
    torn = point in ("store-created", "split-created:train")
    assert result.resumed is not torn
    assert any(("re-creating" if torn else "resuming") in m for m in messages)
    assert_identical(reference, path)


def test_store_torn_by_an_older_version_is_redone(tmp_path, model, glue_dir, reference):
    """Older versions wrote the manifest before the arrays; such a torn store is redone too."""
    path = tmp_path / "cache"
    shutil.copytree(reference, path)
    root = zarr.open_group(str(path), mode="r+")
    root.attrs["complete"] = False
    shutil.rmtree(path / "test")  # the kill landed before the last split was created
    with pytest.raises(CacheIncompleteError):
        open_cache(str(path))
    messages: list[str] = []
    extract(config_for(model, glue_dir, path), report=messages.append, progress=False)
    assert any("re-creating" in m for m in messages)
    assert_identical(reference, path)


@pytest.mark.slow
def test_external_sigkill_of_cli_subprocess_and_lock(tmp_path, model, glue_dir, reference):
    """A real ``python -m sherl_cache.cli extract`` killed from outside while writing."""
    path = tmp_path / "cache"
    env = os.environ | {UNIT_DELAY_ENV: "0.3"}  # slow writes so the kill lands mid-way
    process = subprocess.Popen(
        [sys.executable, "-m", "sherl_cache.cli", *cli_args(model, glue_dir, path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        flags = path / "train" / "units_done" / "c"
        deadline = time.monotonic() + 240
        while not (flags.is_dir() and len(list(flags.iterdir())) >= 2):
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "extraction never got going"
            time.sleep(0.05)
        # While it runs, a second extraction of the same cache is refused, not interleaved.
        with pytest.raises(CacheLockedError, match="another sherl-cache process"):
            extract(config_for(model, glue_dir, path), progress=False)
        assert_one_line_error(
            cli(*cli_args(model, glue_dir, path)), "another sherl-cache process is writing"
        )
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    with pytest.raises(CacheIncompleteError):
        open_cache(str(path))
    result = extract(config_for(model, glue_dir, path), progress=False)
    assert result.resumed
    assert_identical(reference, path)


# --- 5. disk full ------------------------------------------------------------------------


@pytest.fixture
def disk_fills_up(monkeypatch):
    """Make the n-th store write fail with ENOSPC, as a full disk would."""
    from zarr.storage import LocalStore

    real_set = LocalStore.set
    state = {"writes": 0, "fail_at": None}

    async def set_or_fail(self, key, value):
        state["writes"] += 1
        if state["fail_at"] is not None and state["writes"] >= state["fail_at"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), key)
        return await real_set(self, key, value)

    monkeypatch.setattr(LocalStore, "set", set_or_fail)

    def fail_at(n: int | None) -> None:
        state["writes"], state["fail_at"] = 0, n

    return fail_at


@pytest.mark.parametrize("fail_at", [3, 80], ids=["while-creating", "while-writing-units"])
def test_disk_full_stops_cleanly_and_resumes(
    tmp_path, model, glue_dir, reference, disk_fills_up, fail_at
):
    path = tmp_path / "cache"
    disk_fills_up(fail_at)
    result = cli(*cli_args(model, glue_dir, path))
    assert_one_line_error(result, "writing the cache failed", "No space left", "re-run")
    with pytest.raises(CacheIncompleteError):
        open_cache(str(path))

    disk_fills_up(None)  # space freed
    # Once units exist, other chunk options on the rerun must not matter: the first run's
    # geometry is kept (a store torn during creation has none yet and is simply redone).
    other_geometry = {"chunk_tokens": 64, "shard_chunks": 4} if fail_at > 3 else {}
    extract(config_for(model, glue_dir, path, **other_geometry), progress=False)
    assert_identical(reference, path)


# --- 2 + 4. incomplete and mismatched caches are refused by training ----------------------


def test_train_refuses_mismatched_caches(tmp_path, model, glue_dir, reference):
    out = str(tmp_path / "run")
    result = cli("train", "--cache", str(reference), "--task", "sst2", "--out", out, "--quiet")
    assert_one_line_error(result, "'mrpc'", "'sst2'", "sherl-cache extract")

    from conftest import build_tiny_model

    other = build_tiny_model("bert", tmp_path / "other", seed=1)
    result = cli("train", "--cache", str(reference), "--model", str(other), "--out", out)
    assert_one_line_error(result, "model.weights_sha256")

    result = cli("train", "--task", "mrpc", "--model", str(model), "--cache-root", str(tmp_path))
    assert_one_line_error(result, "no cache for task mrpc", "sherl-cache extract")


# --- 3. verify -----------------------------------------------------------------------------


@pytest.fixture
def copy_of(reference, tmp_path) -> Path:
    path = tmp_path / "copy"
    shutil.copytree(reference, path)
    return path


def example_span(cache_path: Path, split: str, start: int, stop: int) -> str:
    offsets = open_cache(str(cache_path)).offsets(split)
    first = int(np.searchsorted(offsets, start, side="right")) - 1
    last = int(np.searchsorted(offsets, stop, side="left")) - 1
    return f"tokens {start}-{stop - 1}, examples {first}-{last}"


def test_verify_passes_a_good_cache_and_recomputes(reference):
    result = cli("verify", str(reference), "--recompute", "6", "--seed", "3")
    assert result.exit_code == 0, result.output
    assert "result     OK" in result.stdout
    assert "recomputed 6 examples" in result.stdout


def test_verify_names_corrupt_and_missing_shards(copy_of):
    shard = 32  # tokens per shard in SETTINGS
    corrupt = copy_of / "train" / hidden_name(2) / "c" / "3" / "0"
    blob = bytearray(corrupt.read_bytes())
    blob[10] ^= 0xFF  # inside chunk 0 of the shard
    corrupt.write_bytes(bytes(blob))
    index_hit = copy_of / "test" / hidden_name(0) / "c" / "1" / "0"
    blob = bytearray(index_hit.read_bytes())
    blob[-5] ^= 0x01  # inside the shard index
    index_hit.write_bytes(bytes(blob))
    (copy_of / "validation" / "input_ids" / "c" / "1").unlink()
    # Zarr itself reads the missing shard as zeros, without a word: why verify exists.
    assert not open_cache(str(copy_of)).split_group("validation")["input_ids"][32:64].any()

    result = cli("verify", str(copy_of))
    assert result.exit_code == 1, result.output
    out = result.stdout
    assert "problems   3" in out
    span = example_span(copy_of, "train", 3 * shard, 3 * shard + 16)
    assert f"train/hidden_002: checksum mismatch in chunk 0 of shard c/3/0 ({span})" in out
    span = example_span(copy_of, "validation", shard, 2 * shard)
    assert f"validation/input_ids: shard c/1 is missing (its unit is flagged done) ({span})" in out
    assert "test/hidden_000: shard c/1/0 is truncated or its index fails its checksum" in out
    assert "FAILED" in out


def test_verify_checks_units_done_and_incomplete_caches(copy_of):
    (copy_of / "train" / "units_done" / "c" / "2").unlink()
    report = verify_cache(str(copy_of))
    assert [str(p).split(" (")[0] for p in report.problems] == [
        "train/units_done: unit 2 is not flagged done in a cache marked complete"
    ]
    zarr.open_group(str(copy_of), mode="r+").attrs["complete"] = False
    result = cli("verify", str(copy_of))
    assert result.exit_code == 1
    assert "the cache is incomplete" in result.stdout
    assert "finish it with: sherl-cache extract" in result.stdout


def test_verify_recompute_catches_wrong_values(copy_of, model, tmp_path):
    array = zarr.open_group(str(copy_of), mode="r+")["validation"][hidden_name(3)]
    array[:] = (array[:].astype(np.float32) * 1.5).astype(array.dtype)  # valid checksums
    report = verify_cache(str(copy_of), recompute=100, device="cpu")
    assert report.recomputed == 20  # every example of the cache, and no more
    wrong = {(p.split, p.array) for p in report.problems}
    assert wrong == {("validation", hidden_name(3))}
    assert len(report.problems) == 4  # every validation example

    # The manifest's model id gone: the recorded model_path is used instead.
    root = zarr.open_group(str(copy_of), mode="r+")
    root.attrs["model"] = root.attrs["model"] | {"model_id": str(tmp_path / "gone")}
    assert verify_cache(str(copy_of), recompute=2).recomputed == 2

    from conftest import build_tiny_model

    other = build_tiny_model("bert", tmp_path / "other", seed=1)
    result = cli("verify", str(copy_of), "--recompute", "1", "--model", str(other))
    assert_one_line_error(result, "model.weights_sha256")


def test_verify_of_a_missing_or_torn_store_is_one_line(tmp_path):
    assert_one_line_error(cli("verify", str(tmp_path / "nothing")), "no cache at")
    zarr.open_group(str(tmp_path / "torn"), mode="w", attributes={"format": "sherl-cache",
        "format_version": 1, "creating": True, "command": "sherl-cache extract --x"})  # fmt: skip
    assert_one_line_error(cli("verify", str(tmp_path / "torn")), "never fully created")


# --- 6. bad input sweep ------------------------------------------------------------------

GOOD_ROWS = ["a good sentence .", "the market fell .", "police said that .", "he was there ."]


def csv_text(rows: list[tuple[str, str]], header: str = "sentence,label") -> str:
    return header + "\n" + "".join(f"{text},{label}\n" for text, label in rows)


def good_csv(labels=("0", "1", "0", "1")) -> str:
    return csv_text(list(zip(GOOD_ROWS, labels, strict=True)))


# name -> (files {split: (suffix, bytes)}, extra CLI args, expected: "ok" or error fragment)
BAD_INPUTS = {
    "non-utf8": (
        {"train": (".csv", good_csv().encode() + b"caf\xe9 au lait,1\n")},
        [],
        "line 6: not valid UTF-8",
    ),
    "bom-is-stripped": ({"train": (".csv", "\ufeff".encode() + good_csv().encode())}, [], "ok"),
    "ragged-tsv": (
        {"train": (".tsv", b"sentence\tlabel\na b .\t0\nc d .\t1\textra\n")},
        [],
        "line 3: expected 2 fields",
    ),
    "tab-inside-tsv-text": (
        {"train": (".tsv", b"sentence\tlabel\na b .\t0\nc\td .\t1\n")},
        [],
        "a tab inside a text splits it",
    ),
    "quotes-in-tsv-are-text": (
        {"train": (".tsv", b'sentence\tlabel\nhe said "hi .\t0\n"quoted" text\t1\n')},
        [],
        "ok",
    ),
    "quotes-and-commas-in-csv": (
        {"train": (".csv", b'sentence,label\n"a, b ""c"" .",0\nplain .,1\n')},
        [],
        "ok",
    ),
    "empty-strings": ({"train": (".csv", b'sentence,label\n"",0\n,1\nthe end .,0\n')}, [], "ok"),
    "label-out-of-range": (
        {"train": (".csv", good_csv(("0", "1", "5", "1")).encode())},
        ["--task", "sst2"],
        "row 3: label '5'",
    ),
    "label-of-wrong-type": (
        {"train": (".csv", good_csv(("0", "1", "maybe", "1")).encode())},
        ["--task", "sst2"],
        "label 'maybe'",
    ),
    "label-unseen-in-train": (
        {"train": (".csv", good_csv().encode()), "validation": (".csv", good_csv("0127").encode())},
        [],
        "does not occur in the train split",
    ),
    "non-numeric-regression-label": (
        {"train": (".csv", good_csv(("0.5", "1.5", "high", "2.0")).encode())},
        ["--task", "stsb", "--text-columns", "sentence", "--label-column", "label"],
        "is not a number",
    ),
    "split-with-zero-rows": ({"train": (".csv", b"sentence,label\n")}, [], "no data rows"),
    "empty-file": ({"train": (".jsonl", b"")}, [], "is empty"),
    "duplicate-column-names": (
        {"train": (".csv", b"sentence,label,label\na .,0,1\nb .,1,0\n")},
        [],
        "more than one column named 'label'",
    ),
    "null-text-in-jsonl": (
        {"train": (".jsonl", b'{"sentence": "a .", "label": 0}\n{"sentence": null, "label": 1}\n')},
        [],
        "row 2: text column 'sentence' is null",
    ),
    "missing-text-column": ({"train": (".csv", b"text,label\na .,0\nb .,1\n")}, [], "no column"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(tmp_path, model, case):
    files, extra, expected = BAD_INPUTS[case]
    paths = []
    for split, (suffix, content) in files.items():
        (tmp_path / f"{split}{suffix}").write_bytes(content)
        paths.append(f"{split}={tmp_path / f'{split}{suffix}'}")
    args = ["extract", "--model", str(model), "--data", ",".join(paths), "--quiet"]
    args += ["--cache-root", str(tmp_path / "caches"), "--max-length", "16"]
    if "--task" not in extra or "--text-columns" not in extra:
        args += ["--text-columns", "sentence"]
    if "--task" not in extra:
        args += ["--label-column", "label"]
    result = cli(*args, *extra)
    caches = sorted((tmp_path / "caches").glob("*")) if (tmp_path / "caches").exists() else []
    if expected != "ok":
        assert_one_line_error(result, expected)
        assert caches == []  # refused before any store exists: nothing can look complete
        return
    assert result.exit_code == 0, result.output
    cache = open_cache(result.stdout.strip().splitlines()[-1])
    assert cache.complete and verify_cache(cache.path).ok
    rows = cache.num_examples("train")
    assert rows == len(files["train"][1].decode("utf-8-sig").strip().splitlines()) - 1
    if case == "empty-strings":  # kept as rows of just [CLS] [SEP]; indices do not shift
        assert list(np.diff(cache.offsets("train"))[:2]) == [2, 2]
    if case == "bom-is-stripped":  # same rows as without the BOM: same content fingerprint
        (tmp_path / "plain.csv").write_text(good_csv())
        from sherl_cache.data.files import load_files

        plain = load_files({"train": tmp_path / "plain.csv"}, ("sentence",), "label")
        assert cache.manifest["data"]["splits"]["train"]["fingerprint"] == (
            plain.splits["train"].fingerprint()
        )


def test_truncation_is_recorded_and_shown_by_info(tmp_path, model):
    long = " ".join(["market"] * 60) + " ."
    (tmp_path / "train.csv").write_text(csv_text([(long, "0"), ("short .", "1"), (long, "1")]))
    config = ExtractConfig(
        model=str(model),
        data_files={"train": tmp_path / "train.csv"},
        text_columns=("sentence",),
        label_column="label",
        cache=str(tmp_path / "c"),
        **SETTINGS,
    )
    extract(config, progress=False)
    cache = open_cache(str(tmp_path / "c"))
    assert cache.manifest["splits"]["train"]["truncated"] == 2
    lengths = np.diff(cache.offsets("train"))
    assert lengths[0] == lengths[2] == 40 and lengths[1] < 40
    result = cli("info", str(tmp_path / "c"))
    assert result.exit_code == 0 and "truncated 2" in result.stdout


def test_failed_extraction_leaves_no_complete_looking_cache(tmp_path, glue_dir):
    """An error after the store exists (float16 overflow in the first unit) leaves it refused,
    and a rerun with a fixed option is told the path holds other inputs, not merged into it."""
    import torch
    from conftest import build_tiny_model
    from transformers import AutoModel

    from sherl_cache.errors import NumericOverflowError

    folder = build_tiny_model("bert", tmp_path / "huge")
    net = AutoModel.from_pretrained(folder)
    with torch.no_grad():
        net.embeddings.LayerNorm.weight.mul_(1e6)
    net.save_pretrained(folder)
    path = tmp_path / "cache"
    with pytest.raises(NumericOverflowError):
        extract(config_for(folder, glue_dir, path, dtype="float16"), progress=False)
    with pytest.raises(CacheIncompleteError):
        open_cache(str(path))
    assert not verify_cache(str(path)).ok
    with pytest.raises(CacheMismatchError, match="field dtype"):
        extract(config_for(folder, glue_dir, path, dtype="float32"), progress=False)
