"""Reading the user's and GLUE's files into tables, and a split's columns out of a table.

Text is kept verbatim: delimited files are read with every column a string (so "007" stays
"007" and "NA" stays text), GLUE's TSVs with quoting off (they contain unmatched double
quotes). Every problem surfaces as one :class:`DataError` or :class:`ConfigError` line that
names the file, the row or line and the option to change; pyarrow's own exceptions never
escape.
"""

from __future__ import annotations

import codecs
import csv
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from ..errors import ConfigError, DataError

_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
}
_FORMAT_NAMES = {"csv": "CSV", "tsv": "TSV", "jsonl": "JSON Lines", "parquet": "Parquet"}


def _is_missing_label(value: object) -> bool:
    """How unlabelled rows are spelled: GLUE test files have no label column at all, Hugging
    Face exports write -1, spreadsheets leave the cell empty, pandas writes NaN."""
    if isinstance(value, float) and math.isnan(value):
        return True
    return value is None or (not isinstance(value, bool) and value in ("", "-1", -1))


def format_of(path: Path, split: str) -> str:
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(
            f"cannot tell the format of {path} (--data {split}=...): "
            "use a .csv, .tsv, .jsonl/.json or .parquet file"
        )
    return fmt


def read_table(path: Path, fmt: str, column_names: Sequence[str] | None = None) -> pa.Table:
    """Read ``path`` into a table whose delimited-text columns are all strings, verbatim.

    ``column_names`` is for header-less files (CoLA train/dev); otherwise row 1 is the header.
    """
    try:
        if path.stat().st_size == 0:
            raise DataError(f"{path} is empty")
        if fmt in ("csv", "tsv"):
            table = _read_delimited(path, fmt, column_names)
        elif fmt == "jsonl":
            # pyarrow silently replaces invalid UTF-8 in JSON with U+FFFD; refuse instead.
            bad_line = _utf8_error_line(path)
            if bad_line is not None:
                raise _not_utf8(path, bad_line)
            table = pa_json.read_json(path)
        else:
            table = pq.ParquetFile(path).read()
    except (pa.ArrowException, UnicodeDecodeError, csv.Error) as exc:
        raise _explain(path, fmt, exc) from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    names = table.column_names
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(
            f"{path} has more than one column named {', '.join(map(repr, repeated))}; "
            "rename them so each column can be selected unambiguously"
        )
    if table.num_rows == 0:
        raise DataError(f"{path} has a header but no data rows")
    return table


def _read_delimited(path: Path, fmt: str, column_names: Sequence[str] | None) -> pa.Table:
    delimiter, quoting = ("\t", False) if fmt == "tsv" else (",", True)
    width = _first_record_width(path, delimiter, quoting)
    if width is None:
        raise DataError(f"{path} is empty")
    # Reading the header as data and declaring every column a string stops pyarrow from
    # turning "007" into 7 or "NA" into null, and lets us detect repeated header names.
    table = pa_csv.read_csv(
        path,
        read_options=pa_csv.ReadOptions(autogenerate_column_names=True),
        parse_options=pa_csv.ParseOptions(
            delimiter=delimiter,
            quote_char='"' if quoting else False,
            newlines_in_values=quoting,
        ),
        convert_options=pa_csv.ConvertOptions(
            column_types={f"f{i}": pa.string() for i in range(width)},
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        ),
    )
    if column_names is not None:
        if len(column_names) != width:
            raise DataError(
                f"{path} line 1: expected {len(column_names)} fields "
                f"({', '.join(column_names)}), found {width}"
            )
        return table.rename_columns(list(column_names))
    header = [str(v) for v in table.slice(0, 1).to_pylist()[0].values()]
    header[0] = header[0].removeprefix("\ufeff")  # pyarrow strips the BOM; be sure of it
    return table.slice(1).rename_columns(header)


def _first_record_width(path: Path, delimiter: str, quoting: bool) -> int | None:
    """Number of fields in the first non-empty record, which fixes the table's width."""
    with path.open(encoding="utf-8-sig", newline="") as handle:
        if quoting:
            for row in csv.reader(handle, delimiter=delimiter):
                if row:
                    return len(row)
        else:
            for line in handle:
                line = line.rstrip("\r\n")
                if line:
                    return line.count(delimiter) + 1
    return None


