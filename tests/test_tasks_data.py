"""The GLUE registry and the loaders: exact rows and labels, and one clear line for bad input."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sherl_cache.data.files import SPLITS, SplitData, load_files, load_glue, parse_data_option
from sherl_cache.data.tasks import GLUE_TASKS, METRIC_NAMES, Problem, custom_task, get_task
from sherl_cache.errors import ConfigError, DataError

# --------------------------------------------------------------------------- helpers


def write_tsv(path: Path, header: list[str] | None, rows: list[list[str]], bom: str = "") -> Path:
    """GLUE-style TSV: tab separated, no quoting, so quotes in text stay as they are."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ([header] if header else []) + rows
    path.write_text(bom + "".join("\t".join(r) + "\n" for r in lines), encoding="utf-8")
    return path


def read_plain_tsv(path: Path) -> list[list[str]]:
    """Independent reference parser for the tests' own TSV files."""
    text = path.read_text(encoding="utf-8-sig")
    return [line.split("\t") for line in text.splitlines() if line]


# --------------------------------------------------------------------------- registry


def test_registry_holds_the_nine_glue_tasks_consistently() -> None:
    assert list(GLUE_TASKS) == [
        "cola",
        "sst2",
        "mrpc",
        "qqp",
        "stsb",
        "mnli",
        "qnli",
        "rte",
        "wnli",
    ]
    for key, task in GLUE_TASKS.items():
        assert task.name == key and task.hub == ("nyu-mll/glue", key)
        assert task.glue_folder and task.label_column and task.id_column
        assert set(SPLITS) <= set(task.split_files)
        assert len(task.text_columns) in (1, 2)
        assert task.hub_text_columns is not None
        assert len(task.hub_text_columns) == len(task.text_columns)
        assert set(task.metrics) <= set(METRIC_NAMES) and task.main_metric in task.metrics
        if task.problem is Problem.CLASSIFICATION:
            assert task.label_names and task.num_labels == len(task.label_names) >= 2
        else:
            assert task.label_names is None and task.num_labels == 1
        hash(task)  # usable as a dict key despite its mapping fields
        with pytest.raises(TypeError):
            task.split_files["train"] = "x.tsv"  # type: ignore[index]


def test_registry_glue_specifics() -> None:
    mnli = get_task("mnli")
    assert mnli.label_names == ("entailment", "neutral", "contradiction")  # HF order
    assert mnli.split_files["validation"] == "dev_matched.tsv"
    assert mnli.split_files["test_mismatched"] == "test_mismatched.tsv"
    assert get_task("mrpc").text_columns == ("#1 String", "#2 String")
    assert get_task("mrpc").label_names == ("not_equivalent", "equivalent")
    assert get_task("wnli").label_names == ("not_entailment", "entailment")
    assert get_task("rte").label_names == get_task("qnli").label_names
    assert get_task("qqp").id_column == "id"
    assert get_task("cola").metrics == ("matthews",)
    assert get_task("cola").headerless_columns["train"][1] == "label"
    stsb = get_task("stsb")
    assert stsb.problem is Problem.REGRESSION and stsb.main_metric == "pearson"
    assert stsb.metrics == ("pearson", "spearman")
    assert get_task("qqp").metrics == get_task("mrpc").metrics == ("accuracy", "f1")


@pytest.mark.parametrize(
    ("alias", "name"),
    [("SST-2", "sst2"), ("sts-b", "stsb"), ("MRPC", "mrpc"), (" CoLA ", "cola"), ("sst_2", "sst2")],
)
def test_get_task_aliases(alias: str, name: str) -> None:
    assert get_task(alias).name == name


def test_get_task_unknown_name_lists_the_choices() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown task 'foo' \(--task\): choose one of cola, sst2"
    ):
        get_task("foo")


