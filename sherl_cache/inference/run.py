"""Use a trained run on new data: predict labels and scores from text (no cache needed).

A run folder holds only the trainable tensors; everything else is rebuilt from its
``RunRecord``. The frozen backbone named there (model_id, else model_path, refused unless its
weights hash is the recorded one) runs only up to the split (``run_lower_layers``); the
fusion, the late layers and the head then run with the checkpoint loaded. Text goes through
extraction's own ``tokenize_split`` with the recorded tokenizer and max_length, so the token
positions match.

Precision: hidden states are rounded to the run's cache dtype (float16 / bfloat16) before the
fusion. The model was trained on rounded states, and rounding makes predictions computed on
the fly equal the ones training's evaluation made from the cache, up to float32 noise plus the
rare element that float32 noise moves across a rounding boundary (one step of the storage
dtype). For float32 caches nothing is rounded. ``tests/test_predict.py`` pins both.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..backbone.frozen import load_backbone
from ..backbone.hub import verified_model_dir
from ..config.train import TrainConfig
from ..data.files import SplitData
from ..data.tasks import Problem, TaskSpec
from ..errors import CacheMismatchError, ConfigError, DataError, ModelLoadError
from ..families import get_family
from ..runtime import check_device, resolve_device
from ..store.cache import Cache
from ..training.discovery import task_from_record
from ..training.features import TextFeatures
from ..training.loop import evaluate, place
from ..training.model import SherlModel, build_model
from ..training.recipe import lora_config
from ..training.rundir import RunDir, RunRecord
from ..training.seq2seq import Seq2SeqTextFeatures, cached_source, is_seq2seq
from .hub import run_folder, upload_folder, write_model_card
from .predictions import Prediction, Predictions


class Run:
    """A trained run ready to predict: its model on ``device``, the backbone loaded on demand."""

    def __init__(
        self,
        path: Path,
        record: RunRecord,
        metrics: dict[str, Any],
        task: TaskSpec,
        model: SherlModel,
        model_path: str,
        device: torch.device,
        trainable: Sequence[str] = (),
    ) -> None:
        self.path, self.record, self.metrics, self.task = path, record, metrics, task
        self.model, self.model_path, self.device = model, model_path, device
        self.trainable = tuple(trainable)  # the tensors a run folder stores
        self.family = get_family(record.backbone["family"])
        self._backbone: tuple[nn.Module, Any] | None = None

    @property
    def config(self) -> TrainConfig:
        return self.record.config

    @property
    def taps(self) -> tuple[int, ...]:
        return self.record.taps

    @property
    def split_index(self) -> int:
        return self.record.split_index

    @property
    def dtype(self) -> str:
        return self.record.dtype

    @property
    def max_length(self) -> int:
        return int(self.record.max_length)

    @property
    def route(self) -> str:
        """ "encoder" or "seq2seq": how the run reads its backbone (recorded with it)."""
        return "seq2seq" if is_seq2seq(self.record.backbone) else "encoder"

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, task={self.task.name!r}, model={self.model_path!r})"

    # --- Hugging Face Hub conventions (as huggingface_hub.ModelHubMixin) ----------------------

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        model: str | None = None,
        device: str = "auto",
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
    ) -> Run:
        """A run from a local folder or a hub repo id (``owner/name``)."""
        folder = run_folder(
            pretrained_model_name_or_path,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            force_download=force_download,
        )
        return load_run(folder, model=model, device=device)

    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        **push_to_hub_kwargs: Any,
    ) -> Any:
        """Write the run folder (record, trainable tensors, PEFT adapter for LoRA, metrics, a
        model card) from the model in memory; optionally push it."""
        run_dir = RunDir(Path(save_directory))
        run_dir.prepare(overwrite=True)
        params = dict(self.model.named_parameters())
        state = {name: params[name].detach().cpu().clone() for name in self.trainable}
        run_dir.write_record(self.record)
        run_dir.save_checkpoint(state, lora_config(self.model))
        write_model_card(run_dir.path, self.record, self.metrics)
        run_dir.write_metrics(self.metrics)
        if push_to_hub:
            return self.push_to_hub(repo_id or run_dir.path.name, **push_to_hub_kwargs)
        return None

    def push_to_hub(
        self, repo_id: str, *, commit_message: str = "Push sherl-cache run", **options: Any
    ) -> Any:
        """Upload the run folder to ``repo_id`` (created if missing); the commit's info.

        ``options`` are ``huggingface_hub``'s: ``private``, ``token``, ``branch``,
        ``create_pr``.
        """
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return upload_folder(Path(tmp), repo_id, commit_message=commit_message, **options)

    # The full backbone is only needed for text input; scoring a cache never loads it.
    def backbone(self) -> tuple[nn.Module, Any]:
        """The frozen backbone on the run's device and its tokenizer (checked against the run)."""
        if self._backbone is None:
            from ..backbone.frozen import tokenizer_identity

            net, tokenizer, info = load_backbone(
                self.model_path, device=self.device, route=self.route
            )
            found = tokenizer_identity(tokenizer, Path(info.path), self.family)
            for name, recorded in self.record.tokenizer.items():
                if name not in ("name", "template") and found.get(name) != recorded:
                    raise ModelLoadError(
                        f"the tokenizer of {self.model_path} is not the one run {self.path} was "
                        f"trained with (field tokenizer.{name}: run has {recorded!r}, model has "
                        f"{found.get(name)!r}); pass --model with the original"
                    )
            self._backbone = (net, tokenizer)
        return self._backbone

    def predict(
        self,
        examples: Sequence[str | Sequence[str]],
        *,
        ids: Sequence[str] | None = None,
        batch_size: int = 32,
        progress: bool = False,
    ) -> list[Prediction]:
        """Label and class scores of each example: a text, or a (text, text) pair for pair
        tasks; ids default to row numbers."""
        width = len(self.task.text_columns)
        columns: tuple[list[str], ...] = tuple([] for _ in range(width))
        for row, example in enumerate(examples):
            texts = (example,) if isinstance(example, str) else tuple(example)
            if len(texts) != width or not all(isinstance(t, str) for t in texts):
                raise DataError(
                    f"example {row} is {example!r}: task {self.task.name} takes {width} text(s) "
                    f"per example ({', '.join(self.task.text_columns)})"
                )
            for column, text in zip(columns, texts, strict=True):
                column.append(text)
        names = [str(i) for i in range(len(columns[0]))] if ids is None else list(ids)
        split = SplitData("predict", columns, None, names)
        return self.predict_split(split, batch_size=batch_size, progress=progress).records()

    def predict_split(
        self, split: SplitData, *, batch_size: int = 32, progress: bool = False
    ) -> Predictions:
        """Predictions for every row of ``split``, computed from its text."""
        from ..extraction.inputs import tokenize_split

        check_batch_size(batch_size)
        if len(split.texts) != len(self.task.text_columns):
            raise DataError(
                f"{split.name} has {len(split.texts)} text column(s); task {self.task.name} "
                f"takes {len(self.task.text_columns)} (--text-columns)"
            )
        if len(split) == 0:
            return Predictions([], self._empty_outputs(), self.task)
        backbone, tokenizer = self.backbone()
        source: TextFeatures | Seq2SeqTextFeatures
        if self.route == "seq2seq":  # text-to-text inputs, both sides computed on the fly
            from ..extraction.seq2seq import tokenize_sources

            assert self.task.text_to_text is not None
            tokens = tokenize_sources(
                self.family, tokenizer, split, self.max_length, self.task.text_to_text
            )
            source = Seq2SeqTextFeatures(
                backbone,
                self.record.backbone,
                tokens.input_ids,
                self.taps,
                self.dtype,
                self.family.pad_id(tokenizer),
            )
        else:
            template = self.record.tokenizer.get("template")  # decoder-only: as cached
            tokens = tokenize_split(self.family, tokenizer, split, self.max_length, template)
            source = TextFeatures(
                backbone,
                tokens.input_ids,
                tokens.token_type_ids if self.family.uses_token_type_ids else None,
                self.taps,
                self.split_index,
                self.dtype,
                self.family.pad_id(tokenizer),
            )
        # Longest first, like extraction: batches of similar length waste little on padding.
        order = np.argsort([-len(ids) for ids in tokens.input_ids], kind="stable")
        outputs = self._run(source, order, batch_size, progress, f"predict {split.name}")
        return Predictions(list(split.ids), outputs, self.task)

    def predict_cached(self, cache: Cache, split: str, *, batch_size: int = 32) -> Predictions:
        """Predictions from a cache's stored states: exactly training's evaluation."""
        check_batch_size(batch_size)
        problem = cache_mismatch(self, cache, split)
        if problem is not None:
            raise CacheMismatchError(
                f"cache {cache.path} does not fit run {self.path} for split {split!r} ({problem})"
            )
        source = cached_source(cache, split, self.taps, self.split_index)
        outputs, _ = evaluate(self.model, source, self.task, self.device, batch_size)
        ids = [str(i) for i in range(len(source))]
        return Predictions(ids, outputs, self.task)

    def _run(
        self,
        source: TextFeatures | Seq2SeqTextFeatures,
        order: np.ndarray,
        batch_size: int,
        progress: bool,
        desc: str,
    ) -> np.ndarray:
        from tqdm.auto import tqdm

        outputs = np.empty((len(source), *self._empty_outputs().shape[1:]), dtype=np.float32)
        self.model.eval()
        bar = tqdm(total=len(source), desc=desc, unit="ex", disable=not progress, leave=False)
        with torch.no_grad(), bar:
            for start in range(0, len(source), batch_size):
                indices = order[start : start + batch_size]
                values = self.model.predictions(self.model(source.batch(indices, self.device)))
                outputs[indices] = values.float().cpu().numpy()
                bar.update(len(indices))
        return outputs

    def _empty_outputs(self) -> np.ndarray:
        if self.task.problem is Problem.REGRESSION:
            return np.zeros((0,), dtype=np.float32)
        return np.zeros((0, self.task.num_labels), dtype=np.float32)