def _utf8_error_line(path: Path) -> int | None:
    """Line number of the first invalid UTF-8 byte, or None if the file decodes cleanly."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                return line + chunk.count(b"\n", 0, max(exc.start, 0))
            line += chunk.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return line
    return None


def _not_utf8(path: Path, line: int) -> DataError:
    return DataError(f"{path} line {line}: not valid UTF-8 text; re-save the file as UTF-8")


def _ragged_line(path: Path, fmt: str, expected: int) -> int | None:
    """Find the first record with the wrong field count, since pyarrow's threaded reader
    does not report where it is."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            if fmt == "tsv":
                for number, line in enumerate(handle, 1):
                    line = line.rstrip("\r\n")
                    if line and line.count("\t") + 1 != expected:
                        return number
            else:
                reader = csv.reader(handle)
                for row in reader:
                    if row and len(row) != expected:
                        return reader.line_num
    except (OSError, UnicodeDecodeError, csv.Error):
        pass
    return None


def _explain(path: Path, fmt: str, exc: Exception) -> DataError:
    """Turn a parser exception into one line that says where the file is wrong."""
    if fmt != "parquet":
        bad_line = _utf8_error_line(path)
        if bad_line is not None:
            return _not_utf8(path, bad_line)
    message = str(exc).strip()
    ragged = re.search(r"Expected (\d+) columns, got (\d+)", message)
    if ragged and fmt in ("csv", "tsv"):
        line = _ragged_line(path, fmt, int(ragged[1]))
        where = f"line {line}" if line else "a row"
        hint = " (TSV is read without quoting, so a tab inside a text splits it)"
        return DataError(
            f"{path} {where}: expected {ragged[1]} fields like the first row, found "
            f"{ragged[2]}{hint if fmt == 'tsv' else ''}"
        )
    first = message.splitlines()[0] if message else type(exc).__name__
    hint = " (expected one JSON object per line)" if fmt == "jsonl" else ""
    return DataError(f"cannot read {path} as {_FORMAT_NAMES[fmt]}{hint}: {first}")


# --------------------------------------------------------------------------- columns


def _column(table: pa.Table, name: str, where: str, hint: str) -> pa.ChunkedArray:
    if name not in table.column_names:
        available = ", ".join(repr(c) for c in table.column_names)
        raise DataError(f"{where} has no column {name!r} {hint}; its columns are: {available}")
    column = table.column(name)
    if pa.types.is_dictionary(column.type):  # pandas categoricals arrive dictionary-encoded
        column = column.cast(column.type.value_type)
    return column


def _texts(table: pa.Table, name: str, where: str, hint: str) -> list[str]:
    column = _column(table, name, where, hint)
    if not (
        pa.types.is_string(column.type)
        or pa.types.is_large_string(column.type)
        or pa.types.is_null(column.type)
    ):
        raise DataError(f"column {name!r} of {where} holds {column.type}, not text {hint}")
    values = column.to_pylist()
    if column.null_count:
        row = values.index(None) + 1
        raise DataError(f'{where} row {row}: text column {name!r} is null; write empty text as ""')
    return values


def _id_text(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _ids(table: pa.Table, name: str | None, required: bool, where: str) -> list[str]:
    """The id column where the file has one; else row numbers (0-based, like GLUE's index)."""
    if name is None or (name not in table.column_names and not required):
        return [str(i) for i in range(table.num_rows)]
    values = _column(table, name, where, "(--id-column)").to_pylist()
    if None in values:
        raise DataError(f"{where} row {values.index(None) + 1}: id column {name!r} is empty")
    return [_id_text(v) for v in values]


@dataclass
class RawSplit:
    """A split read from its source, before labels are mapped to the task's classes."""

    name: str
    where: str
    texts: tuple[list[str], ...]
    labels: list | None
    ids: list[str]


def raw_split(
    name: str,
    table: pa.Table,
    where: str,
    text_columns: Sequence[str],
    label_column: str | None,
    id_column: str | None,
    id_required: bool,
    hints: Mapping[str, str],
) -> RawSplit:
    texts = tuple(_texts(table, c, where, hints["text"]) for c in text_columns)
    labels = None
    if label_column is not None:
        # A test split may come without labels; any other split must have them.
        unlabelled_ok = name.startswith("test")
        if label_column in table.column_names or not unlabelled_ok:
            column = _column(table, label_column, where, hints["label"])
            if pa.types.is_nested(column.type):
                raise DataError(
                    f"column {label_column!r} of {where} holds {column.type}; labels must be "
                    f"text or numbers {hints['label']}"
                )
            labels = column.to_pylist()
            if unlabelled_ok and all(_is_missing_label(v) for v in labels):
                labels = None
    ids = _ids(table, id_column, id_required, where)
    return RawSplit(name, where, texts, labels, ids)