def test_custom_task_metrics_and_validation() -> None:
    binary = custom_task(["text"], "label", ["neg", "pos"], "classification")
    assert binary.metrics == ("accuracy", "f1") and binary.num_labels == 2
    assert custom_task(["a", "b"], "y", list("xyz"), Problem.CLASSIFICATION).metrics == (
        "accuracy",
    )
    regression = custom_task(["text"], "score", None, "regression")
    assert regression.main_metric == "pearson" and regression.num_labels == 1
    with pytest.raises(ConfigError, match="at least two labels"):
        custom_task(["text"], "label", ["only"], "classification")
    with pytest.raises(ConfigError, match="--text-columns"):
        custom_task(["a", "b", "c"], "label", ["x", "y"], "classification")
    with pytest.raises(ConfigError, match="unknown problem"):
        custom_task(["text"], "label", ["x", "y"], "ranking")


# --------------------------------------------------------------------------- GLUE folders


def test_load_synthetic_mrpc(glue_dir: Path) -> None:
    data = load_glue(get_task("mrpc"), glue_dir)
    assert list(data.splits) == ["train", "validation", "test"]
    assert data.source == f"glue:{glue_dir / 'MRPC'}"
    for split, file in (("train", "train.tsv"), ("validation", "dev.tsv")):
        rows = read_plain_tsv(glue_dir / "MRPC" / file)[1:]
        got = data.splits[split]
        assert len(got) == len(rows)
        assert got.texts[0] == [r[3] for r in rows] and got.texts[1] == [r[4] for r in rows]
        assert got.labels is not None and got.labels.dtype == np.int64
        assert got.labels.tolist() == [int(r[0]) for r in rows]
        assert got.ids == [str(i) for i in range(len(rows))]
    test = data.splits["test"]
    assert test.labels is None and len(test) == 6
    assert test.ids == [r[0] for r in read_plain_tsv(glue_dir / "MRPC" / "test.tsv")[1:]]


def test_glue_keeps_quotes_verbatim_and_strips_bom(tmp_path: Path) -> None:
    header = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    rows = [
        ["1", "1", "2", '" The pie business does not fit', 'He said " 100 percent " , yes'],
        ["0", "3", "4", 'a "quoted, comma" text', "café ✓ ''"],
    ]
    mrpc = tmp_path / "MRPC"
    write_tsv(mrpc / "train.tsv", header, rows, bom="\ufeff")
    write_tsv(mrpc / "dev.tsv", header, rows, bom="\ufeff")
    data = load_glue(get_task("mrpc"), tmp_path)
    assert "test" not in data.splits  # absent test is skipped when splits are not named
    assert data.splits["train"].texts == ([r[3] for r in rows], [r[4] for r in rows])
    assert data.splits["validation"].labels.tolist() == [1, 0]


def test_glue_folder_found_case_insensitively_or_given_directly(tmp_path: Path) -> None:
    header = ["sentence", "label"]
    write_tsv(tmp_path / "sst2" / "train.tsv", header, [["good", "1"], ["bad", "0"]])
    write_tsv(tmp_path / "sst2" / "dev.tsv", header, [["fine", "1"]])
    assert len(load_glue(get_task("SST-2"), tmp_path).splits["train"]) == 2
    assert len(load_glue(get_task("sst2"), tmp_path / "sst2").splits["validation"]) == 1


def test_load_cola_without_header(tmp_path: Path) -> None:
    rows = [
        ["gj04", "1", "", "Our friends won't buy this analysis, let alone the next one."],
        ["gj04", "0", "*", 'They drank the pub " dry.'],
        ["cj99", "1", "", "The more you eat, the fatter you get."],
    ]
    write_tsv(tmp_path / "CoLA" / "train.tsv", None, rows)
    write_tsv(tmp_path / "CoLA" / "dev.tsv", None, rows[:2])
    write_tsv(tmp_path / "CoLA" / "test.tsv", ["index", "sentence"], [["0", "Bill left."]])
    data = load_glue(get_task("cola"), tmp_path)
    train = data.splits["train"]
    assert train.texts == ([r[3] for r in rows],)
    assert train.labels.tolist() == [1, 0, 1]
    assert data.splits["test"].texts == (["Bill left."],) and data.splits["test"].ids == ["0"]


