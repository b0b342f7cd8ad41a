"""The seq2seq route: T5 as the SHERL paper runs it (text to text, an MTSA on each side, the
frozen last decoder block, label words scored).

Exactness is checked on tiny random ``T5ForConditionalGeneration`` checkpoints against the
full transformers model: cached encoder and decoder states, the model's outputs from the cache
and from the backbone in the loop, seeded training steps, and rank classification against a
step-by-step constrained greedy decoder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REAL_MRPC, make_tokenizer
from transformers import T5Config, T5ForConditionalGeneration

from sherl_cache.config.extract import ExtractConfig
from sherl_cache.config.train import TrainConfig
from sherl_cache.data.tasks import STSB_BINS, get_task
from sherl_cache.errors import CacheMismatchError, ConfigError
from sherl_cache.extraction.extract import extract
from sherl_cache.families import get_family
from sherl_cache.families.t5_seq2seq import (
    T5Seq2SeqBackbone,
    decoder_taps,
    encoder_taps,
    reference_blocks,
)
from sherl_cache.inference.run import cache_mismatch, load_run
from sherl_cache.store.cache import open_cache
from sherl_cache.training.loop import fit
from sherl_cache.training.model import build_model
from sherl_cache.training.recipe import train
from sherl_cache.training.seq2seq import (
    Seq2SeqCachedFeatures,
    Seq2SeqSherlModel,
    Seq2SeqTextFeatures,
    seq2seq_taps,
)

LAYERS = 4


def build_seq2seq_t5(folder: Path, num_layers: int = LAYERS, seed: int = 0) -> Path:
    """A random T5ForConditionalGeneration (tied head, as t5-base/large) with a WordPiece
    vocabulary, saved like a hub checkpoint."""
    tok = make_tokenizer(folder)
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(
        T5Config(
            vocab_size=len(tok),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=num_layers,
            num_decoder_layers=num_layers,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            pad_token_id=tok.pad_token_id,
            decoder_start_token_id=tok.pad_token_id,
        )
    )
    with torch.no_grad():  # random init leaves norms at 1: perturb everything
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def t5_full(tmp_path_factory) -> Path:
    return build_seq2seq_t5(tmp_path_factory.mktemp("t5-full") / "model")


@pytest.fixture(scope="module")
def s2s_cache(tmp_path_factory, t5_full, glue_dir) -> str:
    config = ExtractConfig(
        model=str(t5_full),
        task="mrpc",
        data_dir=glue_dir,
        cache_root=tmp_path_factory.mktemp("s2s-cache"),
        dtype="float32",
        device="cpu",
        batch_size=5,  # several batches and blocks
    )
    return extract(config, progress=False).path


def reference_model(path: Path) -> T5ForConditionalGeneration:
    return T5ForConditionalGeneration.from_pretrained(path).eval()


def train_config(cache: str, out: Path, **overrides) -> TrainConfig:
    settings = {
        "cache": cache,
        "out": out,
        "epochs": 1,
        "batch_size": 8,
        "device": "cpu",
        "fusion_variant": "gated",
        "fusion_dropout": 0.0,
        "select_on": "same",
    }
    return TrainConfig(**(settings | overrides))


def perturbed(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Trainable tensors moved off their initial values (the gate opened, norms not 1), so the
    comparisons exercise every term of the route."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=generator))
    return model


# --- the reference's choices ------------------------------------------------------------------


def test_taps_are_the_reference_scripts():
    """ladder_side_tuning_large.sh / _base.sh list the side blocks; the embedding output is
    tapped too, and the decoder MTSA stops below its last block."""
    assert reference_blocks(24) == (1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 22, 23)
    assert reference_blocks(12) == (1, 2, 3, 5, 6, 7, 9, 10, 11)
    assert len(encoder_taps(24)) == 14 and encoder_taps(24)[-1] == 24
    assert len(decoder_taps(24)) == 13 and decoder_taps(24)[-1] == 23
    assert decoder_taps(12) == (0, 2, 3, 4, 6, 7, 8, 10, 11)


def test_text_to_text_formats():
    rte = get_task("rte").text_to_text
    assert rte.source(["a b", "c"]) == "rte sentence1: a b sentence2: c"
    assert rte.targets == ("0", "1")
    assert get_task("mnli").text_to_text.source(["p", "h"]) == "mnli premise: p hypothesis h"
    assert get_task("qnli").text_to_text.fields == ("question:", "sentence:")
    stsb = get_task("stsb").text_to_text
    assert stsb.targets == STSB_BINS and len(STSB_BINS) == 26 and STSB_BINS[-1] == "5.0"
    assert [stsb.bin_of(v) for v in (0.0, 0.09, 0.11, 3.8, 4.99, 5.0)] == [0, 0, 1, 19, 25, 25]


def test_info_shows_the_text_to_text_format(s2s_cache):
    from typer.testing import CliRunner

    from sherl_cache.cli import app

    result = CliRunner().invoke(app, ["info", s2s_cache])
    assert result.exit_code == 0, result.output
    assert "seq2seq" in result.stdout and "mrpc sentence1:" in result.stdout


# --- stage one: exact against the full model ----------------------------------------------


def test_default_route_and_manifest(s2s_cache, t5_full):
    cache = open_cache(s2s_cache)
    model = cache.manifest["model"]
    assert cache.route == "seq2seq" and model["encoder_taps"] == [0, 2, 3, 4]
    assert cache.layers == [0, 2, 3, 4]  # L = 4: the last block's raw output
    assert model["decoder"]["taps"] == [0, 2, 3] and model["decoder"]["layers"] == [0, 2, 3]
    assert cache.manifest["task"]["text_to_text"]["targets"] == ["0", "1"]


def test_cached_states_equal_the_full_model(s2s_cache, t5_full):
    """Encoder states (L raw) and, per candidate, the decoder's hidden states with the target
    teacher-forced equal ``T5ForConditionalGeneration``'s own ``decoder_hidden_states``."""
    cache = open_cache(s2s_cache)
    net = reference_model(t5_full)
    decoder = cache.manifest["model"]["decoder"]
    raw: list[torch.Tensor] = []
    net.encoder.block[-1].register_forward_hook(lambda _m, _a, out: raw.append(out[0]))
    for split in ("train", "validation"):
        for i in (0, 3, cache.num_examples(split) - 1):
            ids = torch.from_numpy(cache.input_ids(split, i).astype(np.int64))[None]
            for c, target in enumerate(decoder["target_ids"]):
                dec_in = torch.tensor([[decoder["start_token_id"], *target[:-1]]])
                with torch.no_grad():
                    out = net(input_ids=ids, decoder_input_ids=dec_in, output_hidden_states=True)
                for layer in decoder["layers"]:
                    cached = cache.decoder_array(split, layer)[i, c, : len(target)]
                    expected = out.decoder_hidden_states[layer][0].numpy()
                    np.testing.assert_allclose(cached, expected, atol=1e-5, rtol=1e-5)
                padded = cache.decoder_array(split, decoder["layers"][0])[i, c, len(target) :]
                assert not padded.any()
            for layer in cache.layers:
                expected = raw[-1] if layer == LAYERS else out.encoder_hidden_states[layer]
                np.testing.assert_allclose(
                    cache.hidden(split, layer, i), expected[0].numpy(), atol=1e-5, rtol=1e-5
                )
    # index L is the raw block output, not transformers' normed last hidden state
    assert not np.allclose(raw[-1][0].numpy(), out.encoder_hidden_states[LAYERS][0].numpy())


