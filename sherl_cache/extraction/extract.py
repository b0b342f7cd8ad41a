"""Stage one in this process: stream each split through the frozen backbone once, cache it.

Work is cut into *units* (one shard index of a split, see ``store/cache.py``). The main thread
runs the forward pass over length-sorted batches of a unit (``engine.run_unit``); the store's
``UnitWriter`` compresses and writes finished units on a thread while the next one is computed,
then flags each unit as done. A rerun with the same arguments skips flagged units, so an
interrupted extraction resumes where it stopped (``plan.execute``; crash safety in
``store/writer.py``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..config.extract import ExtractConfig
from ..runtime import resolve_device
from ..store.cache import DecoderLayout
from ..store.writer import OpenedStore, UnitWriter
from .engine import load_extraction_model, run_unit
from .plan import ExtractPlan, ExtractResult, execute, plan_extraction
from .seq2seq import fill_decoder

__all__ = ["ExtractConfig", "ExtractResult", "extract"]


def extract(
    config: ExtractConfig, report: Callable[[str], None] = lambda _: None, progress: bool = True
) -> ExtractResult:
    """Run stage one; returns where the cache is and what was written."""
    began = time.perf_counter()
    plan = plan_extraction(config)
    fill = lambda store: _fill(plan, config, store, progress)  # noqa: E731
    return execute(plan, fill, report, began, show_estimate=progress)


def _fill(plan: ExtractPlan, config: ExtractConfig, store: OpenedStore, progress: bool) -> None:
    """Compute and write every pending unit, overlapping each unit's write with the next one."""
    assert store.root is not None
    device = resolve_device(config.device)
    with _transformers_bars(progress):
        model = load_extraction_model(
            config.model,
            revision=config.revision,
            dtype=plan.dtype,
            device=device,
            trust_remote_code=config.trust_remote_code,
            route=plan.route,
        )
    context = model.context(plan.dtype, plan.layers, config.batch_size, plan.pad_id)
    writer = UnitWriter(store.root, plan.layers)
    try:
        for name, units in store.pending().items():
            bar = _progress_bar(name, sum(u.stop - u.start for u in units), progress)
            for unit in units:
                writer.put(run_unit(context, plan.tokenized[name], unit, bar.update))
            bar.close()
    except BaseException:
        writer.close(check=False)  # keep the finished units; report the first error
        raise
    writer.close()
    if plan.seq2seq is not None:  # the decoder side, once every encoder unit is durable
        _fill_decoder(plan, store, model.net, device, config.batch_size, progress)


def _fill_decoder(
    plan: ExtractPlan,
    store: OpenedStore,
    net: Any,
    device: Any,
    batch_size: int,
    progress: bool,
) -> None:
    layout = DecoderLayout.of(plan.manifest)
    assert plan.seq2seq is not None and layout is not None and store.root is not None
    total = sum(len(t.input_ids) for t in plan.tokenized.values())
    bar = _progress_bar("decoder", total, progress)
    bar.unit = "ex"
    fill_decoder(
        store.root,
        plan.tokenized,
        plan.seq2seq,
        layout,
        net,
        device,
        batch_size,
        plan.pad_id,
        lambda _split, n: bar.update(n),
    )
    bar.close()


@contextlib.contextmanager
def _transformers_bars(enabled: bool) -> Iterator[None]:
    """``--quiet`` also silences transformers' own "Loading weights" bar, so a failing quiet
    run's stderr is just its one error line."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            hf_logging.enable_progress_bar()


def _progress_bar(split: str, total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=f"extract {split}",
        unit="tok",
        unit_scale=True,
        disable=not enabled,
        leave=True,
    )