def test_load_stsb_scores_as_float32(tmp_path: Path) -> None:
    header = ["index", "genre", "filename", "year", "old_index", "source1", "source2"]
    header += ["sentence1", "sentence2", "score"]
    meta = ["main-captions", "MSRvid", "2012test", "1", "none", "none"]
    rows = [["0", *meta, "A plane.", "A jet.", "5.000"], ["1", *meta, "A man.", "A dog.", "0.600"]]
    write_tsv(tmp_path / "STS-B" / "train.tsv", header, rows)
    write_tsv(tmp_path / "STS-B" / "dev.tsv", header, rows[::-1])
    write_tsv(tmp_path / "STS-B" / "test.tsv", header[:-1], [r[:-1] for r in rows])
    data = load_glue(get_task("sts-b"), tmp_path)
    labels = data.splits["train"].labels
    assert labels.dtype == np.float32 and labels.tolist() == pytest.approx([5.0, 0.6])
    assert data.splits["validation"].ids == ["1", "0"]
    assert data.splits["test"].labels is None


def test_load_mnli_with_string_labels_and_mismatched_sets(tmp_path: Path) -> None:
    header = ["index", "promptID", "pairID", "genre", "sentence1", "sentence2", "gold_label"]
    rows = [
        ["0", "1", "1e", "fiction", "The cat sat.", "A cat sat.", "entailment"],
        ["1", "2", "2c", "fiction", "It rained.", "It was dry.", "contradiction"],
        ["2", "3", "3n", "slate", "He left.", "He left early.", "neutral"],
    ]
    folder = tmp_path / "MNLI"
    for name in ("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"):
        write_tsv(folder / name, header, rows)
    write_tsv(folder / "test_matched.tsv", header[:-1], [r[:-1] for r in rows])
    data = load_glue(get_task("mnli"), tmp_path)
    assert list(data.splits) == ["train", "validation", "test"]
    assert data.splits["train"].labels.tolist() == [0, 2, 1]
    assert data.splits["test"].labels is None
    named = load_glue(get_task("mnli"), tmp_path, ["validation_mismatched", "train"])
    assert list(named.splits) == ["train", "validation_mismatched"]
    with pytest.raises(DataError, match="test_mismatched.tsv not found"):
        load_glue(get_task("mnli"), tmp_path, ["test_mismatched"])


def test_load_rte_accepts_names_and_indices(tmp_path: Path) -> None:
    header = ["index", "sentence1", "sentence2", "label"]
    rows = [["0", "A.", "B.", "not_entailment"], ["1", "C.", "D.", "entailment"]]
    write_tsv(tmp_path / "RTE" / "train.tsv", header, rows)
    write_tsv(tmp_path / "RTE" / "dev.tsv", header, [["7", "E.", "F.", "1"]])
    data = load_glue(get_task("rte"), tmp_path)
    assert data.splits["train"].labels.tolist() == [1, 0]
    assert data.splits["validation"].labels.tolist() == [1]
    assert data.splits["train"].ids == ["0", "1"] and data.splits["validation"].ids == ["7"]


@pytest.mark.real
def test_real_mrpc(real_glue_dir: Path) -> None:
    data = load_glue(get_task("mrpc"), real_glue_dir)
    lines = {
        name: (real_glue_dir / "MRPC" / file).read_bytes().count(b"\n") - 1
        for name, file in (("train", "train.tsv"), ("validation", "dev.tsv"), ("test", "test.tsv"))
    }
    assert {name: len(split) for name, split in data.splits.items()} == lines
    # GLUE's MRPC train has 3668 pairs; the shared copy holds 3667 rows (one fewer line).
    assert len(data.splits["train"]) in (3667, 3668)
    assert len(data.splits["validation"]) == 408 and len(data.splits["test"]) == 1725
    assert data.splits["validation"].labels.mean() == pytest.approx(0.684, abs=5e-4)
    assert data.splits["test"].labels is None
    # Unmatched quotes survive because quoting is off.
    first_dev = data.splits["validation"].texts[1][0]
    assert first_dev.startswith('" The foodservice pie business')


# --------------------------------------------------------------------------- hub fallback