# --- stage two: cache against the backbone in the loop -------------------------------------


def _sources(cache, t5_full, taps, split="train", limit=None):
    identity = cache.manifest["model"]
    backbone = T5Seq2SeqBackbone.load(t5_full, dtype=torch.float32).eval()
    count = cache.num_examples(split) if limit is None else limit
    online = Seq2SeqTextFeatures(
        backbone,
        identity,
        [cache.input_ids(split, i) for i in range(count)],
        taps,
        "float32",
        0,
        cache.labels(split)[:count],
    )
    return Seq2SeqCachedFeatures(cache, split, taps, limit), online


def test_model_outputs_from_cache_equal_online(s2s_cache, t5_full, tmp_path):
    cache = open_cache(s2s_cache)
    config = train_config(s2s_cache, tmp_path)
    taps = seq2seq_taps(cache, config)
    model = perturbed(build_model(config, cache, get_task("mrpc"), taps, str(t5_full))).eval()
    assert isinstance(model, Seq2SeqSherlModel)
    cached, online = _sources(cache, t5_full, taps, "validation")
    indices = np.array([4, 0, 7, 2])
    with torch.no_grad():
        a = model(cached.batch(indices, torch.device("cpu")))
        b = model(online.batch(indices, torch.device("cpu")))
    assert a.shape == (4, 2, 3)  # examples, candidates, target tokens
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert a.abs().sum() > 0 and (model.scores(a)[:, 0] != model.scores(a)[:, 1]).all()


