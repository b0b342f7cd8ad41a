"""What a cache says about the run trained from it: its family, its task, its weights.

Training, sweeps and prediction all resolve these the same way, so a run rebuilt from its
config.json alone gets the task and the late-layer weights its training got.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..backbone.hub import verified_model_dir
from ..data.tasks import Problem, TaskSpec, custom_task, get_task
from ..errors import CacheMismatchError, ConfigError
from ..families import Family, get_family
from ..store.cache import Cache, open_cache


def family_of_cache(cache: Cache) -> Family:
    return get_family(cache.manifest["model"]["family"])


def task_record(task: TaskSpec) -> dict[str, Any]:
    """What a run stores about its task: enough to rebuild it, and to check class order."""
    return {
        "name": task.name,
        "problem": task.problem.value,
        "label_names": list(task.label_names) if task.label_names else None,
        "text_columns": list(task.text_columns),
        "label_column": task.label_column,
        "id_column": task.id_column,
    }


def task_from_record(recorded: Mapping[str, Any], where: str) -> TaskSpec:
    """The TaskSpec a cache manifest or run config recorded; GLUE tasks come from the registry.

    A GLUE task whose recorded class order differs from the registry's is refused: output i of
    the head would silently be given another label's name.
    """
    try:
        task = get_task(recorded["name"])
    except ConfigError:
        return custom_task(
            recorded["text_columns"],
            recorded.get("label_column"),
            tuple(recorded["label_names"]) if recorded.get("label_names") else None,
            Problem(recorded["problem"]),
        )
    names = recorded.get("label_names")
    if names is not None and tuple(names) != task.label_names:
        raise CacheMismatchError(
            f"{where} labels task {task.name} as {names}, this sherl-cache as "
            f"{list(task.label_names or ())} (field task.label_names); use the sherl-cache "
            "version that made it"
        )
    return task


def task_of(cache: Cache, requested: str | None) -> TaskSpec:
    recorded = cache.manifest["task"]
    if requested is not None:
        wanted = get_task(requested)
        if wanted.name != recorded["name"]:
            raise CacheMismatchError(
                f"cache {cache.path} was made for task {recorded['name']!r}, not {wanted.name!r} "
                f"(--task); make one with: sherl-cache extract --model "
                f"{cache.manifest['model']['model_id']} --task {wanted.name}"
            )
    return task_from_record(recorded, f"cache {cache.path}")


def find_cache(cache_root: Path, task: str | None, model: str | None) -> str:
    """The complete cache under ``cache_root`` for this task and model, else how to make one."""
    if task is None or model is None:
        raise ConfigError("pass --cache PATH, or --task and --model to find a matching cache")
    wanted = get_task(task).name
    matches = []
    for candidate in sorted(Path(cache_root).glob("*")) if Path(cache_root).is_dir() else []:
        try:
            found = open_cache(str(candidate), allow_incomplete=True)
        except Exception:  # noqa: BLE001 - anything unreadable is simply not a match
            continue
        recorded = found.manifest.get("model", {})
        if found.manifest.get("task", {}).get("name") == wanted and model in (
            recorded.get("model_id"),
            found.manifest.get("model_path"),
        ):
            matches.append(found)
    complete = [c for c in matches if c.complete]
    if complete:
        return max(complete, key=lambda c: c.manifest.get("completed", "")).path
    command = f"sherl-cache extract --model {model} --task {wanted} --cache-root {cache_root}"
    if matches:
        resume = matches[-1].manifest.get("command") or command  # its own flags, not defaults
        raise CacheMismatchError(
            f"the cache for {wanted} and {model} is incomplete; finish it with: {resume}"
        )
    raise CacheMismatchError(
        f"no cache for task {wanted} and model {model} in {cache_root}; make one with: {command}"
    )


def late_weights_path(cache: Cache, override: str | None) -> str:
    """The checkpoint the late layers come from, checked against the cache's weights hash."""
    recorded = cache.manifest["model"]
    candidates = (
        [override] if override else [recorded["model_id"], cache.manifest.get("model_path")]
    )
    return verified_model_dir(recorded, candidates, f"cache {cache.path}", "model.weights_sha256")