class _FakeHubSplit:
    def __init__(self, columns: dict[str, list]) -> None:
        self.columns = columns

    def to_dict(self) -> dict[str, list]:
        return self.columns


def test_hub_fallback_maps_columns_and_unlabelled_test(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def load_dataset(repo: str, config: str) -> dict[str, _FakeHubSplit]:
        calls.append((repo, config))
        split = {"premise": ["p1", "p2"], "hypothesis": ["h1", "h2"], "idx": [0, 1]}
        return {
            "train": _FakeHubSplit({**split, "label": [0, 2]}),
            "validation_matched": _FakeHubSplit({**split, "label": [1, 1]}),
            "test_matched": _FakeHubSplit({**split, "label": [-1, -1]}),
        }

    fake = types.ModuleType("datasets")
    fake.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    data = load_glue(get_task("mnli"), None)
    assert calls == [("nyu-mll/glue", "mnli")] and data.source == "hub:nyu-mll/glue/mnli"
    assert data.splits["train"].texts == (["p1", "p2"], ["h1", "h2"])
    assert data.splits["validation"].labels.tolist() == [1, 1]
    assert data.splits["test"].labels is None and data.splits["test"].ids == ["0", "1"]


def test_hub_failures_are_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ConfigError, match="pass --data-dir"):
        load_glue(get_task("mrpc"), None)

    def offline(repo: str, config: str) -> None:
        raise ConnectionError("no network\nsecond line")

    fake = types.ModuleType("datasets")
    fake.load_dataset = offline  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DataError, match=r"ConnectionError: no network\); pass --data-dir") as info:
        load_glue(get_task("mrpc"), None)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- user files

ROWS = [  # commas, doubled and unmatched quotes, non-ASCII and empty text, all kept verbatim
    {"uid": "a1", "text": 'He said "hi, there"', "other": "b, c", "label": 1},
    {"uid": "a2", "text": '" unmatched quote', "other": "", "label": 0},
    {"uid": "a3", "text": "café ✓ 'single'", "other": "NA", "label": 1},
    {"uid": "a4", "text": "007", "other": "null", "label": 0},
]


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Write ``rows`` in the format named by the suffix, each format's natural way."""
    names = list(rows[0])
    if path.suffix == ".csv":
        with path.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(names)
            writer.writerows([[r[n] for n in names] for r in rows])
    elif path.suffix == ".tsv":
        write_tsv(path, names, [[str(r[n]) for n in names] for r in rows])
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


FORMATS = (".csv", ".tsv", ".jsonl", ".parquet")


def test_every_format_gives_identical_splits(tmp_path: Path) -> None:
    loaded = {}
    for suffix in FORMATS:
        files = {
            "train": write_rows(tmp_path / f"train{suffix}", ROWS),
            "validation": write_rows(tmp_path / f"dev{suffix}", ROWS[::-1]),
        }
        loaded[suffix] = load_files(files, ["text", "other"], "label", id_column="uid")
    reference = loaded[".csv"]
    train = reference.splits["train"]
    assert train.texts == ([r["text"] for r in ROWS], [r["other"] for r in ROWS])
    assert train.labels.tolist() == [1, 0, 1, 0] and train.ids == ["a1", "a2", "a3", "a4"]
    assert reference.task.label_names == ("0", "1") and reference.task.name == "custom"
    for suffix, data in loaded.items():
        assert data.task == reference.task, suffix
        for name, split in data.splits.items():
            other = reference.splits[name]
            assert split.texts == other.texts and split.ids == other.ids, suffix
            assert np.array_equal(split.labels, other.labels), suffix
            assert split.fingerprint() == other.fingerprint(), suffix
    assert loaded[".jsonl"].source.startswith("files:train=")