def test_seeded_steps_from_cache_equal_online(s2s_cache, t5_full, tmp_path):
    cache = open_cache(s2s_cache)
    config = train_config(s2s_cache, tmp_path, fusion_dropout=0.1, batch_size=4)
    taps = seq2seq_taps(cache, config)
    task = get_task("mrpc")
    states, losses = [], []
    for source in _sources(cache, t5_full, taps, limit=16):
        model = build_model(config, cache, task, taps, str(t5_full))
        result = fit(model, source, None, task, config, torch.device("cpu"), max_steps=3)
        losses.append(result.step_losses)
        states.append({n: p.detach() for n, p in model.named_parameters() if p.requires_grad})
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert set(states[0]) == set(states[1])
    assert any(n.startswith("encoder_norm") for n in states[0])
    assert not any(n.startswith("late.") for n in states[0])
    for name in states[0]:
        torch.testing.assert_close(states[0][name], states[1][name], atol=1e-5, rtol=1e-4)


def test_checkpointed_route_trains_exactly_as_without(s2s_cache, t5_full, tmp_path):
    """``--late-checkpointing`` recomputes the frozen decoder block (dropout on) in backward
    and changes nothing: the same losses and fusion weights, bit for bit."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    cache = open_cache(s2s_cache)
    task = get_task("mrpc")
    runs = []
    for checkpointing in (False, True):
        config = train_config(
            s2s_cache,
            tmp_path / str(checkpointing),
            fusion_dropout=0.1,
            batch_size=4,
            late_checkpointing=checkpointing,
        )
        taps = seq2seq_taps(cache, config)
        model = build_model(config, cache, task, taps, str(t5_full))
        block = next(m for m in model.late.modules() if isinstance(m, GradientCheckpointingLayer))
        leaf = next(m for m in block.modules() if list(m.parameters(recurse=False)))
        calls: list[int] = []
        leaf.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        source = Seq2SeqCachedFeatures(cache, "train", taps, 16)
        result = fit(model, source, None, task, config, torch.device("cpu"), max_steps=3)
        state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        runs.append((result.step_losses, state, len(calls)))
    (plain_losses, plain, plain_calls), (losses, state, calls) = runs
    assert calls > plain_calls  # the block ran again in the backward passes
    assert losses == plain_losses
    for name, value in plain.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)


def _constrained_greedy(model, net, identity, taps, ids, targets, start) -> int:
    """Decode token by token with the trained modules, the next token restricted to those
    that continue some label word; the label it completes."""
    ids_t = torch.tensor([list(ids)], dtype=torch.long)
    mask = torch.ones_like(ids_t)
    states, output = net.encoder_states(ids_t, mask)
    last = identity["num_layers"]
    side = model.encoder_norm(model.encoder_fusion([states[t] for t in taps], states[last], mask))
    dec_taps, dec_last = identity["decoder"]["taps"], identity["decoder"]["num_layers"] - 1
    prefix: list[int] = []
    alive = list(range(len(targets)))
    while True:
        dec_in = torch.tensor([[start, *prefix]])
        ones = torch.ones_like(dec_in)
        hs = net.decoder_states(output, mask, dec_in, ones)
        fused = model.decoder_fusion([hs[t] for t in dec_taps], hs[dec_last], ones)
        logits = model.late.logits(model.decoder_norm(model.late(fused, ones, side, mask)))[0, -1]
        allowed = {targets[c][len(prefix)] for c in alive}
        prefix.append(max(allowed, key=lambda t: float(logits[t])))
        alive = [c for c in alive if list(targets[c][: len(prefix)]) == prefix]
        done = [c for c in alive if len(targets[c]) == len(prefix) or len(alive) == 1]
        if done:  # a unique continuation: the end token follows deterministically
            return done[0]


def test_rank_classification_equals_constrained_greedy_decoding(s2s_cache, t5_full, tmp_path):
    cache = open_cache(s2s_cache)
    config = train_config(s2s_cache, tmp_path)
    taps = seq2seq_taps(cache, config)
    model = perturbed(build_model(config, cache, get_task("mrpc"), taps, str(t5_full)), 3)
    model.eval()
    identity = cache.manifest["model"]
    net = T5Seq2SeqBackbone.load(t5_full, dtype=torch.float32).eval()
    source = Seq2SeqCachedFeatures(cache, "validation", taps)
    with torch.no_grad():
        ranked = model.predictions(model(source.batch(np.arange(len(source)), torch.device("cpu"))))
        greedy = [
            _constrained_greedy(
                model,
                net,
                identity,
                taps,
                cache.input_ids("validation", i),
                identity["decoder"]["target_ids"],
                identity["decoder"]["start_token_id"],
            )
            for i in range(len(source))
        ]
    assert ranked.argmax(1).tolist() == greedy
    assert len(set(greedy)) == 2  # both labels occur: the comparison can fail


def test_regression_maps_bins_back_to_numbers(t5_full, s2s_cache, tmp_path):
    """STS-B: the gold class of a score is its 0.2 bin; a prediction is the best bin's value."""
    cache = open_cache(s2s_cache)
    identity = dict(cache.manifest["model"])
    decoder = dict(identity["decoder"])
    decoder["target_ids"] = [[2, 31 + i % 10, 3] for i in range(26)]
    identity["decoder"] = decoder
    config = train_config(s2s_cache, tmp_path)
    model = build_model(config, identity, get_task("stsb"), [0, 2, 3, 4], str(t5_full))
    outputs = torch.full((2, 26, 3), -5.0)
    outputs[0, 19, 1] = -0.1  # bin 3.8
    outputs[1, 0, 1] = -0.2  # bin 0.0
    torch.testing.assert_close(model.predictions(outputs), torch.tensor([3.8, 0.0]))
    assert model.gold(torch.tensor([3.79, 0.05])).tolist() == [19, 0]
    loss = model.loss(outputs, torch.tensor([3.8, 0.0]))
    assert float(loss) == pytest.approx((0.1 + 0.2 + 4 * 5.0) / 6)