def cache_mismatch(run: Run, cache: Cache, split: str, data: SplitData | None = None) -> str | None:
    """Why ``cache`` cannot stand in for computing ``split`` on the fly; None if it can.

    Matching means the same features: same backbone weights, tokenizer, max_length and storage
    dtype, the tapped layers stored, and (when the data is at hand) the same rows.
    """
    manifest = cache.manifest
    if not cache.complete:
        return "the cache is incomplete"
    record = run.record
    pairs = [
        (
            "model.weights_sha256",
            manifest["model"]["weights_sha256"],
            record.backbone["weights_sha256"],
        ),
        (
            "tokenizer.files_sha256",
            manifest["tokenizer"].get("files_sha256"),
            record.tokenizer.get("files_sha256"),
        ),
        ("max_length", manifest.get("max_length"), record.max_length),
        ("truncation_side", manifest.get("truncation_side"), record.truncation_side),
        ("dtype", manifest.get("dtype"), record.dtype),
        ("task.name", manifest["task"]["name"], run.task.name),
        ("model.route", manifest["model"].get("route", "encoder"), run.route),
    ]
    for name, found, wanted in pairs:
        if found != wanted:
            return f"field {name}: cache has {found!r}, run needs {wanted!r}"
    needed = sorted((set(run.taps) | {run.split_index}) - set(cache.layers))
    if needed:
        return f"field layers: cache lacks hidden-state indices {needed}"
    if split not in cache.splits:
        return f"it has no split {split!r}, only {cache.splits}"
    if data is not None:
        recorded = manifest["data"]["splits"].get(split, {}).get("fingerprint")
        if recorded != data.fingerprint():
            return f"field data.splits.{split}.fingerprint: the cache holds other rows"
    return None


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}")


def load_run(path: str | Path, *, model: str | None = None, device: str = "auto") -> Run:
    """Open a finished run for prediction: a run folder, or a hub repo id (``owner/name``,
    from the Hugging Face cache or downloaded); ``model`` overrides where the backbone is read.

    The backbone must be the one the run's cache was made with (same weights sha256); the
    checkpoint must hold exactly the tensors the run's configuration trains.
    """
    check_device(device)
    path = run_folder(path)
    run_dir = RunDir(path)
    record, metrics = run_dir.open()
    task = task_from_record(record.task_spec, f"run {path}")
    backbone = record.backbone
    candidates = [model] if model else [backbone.get("model_id"), record.model_path]
    model_path = verified_model_dir(backbone, candidates, f"run {path}", "backbone.weights_sha256")
    with torch.random.fork_rng(devices=[]):  # build_model seeds; keep the caller's RNG
        net = build_model(record.config, backbone, task, record.taps, model_path)
    run_dir.load_checkpoint(net)
    trainable = [name for name, p in net.named_parameters() if p.requires_grad]
    resolved = resolve_device(device)
    place(net.requires_grad_(False).eval(), resolved, record.config.precision)
    return Run(path, record, metrics, task, net, model_path, resolved, trainable)