def test_fingerprint_is_order_and_label_sensitive_and_stable(glue_dir: Path) -> None:
    split = load_glue(get_task("mrpc"), glue_dir).splits["train"]
    labels = split.labels.copy()
    labels[3] = 1 - labels[3]
    changed = SplitData(split.name, split.texts, labels, split.ids)
    assert changed.fingerprint() != split.fingerprint()
    swapped = SplitData(split.name, (split.texts[1], split.texts[0]), split.labels, split.ids)
    assert swapped.fingerprint() != split.fingerprint()
    unlabelled = SplitData(split.name, split.texts, None, split.ids)
    assert unlabelled.fingerprint() != split.fingerprint()
    assert SplitData("other", split.texts, split.labels, split.ids).fingerprint() == (
        split.fingerprint()
    )
    code = (
        "from pathlib import Path; from sherl_cache.data.files import load_glue; "
        "from sherl_cache.data.tasks import get_task; "
        f"print(load_glue(get_task('mrpc'), Path({str(glue_dir)!r})).splits['train'].fingerprint())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == split.fingerprint()


def test_label_inference(tmp_path: Path) -> None:
    def load(train: list, dev: list | None = None, suffix: str = ".jsonl"):
        files = {"train": write_rows(tmp_path / f"t{suffix}", [{"t": "x", "y": v} for v in train])}
        if dev is not None:
            files["validation"] = write_rows(
                tmp_path / f"v{suffix}", [{"t": "x", "y": v} for v in dev]
            )
        return load_files(files, ["t"], "y")

    regression = load([0.5, 1, 3.25])
    assert regression.task.problem is Problem.REGRESSION
    assert regression.splits["train"].labels.dtype == np.float32
    numeric = load([2, 10, 2, 1], [10.0])  # integers sort numerically, 10.0 is class "10"
    assert numeric.task.label_names == ("1", "2", "10")
    assert numeric.splits["train"].labels.tolist() == [1, 2, 1, 0]
    assert numeric.splits["validation"].labels.tolist() == [2]
    text = load(["pos", "neg", "neutral"], ["neg"], suffix=".csv")
    assert text.task.label_names == ("neg", "neutral", "pos")
    assert text.task.metrics == ("accuracy",)


def test_test_split_without_labels_and_given_task(tmp_path: Path) -> None:
    train = write_rows(
        tmp_path / "train.csv", [{"s": "good", "y": "positive"}, {"s": "bad", "y": 0}]
    )
    test = write_rows(tmp_path / "test.csv", [{"s": "meh", "index": "9"}])
    hf_test = write_rows(tmp_path / "hf.jsonl", [{"s": "meh", "y": -1}])
    data = load_files({"train": train, "test": test}, ["s"], "y", task=get_task("sst2"))
    assert data.splits["train"].labels.tolist() == [1, 0]
    assert data.splits["test"].labels is None and data.splits["test"].ids == ["9"]
    assert data.task.metrics == ("accuracy",) and data.task.text_columns == ("s",)
    hf = load_files({"test": hf_test}, ["s"], "y", task=get_task("sst2"))
    assert hf.splits["test"].labels is None
    nan_test = tmp_path / "nan.parquet"
    pq.write_table(pa.table({"s": ["a", "b"], "y": [float("nan"), None]}), nan_test)
    assert (
        load_files({"test": nan_test}, ["s"], "y", task=get_task("sst2")).splits["test"].labels
        is None
    )


def test_parse_data_option() -> None:
    assert parse_data_option("train=a.csv, validation = b/dev.jsonl") == {
        "train": Path("a.csv"),
        "validation": Path("b/dev.jsonl"),
    }


# --------------------------------------------------------------------------- bad input

Case = Callable[[Path], object]


def _mrpc_copy(root: Path, skip: str = "") -> Path:
    header = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    for name in ("train.tsv", "dev.tsv"):
        if name != skip:
            write_tsv(root / "MRPC" / name, header, [["1", "1", "2", "a", "b"]])
    return root


def _user(root: Path, name: str, content: str | bytes) -> Path:
    path = root / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def _csv_case(content: str | bytes, name: str = "train.csv", **kwargs: object) -> Case:
    def run(root: Path) -> object:
        options = {"text_columns": ["text"], "label_column": "label", **kwargs}
        return load_files({"train": _user(root, name, content)}, **options)  # type: ignore[arg-type]

    return run


def _dev_unseen(root: Path) -> object:
    train = _user(root, "t.csv", "text,label\na,x\nb,y\n")
    dev = _user(root, "d.csv", "text,label\na,x\nb,z\n")
    return load_files({"train": train, "validation": dev}, ["text"], "label")


BAD_INPUTS: list[tuple[str, Case, type[Exception], str]] = [
    (
        "missing data dir",
        lambda root: load_glue(get_task("mrpc"), root / "nope"),
        DataError,
        r"nope does not exist \(--data-dir\)",
    ),
    (
        "missing task folder",
        lambda root: load_glue(get_task("rte"), _mrpc_copy(root)),
        DataError,
        r"no RTE folder in .*--data-dir should be the GLUE root holding RTE/train.tsv",
    ),
    (
        "missing split file",
        lambda root: load_glue(get_task("mrpc"), _mrpc_copy(root, skip="dev.tsv")),
        DataError,
        r"dev.tsv not found: the validation split of mrpc \(--data-dir\)",
    ),
    (
        "named split missing",
        lambda root: load_glue(get_task("mrpc"), _mrpc_copy(root), ["test"]),
        DataError,
        r"test.tsv not found",
    ),
    (
        "unknown glue split",
        lambda root: load_glue(get_task("mrpc"), _mrpc_copy(root), ["dev"]),
        ConfigError,
        r"unknown split 'dev' for task mrpc \(--splits\): choose from train, validation, test",
    ),
    (
        "glue file lacks a column",
        lambda root: load_glue(
            get_task("sst2"),
            write_tsv(root / "SST-2" / "train.tsv", ["text", "label"], [["a", "1"]]).parents[1],
        ),
        DataError,
        r"train.tsv has no column 'sentence' \(--data-dir must hold GLUE's original SST-2 files\)",
    ),
    (
        "cola file of the wrong width",
        lambda root: load_glue(
            get_task("cola"), write_tsv(root / "CoLA" / "train.tsv", None, [["a", "1"]]).parents[1]
        ),
        DataError,
        r"line 1: expected 4 fields \(source, label, original_label, sentence\), found 2",
    ),
    (
        "missing text column",
        _csv_case("sentence,label\nhi,1\n"),
        DataError,
        r"no column 'text' \(--text-columns\); its columns are: 'sentence', 'label'",
    ),
    (
        "missing label column",
        _csv_case("text,y\nhi,1\n"),
        DataError,
        r"train.csv has no column 'label' \(--label-column\)",
    ),
    ("empty split", _csv_case("text,label\n"), DataError, r"has a header but no data rows"),
    ("empty file", _csv_case(""), DataError, r"train.csv is empty"),
    (
        "ragged tsv row",
        _csv_case("text\tlabel\na\t1\nb\n", name="train.tsv"),
        DataError,
        r"train.tsv line 3: expected 2 fields like the first row, found 1 \(TSV is read without",
    ),
    (
        "ragged csv row",
        _csv_case('text,label\n"a\nb",1\nc,1,extra\n'),
        DataError,
        r"train.csv line 4: expected 2 fields like the first row, found 3$",
    ),
    (
        "label out of range",
        _csv_case("text,label\na,1\nb,2\n", task=get_task("sst2")),
        DataError,
        r"train.csv row 2: label '2': expected one of negative, positive or a class index 0-1 "
        r"\(--label-column\)",
    ),
    (
        "regression label not a number",
        _csv_case("text,label\na,1.5\nb,high\n", task=get_task("stsb")),
        DataError,
        r"row 2: label 'high' is not a number \(task stsb is a regression\)",
    ),
    (
        "missing label",
        _csv_case(
            '{"text": "a", "label": 1}\n{"text": "b", "label": null}\n',
            "train.jsonl",
            task=get_task("sst2"),
        ),
        DataError,
        r"train.jsonl row 2: the label is missing \(--label-column\)",
    ),
    (
        "validation label unseen in train",
        _dev_unseen,
        DataError,
        r"d.csv row 2: label 'z': it does not occur in the train split \(labels: x, y\)",
    ),
    (
        "single class",
        _csv_case("text,label\na,x\nb,x\n"),
        DataError,
        r"every label in .*train.csv is 'x'; a classifier needs at least two classes",
    ),
    (
        "non-utf8 csv",
        _csv_case(b"text,label\na,1\n\xff\xfeb,0\n"),
        DataError,
        r"train.csv line 3: not valid UTF-8 text",
    ),
    (
        "non-utf8 tsv",
        _csv_case(b"text\tlabel\na\t1\nb\xe9\t0\n", name="train.tsv"),
        DataError,
        r"train.tsv line 3: not valid UTF-8 text",
    ),
    (
        "non-utf8 jsonl",
        _csv_case(b'{"text": "a", "label": 1}\n{"text": "\xff", "label": 0}\n', "train.jsonl"),
        DataError,
        r"train.jsonl line 2: not valid UTF-8 text",
    ),
    (
        "duplicate column names",
        _csv_case("text,label,text\na,1,b\n"),
        DataError,
        r"more than one column named 'text'",
    ),
    (
        "null text",
        _csv_case('{"text": "a", "label": 1}\n{"text": null, "label": 0}\n', "train.jsonl"),
        DataError,
        r"train.jsonl row 2: text column 'text' is null",
    ),
    (
        "numbers as text",
        _csv_case('{"text": 5, "label": 1}\n', "train.jsonl"),
        DataError,
        r"column 'text' of .*train.jsonl holds int64, not text \(--text-columns\)",
    ),
    (
        "nested labels",
        _csv_case('{"text": "a", "label": [1, 2]}\n', "train.jsonl"),
        DataError,
        r"column 'label' of .*train.jsonl holds list<item: int64>; labels must be text or numbers",
    ),
    (
        "json array instead of lines",
        _csv_case('[{"text": "a", "label": 1}]', "train.json"),
        DataError,
        r"cannot read .*train.json as JSON Lines \(expected one JSON object per line\)",
    ),
    (
        "not parquet",
        _csv_case("text,label\n", "train.parquet"),
        DataError,
        r"cannot read .*train.parquet as Parquet: ",
    ),
    (
        "unknown file format",
        _csv_case("x", "train.xlsx"),
        ConfigError,
        r"cannot tell the format of .*train.xlsx \(--data train=...\)",
    ),
    (
        "missing user file",
        lambda root: load_files({"train": root / "gone.csv"}, ["text"], "label"),
        DataError,
        r"gone.csv not found \(--data train=...\)",
    ),
    (
        "three text columns",
        _csv_case("a,b,c,label\n1,2,3,4\n", text_columns=["a", "b", "c"]),
        ConfigError,
        r"--text-columns takes one or two distinct column names",
    ),
    (
        "no label column and no task",
        _csv_case("text\na\n", label_column=None),
        ConfigError,
        r"--label-column is required unless --task",
    ),
    (
        "missing id column",
        _csv_case("text,label\na,1\nb,0\n", id_column="uid"),
        DataError,
        r"no column 'uid' \(--id-column\)",
    ),
    (
        "bad --data syntax",
        lambda root: parse_data_option("train:a.csv"),
        ConfigError,
        r"bad --data entry 'train:a.csv': expected split=path",
    ),
    (
        "unknown --data split",
        lambda root: parse_data_option("train=a.csv,dev=b.csv"),
        ConfigError,
        r"unknown split 'dev' in --data: choose from train, validation, test",
    ),
    (
        "repeated --data split",
        lambda root: parse_data_option("train=a.csv,train=b.csv"),
        ConfigError,
        r"split 'train' given twice in --data",
    ),
    (
        "unknown split passed to load_files",
        lambda root: load_files({"dev": root / "d.csv"}, ["text"], "label"),
        ConfigError,
        r"unknown split 'dev' in --data",
    ),
]


@pytest.mark.parametrize(
    ("make", "error", "pattern"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_input_gives_one_clear_line(
    tmp_path: Path, make: Case, error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern) as info:
        make(tmp_path)
    message = str(info.value)
    assert "\n" not in message, message
    assert info.value.__cause__ is None  # no pyarrow exception chained behind it