def test_gated_fusion_is_initialised_as_the_reference(s2s_cache, t5_full, tmp_path):
    """Every linear of the T5 gated MTSA N(0, 0.01) with zero bias, on both sides; the linear
    variant keeps torch's initialisation."""
    cache = open_cache(s2s_cache)
    task = get_task("mrpc")
    for variant, low, high in (("gated", 0.008, 0.012), ("linear", 0.05, 1.0)):
        config = train_config(s2s_cache, tmp_path, reduction=1, fusion_variant=variant)
        model = build_model(config, cache, task, seq2seq_taps(cache, config), str(t5_full))
        for fusion in (model.encoder_fusion, model.decoder_fusion):
            linears = [m for m in fusion.modules() if isinstance(m, torch.nn.Linear)]
            weights = torch.cat([m.weight.detach().flatten() for m in linears])
            assert low < float(weights.std()) < high, variant
            assert all(bool((m.bias == 0).all()) for m in linears) == (variant == "gated")
            assert float(fusion.gate.detach()) == 0.0


# --- refusals -------------------------------------------------------------------------------


def test_train_refuses_what_the_route_lacks(s2s_cache, tmp_path):
    with pytest.raises(ConfigError, match="--late-layers"):
        train(train_config(s2s_cache, tmp_path / "a", late_layers=2), progress=False)
    with pytest.raises(ConfigError, match="--late-mode"):
        train(train_config(s2s_cache, tmp_path / "b", late_mode="lora"), progress=False)
    with pytest.raises(CacheMismatchError, match="--tap"):
        train(train_config(s2s_cache, tmp_path / "c", tap="0,1,4"), progress=False)
    with pytest.raises(ConfigError, match="--tap-dropout is built for encoder-route caches"):
        train(train_config(s2s_cache, tmp_path / "d", tap_dropout=0.1), progress=False)


def test_route_refusals(tiny_models, glue_dir, tmp_path):
    base = {"task": "mrpc", "data_dir": glue_dir, "cache_root": tmp_path, "device": "cpu"}
    with pytest.raises(ConfigError, match="--route seq2seq is not offered for bert"):
        extract(ExtractConfig(model=str(tiny_models["bert"]), route="seq2seq", **base))
    with pytest.raises(ConfigError, match="--route seq2seq needs a T5ForConditionalGeneration"):
        extract(ExtractConfig(model=str(tiny_models["t5"]), route="seq2seq", **base))
    assert get_family("t5").routes == ("encoder", "seq2seq")


