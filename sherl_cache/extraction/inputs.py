"""Stage one's inputs: the task's splits, tokenised once up front, and the batches of a unit.

Tokenising a whole split before any forward pass fixes every example's token offset, which is
what lets units be cut, skipped on resume and computed on any worker independently.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config.extract import ExtractConfig
from ..data.files import Dataset, SplitData, load_files, load_glue
from ..data.tasks import get_task
from ..errors import ConfigError
from ..families import Family
from ..runtime import pad

if TYPE_CHECKING:
    import torch


def load_dataset(config: ExtractConfig) -> Dataset:
    """The splits ``config`` names: GLUE folder or hub by ``--task``, or the user's files."""
    task = get_task(config.task) if config.task else None
    if config.data_files:
        if task is not None:
            text_columns = config.text_columns or task.text_columns
            label_column = config.label_column or task.label_column
        else:
            text_columns, label_column = config.text_columns, config.label_column
        dataset = load_files(config.data_files, text_columns, label_column, task=task)
    else:
        dataset = load_glue(task, config.data_dir, config.splits)
        if config.splits is None:  # unlabelled splits (GLUE test) only when named: training
            # never reads them, and they can be a third of the cache
            dataset.splits = {
                name: split for name, split in dataset.splits.items() if split.labels is not None
            }
    if config.splits:
        missing = [s for s in config.splits if s not in dataset.splits]
        if missing:
            raise ConfigError(
                f"split(s) {missing} not in the data (--splits): have {list(dataset.splits)}"
            )
        dataset.splits = {s: dataset.splits[s] for s in config.splits}
    return dataset


@dataclass
class TokenizedSplit:
    name: str
    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    truncated: int
    labels: np.ndarray | None
    fingerprint: str

    @cached_property
    def offsets(self) -> np.ndarray:
        """Token offset of every example on the split's flat token axis, then the total."""
        lengths = np.fromiter((len(ids) for ids in self.input_ids), dtype=np.int64)
        return np.concatenate([[0], np.cumsum(lengths)])

    @property
    def has_token_types(self) -> bool:
        return self.token_type_ids is not None


def tokenize_split(
    family: Family,
    tokenizer: Any,
    split: SplitData,
    max_length: int,
    template: str | None = None,
) -> TokenizedSplit:
    """Tokenise a whole split up front: cheap, and it fixes every example's token offset."""
    full = family.encode(tokenizer, split.texts, None, template)
    truncated = sum(len(ids) > max_length for ids in full["input_ids"])
    encoded = family.encode(tokenizer, split.texts, max_length, template)
    return TokenizedSplit(
        name=split.name,
        input_ids=encoded["input_ids"],
        token_type_ids=encoded.get("token_type_ids"),
        truncated=int(truncated),
        labels=split.labels,
        fingerprint=split.fingerprint(),
    )


def unit_examples(offsets: np.ndarray, start: int, stop: int) -> tuple[int, int]:
    """The examples [first, last) whose tokens overlap the token range [start, stop)."""
    first = int(np.searchsorted(offsets, start, side="right")) - 1
    return first, int(np.searchsorted(offsets, stop, side="left"))


def unit_batches(
    tokens: TokenizedSplit, examples: Sequence[int], batch_size: int, pad_id: int
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """Right-padded CPU model inputs for consecutive batches of ``examples`` (in their order).

    Public so the throughput benchmark times the very batches extraction runs.
    """
    for b in range(0, len(examples), batch_size):
        batch = list(examples[b : b + batch_size])
        ids, mask = pad([tokens.input_ids[i] for i in batch], pad_id)
        inputs = {"input_ids": ids, "attention_mask": mask}
        if tokens.token_type_ids is not None:
            inputs["token_type_ids"], _ = pad([tokens.token_type_ids[i] for i in batch], 0)
        yield batch, inputs
