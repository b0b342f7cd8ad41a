"""Run folders on the Hugging Face Hub, with ``huggingface_hub``'s conventions: a repo holds
exactly what a local run folder holds (plus a model card), ``from_pretrained`` takes a folder
or a repo id, ``push_to_hub`` creates the repo if needed and uploads one commit.

A run is a folder of files rather than one module's weights (the backbone is not in it, only
its identity), so the files are written by ``RunDir`` and moved as a folder, the way
``ModelHubMixin`` moves what its ``_save_pretrained`` wrote.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import RunError
from ..training.rundir import RunRecord

MODEL_CARD = "README.md"
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def is_repo_id(name: str | Path) -> bool:
    """``owner/name`` that is not an existing path: what ``load_run`` asks the hub for."""
    text = str(name)
    return bool(_REPO_ID.match(text)) and not text.startswith(".") and not Path(text).exists()


def run_folder(
    name_or_path: str | Path,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
) -> Path:
    """A local run folder for ``name_or_path``: the path itself, or the repo's snapshot in the
    Hugging Face cache (downloaded unless offline or ``local_files_only``)."""
    if not is_repo_id(name_or_path):
        return Path(name_or_path)
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                str(name_or_path),
                revision=revision,
                token=token,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                force_download=force_download,
            )
        )
    except Exception as exc:  # any hub failure is the same problem for the user
        raise RunError(
            f"no run folder {name_or_path} here, and hub repo {name_or_path} cannot be read "
            f"({type(exc).__name__}); check the name, or go online"
        ) from exc


def write_model_card(folder: Path, record: RunRecord, metrics: Mapping[str, Any]) -> None:
    """A short README.md with the hub's metadata header, unless the folder already has one."""
    card = Path(folder) / MODEL_CARD
    if card.exists():
        return
    reported = metrics.get("reported") or metrics.get("best") or {}
    scores = ", ".join(f"{k} {v:.4f}" for k, v in reported.items() if isinstance(v, float))
    shown = metrics.get("reported_on")
    if shown and not metrics.get("biased"):
        scores += f" (held out: {shown['examples']} {shown['split']} examples never used to choose)"
    base = record.model_id if is_repo_id(record.model_id) else None
    header = ["---", "library_name: sherl-cache", "tags:", "- sherl-cache", "- sherl"]
    header += [f"base_model: {base}"] if base else []
    header += ["---"]
    body = [
        f"# sherl-cache run: {record.task_spec.get('name')} on {record.model_id}",
        "",
        f"SHERL fusion + {record.config.late_layers} late layer(s) "
        f"({record.config.late_mode}) trained from a cache of the frozen backbone.",
        f"Scores: {scores or 'n/a'}.",
        "",
        "```python",
        "from sherl_cache import Run",
        "",
        'run = Run.from_pretrained("<this repo>")',
        "```",
    ]
    card.write_text("\n".join(header + body) + "\n", encoding="utf-8")


def upload_folder(
    folder: Path,
    repo_id: str,
    *,
    commit_message: str = "Push sherl-cache run",
    private: bool | None = None,
    token: str | None = None,
    branch: str | None = None,
    create_pr: bool | None = None,
) -> Any:
    """Create ``repo_id`` if missing and upload ``folder`` in one commit (its CommitInfo)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(
        repo_id=repo.repo_id,
        folder_path=str(folder),
        commit_message=commit_message,
        revision=branch,
        create_pr=create_pr,
    )