def test_encoder_route_on_a_full_checkpoint(t5_full, glue_dir, tmp_path, s2s_cache):
    """``--route encoder`` keeps today's route on a checkpoint that has a decoder; a run of
    one route never takes a cache of the other for its features."""
    config = ExtractConfig(
        model=str(t5_full),
        task="mrpc",
        data_dir=glue_dir,
        cache_root=tmp_path / "cache",
        dtype="float32",
        device="cpu",
        route="encoder",
    )
    path = extract(config, progress=False).path
    cache = open_cache(path)
    assert cache.route == "encoder" and "route" not in cache.manifest["model"]
    defaults = {"fusion_variant": None, "fusion_dropout": None}  # T5's: the reference's
    train(train_config(path, tmp_path / "run", **defaults), progress=False)
    run = load_run(tmp_path / "run", device="cpu")
    fusion = run.model.fusion  # unset in the record: the family's default, rebuilt the same
    assert (fusion.config.variant, fusion.config.dropout) == ("gated", 0.0)
    # N(0, 0.01) at the start (torch's default would be ~0.1), then 3 small AdamW steps
    assert float(run.model.fusion.projections[0].fc1.weight.std()) < 0.03
    problem = cache_mismatch(run, open_cache(s2s_cache), "validation")
    assert problem is not None and "model.route" in problem


# --- end to end: the CLI on real MRPC rows --------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", SHERL_CACHE_DEBUG="", TQDM_DISABLE="1")
    result = subprocess.run(
        [sys.executable, "-m", "sherl_cache.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    if result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def test_cli_end_to_end_on_real_mrpc(t5_full, tmp_path):
    if not REAL_MRPC.is_dir():
        pytest.skip(f"real GLUE MRPC data not found at {REAL_MRPC}")
    glue = tmp_path / "glue"
    (glue / "MRPC").mkdir(parents=True)
    for name, rows in (("train.tsv", 121), ("dev.tsv", 41)):  # header + real rows
        lines = (REAL_MRPC / name).read_text(encoding="utf-8-sig").splitlines(keepends=True)
        (glue / "MRPC" / name).write_text("".join(lines[:rows]), encoding="utf-8")
    extracted = cli(
        "extract",
        "--model",
        str(t5_full),
        "--task",
        "mrpc",
        "--data-dir",
        str(glue),
        "--route",
        "seq2seq",
        "--dtype",
        "float32",
        "--cache-root",
        str(tmp_path / "cache"),
        "--device",
        "cpu",
        "--quiet",
    )
    cache = extracted.stdout.strip().splitlines()[-1]
    assert open_cache(cache).route == "seq2seq"
    run = tmp_path / "run"
    cli(
        "train",
        "--cache",
        cache,
        "--out",
        str(run),
        "--epochs",
        "2",
        "--batch-size",
        "20",
        "--fusion-variant",
        "gated",
        "--fusion-dropout",
        "0",
        "--device",
        "cpu",
        "--quiet",
    )
    assert json.loads((run / "metrics.json").read_text())["best"]["accuracy"] >= 0
    args = ("evaluate", str(run), "--data-dir", str(glue), "--device", "cpu", "--quiet")
    cli(*args)
    from_cache = json.loads((run / "eval-validation.json").read_text())
    assert from_cache["source"].startswith("cache")
    shutil.rmtree(cache)  # no cache: both sides computed on the fly from the text
    cli(*args)
    on_the_fly = json.loads((run / "eval-validation.json").read_text())
    assert on_the_fly["source"] == "computed on the fly"
    assert on_the_fly["metrics"] == pytest.approx(from_cache["metrics"])
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"sentence1": f"the court said {w} .", "sentence2": "police told it ."})
            + "\n"
            for w in ("today", "monday", "before")
        )
    )
    out = tmp_path / "p.jsonl"
    cli("predict", str(run), "--input", str(pairs), "--output", str(out), "--device", "cpu")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(r["label"] in ("not_equivalent", "equivalent") for r in rows)
    assert all(sum(r["scores"].values()) == pytest.approx(1.0) for r in rows)


def test_verify_recomputes_a_seq2seq_cache(s2s_cache):
    """``verify --recompute`` reruns the route's own model: encoder index L is the raw block
    output there too, so an exact cache verifies clean."""
    from sherl_cache.store.verify import verify_cache

    report = verify_cache(s2s_cache, recompute=2, device="cpu")
    assert report.ok, report.lines()


def test_parameter_counts_cover_the_whole_checkpoint(s2s_cache, t5_full, tmp_path):
    """The trainable share is of the whole T5 (the route uses its decoder and head): the two
    MTSAs and the two fresh norms train, nothing of the backbone."""
    from sherl_cache.training.model import parameter_counts

    cache = open_cache(s2s_cache)
    config = train_config(s2s_cache, tmp_path)
    model = build_model(config, cache, get_task("mrpc"), seq2seq_taps(cache, config), str(t5_full))
    trainable, total = parameter_counts(model, str(t5_full), get_family("t5"))
    reference = reference_model(t5_full)
    fused = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("late."))
    assert trainable == fused and total == sum(p.numel() for p in reference.parameters()) + fused


@pytest.mark.parametrize("point", ["decoder-block-written:train:0", "decoder-block-done:train:0"])
def test_killed_decoder_extraction_resumes(t5_full, glue_dir, s2s_cache, tmp_path, point):
    """SIGKILL in the decoder phase (before or after a block is flagged) leaves an incomplete
    cache; the same command finishes it, equal to an uninterrupted extraction."""
    from sherl_cache.errors import CacheIncompleteError
    from sherl_cache.store.writer import KILL_AT_ENV

    path = str(tmp_path / "cache")
    args = ["--model", str(t5_full), "--task", "mrpc", "--data-dir", str(glue_dir)]
    args += ["--dtype", "float32", "--device", "cpu", "--batch-size", "5", "--cache", path]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", **{KILL_AT_ENV: point})
    killed = subprocess.run(
        [sys.executable, "-m", "sherl_cache.cli", "extract", *args, "--quiet"],
        capture_output=True,
        env=env,
        timeout=600,
    )
    assert killed.returncode == -9
    with pytest.raises(CacheIncompleteError):
        open_cache(path)
    config = ExtractConfig(
        model=str(t5_full),
        task="mrpc",
        data_dir=glue_dir,
        dtype="float32",
        device="cpu",
        batch_size=5,
        cache=path,
    )
    assert extract(config, progress=False).resumed
    resumed, clean = open_cache(path), open_cache(s2s_cache)
    for split in clean.splits:
        assert resumed.decoder_done(split).all()
        for layer in clean.decoder_layout.layers:
            np.testing.assert_allclose(
                resumed.decoder_array(split, layer)[:],
                clean.decoder_array(split, layer)[:],
                rtol=1e-5,  # another process: BLAS may sum in another order
                atol=1e-5,
            )


def test_estimate_counts_the_decoder_side(t5_full, glue_dir, s2s_cache):
    """``estimate`` adds every example's candidate decoder states to the encoder side."""
    from sherl_cache.extraction.estimate import estimate_plan
    from sherl_cache.extraction.plan import plan_extraction

    config = ExtractConfig(model=str(t5_full), task="mrpc", data_dir=glue_dir, dtype="float32")
    plan = plan_extraction(config)
    estimate = estimate_plan(plan)
    cache = open_cache(s2s_cache)
    layout = cache.decoder_layout
    for name, split in estimate.splits.items():
        decoder = sum(cache.decoder_array(name, layer).nbytes for layer in layout.layers)
        encoder = split.tokens * estimate.bytes_per_token + split.rows * 16
        assert split.raw_bytes == encoder + decoder


def test_fused_sweep_on_a_seq2seq_cache_equals_trials_run_alone(s2s_cache, tmp_path):
    """Trials over the seq2seq route fuse like any other and score what they score alone."""
    from sherl_cache.experiments.sweep import SweepConfig, run_sweep

    def sweep(out, fuse):
        config = SweepConfig(
            cache=s2s_cache,
            out=tmp_path / out,
            grid={"lr": [1e-3, 3e-3]},
            fixed={"epochs": 1, "batch_size": 8, "device": "cpu"},
            fuse=fuse,
        )
        return run_sweep(config).rows

    fused, alone = sweep("fused", True), sweep("alone", False)
    assert [r["status"] for r in fused] == ["ok", "ok"]
    run = tmp_path / "fused" / fused[0]["path"]
    assert json.loads((run / "metrics.json").read_text())["fused_trials"] == 2
    for a, b in zip(fused, alone, strict=True):
        assert a["accuracy"] == b["accuracy"] and a["best_loss"] == b["best_loss"]
