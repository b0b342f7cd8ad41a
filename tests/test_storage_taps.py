"""Stage two's memory levers for half-precision caches and ``--precision bf16``.

- float16/bfloat16 taps stay in their storage dtype until the fusion's first matmul
  (``CachedFeatures`` delivers them so, ``storage_linear`` saves them so for backward), with
  results bitwise identical to decoding them to float32 first;
- ``--precision bf16`` runs the late route under bf16 autocast on the CPU too, its frozen
  linears stored in bfloat16 (bitwise identical to autocast over float32 weights).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_extract_config
from torch import nn

from sherl_cache import open_cache
from sherl_cache.config.train import TrainConfig
from sherl_cache.extraction.extract import ExtractConfig, extract
from sherl_cache.training import loop
from sherl_cache.training.discovery import task_of
from sherl_cache.training.features import CachedFeatures
from sherl_cache.training.fusion import FusionConfig, MTSAFusion
from sherl_cache.training.loop import evaluate, fit, late_bf16, place
from sherl_cache.training.model import build_model, trainable_state
from sherl_cache.training.storage_linear import first_linear

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def half_caches(tmp_path_factory, tiny_models, glue_dir) -> dict[tuple[str, str], str]:
    """Every hidden state of the tiny BERT and Llama, in float16 and bfloat16."""
    root = tmp_path_factory.mktemp("half-caches")
    made = {}
    for family, dtype in (("bert", "float16"), ("bert", "bfloat16"), ("llama", "bfloat16")):
        config = tiny_extract_config(tiny_models[family], glue_dir, root, dtype=dtype, layers="all")
        made[family, dtype] = extract(config, progress=False).path
    return made


def train_config(tmp_path, cache: str, **overrides) -> TrainConfig:
    values = dict(
        cache=cache,
        out=tmp_path / "run",
        late_layers=1,
        epochs=1,
        batch_size=8,
        lr=1e-2,
        warmup_ratio=0.0,
        fusion_dropout=0.0,
        head_dropout=0.0,
    )
    return TrainConfig(**(values | overrides))


def trained(config: TrainConfig, taps, model_path, *, keep: bool, steps: int = 3):
    """(model, fit result, validation outputs) of a few seeded steps on ``config.cache``."""
    cache = open_cache(config.cache)
    task = task_of(cache, None)
    split = cache.num_layers - config.late_layers
    model = build_model(config, cache, task, taps, str(model_path))
    for module in model.modules():  # the late layers' own dropout too
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    source = CachedFeatures(cache, "train", taps, split, keep_storage_dtype=keep)
    held_out = CachedFeatures(cache, "validation", taps, split, keep_storage_dtype=keep)
    result = fit(model, source, None, task, config, CPU, max_steps=steps, progress=False)
    outputs, _ = evaluate(model, held_out, task, CPU, config.batch_size)
    return model, result, outputs


def assert_same_training(a, b) -> None:
    (model_a, fit_a, out_a), (model_b, fit_b, out_b) = a, b
    assert fit_a.step_losses == fit_b.step_losses
    state_a, state_b = trainable_state(model_a), trainable_state(model_b)
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        torch.testing.assert_close(state_a[name], state_b[name], rtol=0, atol=0, msg=name)
    np.testing.assert_array_equal(out_a, out_b)


# --- taps in their storage dtype --------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "dtype", "late_mode", "variant", "taps"),
    [
        ("bert", "float16", "lora", "linear", [0, 1, 2, 3]),  # the guide is the split layer
        ("bert", "bfloat16", "frozen", "gated", [0, 2]),  # the split layer is no tap
        ("llama", "bfloat16", "full", "linear", [1, 2, 3]),
        ("llama", "bfloat16", "lora", "gated", [0, 1, 2, 3]),
    ],
)
def test_storage_dtype_taps_train_bitwise_like_float32(
    tmp_path, half_caches, tiny_models, family, dtype, late_mode, variant, taps
):
    cache = half_caches[family, dtype]
    config = train_config(tmp_path, cache, late_mode=late_mode, fusion_variant=variant)
    kept = trained(config, taps, tiny_models[family], keep=True)
    decoded = trained(config, taps, tiny_models[family], keep=False)
    assert_same_training(kept, decoded)
    assert all(np.isfinite(kept[1].step_losses))


def test_batches_keep_the_storage_dtype_and_decode_the_split_layer_once(half_caches):
    cache = open_cache(half_caches["llama", "bfloat16"])
    indices = np.arange(5)
    kept = CachedFeatures(cache, "train", [0, 2, 3], 3).batch(indices, CPU)
    decoded = CachedFeatures(cache, "train", [0, 2, 3], 3, keep_storage_dtype=False).batch(
        indices, CPU
    )
    assert {t.dtype for t in kept.taps} == {torch.bfloat16} and kept.last.dtype == torch.bfloat16
    assert {t.dtype for t in decoded.taps} == {torch.float32}
    assert kept.last is kept.taps[-1]  # the guide is the split layer: one tensor for both
    for a, b in zip([*kept.taps, kept.last], [*decoded.taps, decoded.last], strict=True):
        torch.testing.assert_close(a.float(), b, rtol=0, atol=0)
    lengths = cache.offsets("train")[1:6] - cache.offsets("train")[:5]
    for row, n in enumerate(lengths):
        assert (kept.taps[0][row, n:] == 0).all()  # padding zeroed in the storage dtype
    float16 = open_cache(half_caches["bert", "float16"])
    assert CachedFeatures(float16, "train", [1], 3).batch(indices, CPU).last.dtype == torch.float16


def test_seq2seq_route_takes_storage_dtype_encoder_taps(tmp_path, glue_dir):
    from dataclasses import replace

    from test_seq2seq import build_seq2seq_t5

    from sherl_cache.training.seq2seq import Seq2SeqCachedFeatures, seq2seq_taps

    model_path = build_seq2seq_t5(tmp_path / "t5")
    extracted = ExtractConfig(
        model=str(model_path),
        task="mrpc",
        data_dir=glue_dir,
        cache_root=tmp_path / "caches",
        dtype="bfloat16",
        device="cpu",
    )
    cache = open_cache(extract(extracted, progress=False).path)
    config = train_config(tmp_path, cache.path, late_layers=1, fusion_variant="gated")
    taps = seq2seq_taps(cache, config)
    model = build_model(config, cache, task_of(cache, None), taps, str(model_path)).eval()
    batch = Seq2SeqCachedFeatures(cache, "train", taps).batch(np.arange(6), CPU)
    assert {t.dtype for t in batch.taps} == {torch.bfloat16}
    widened = replace(batch, taps=[t.float() for t in batch.taps], last=batch.last.float())
    results = []
    for each in (batch, widened):
        model.zero_grad()
        model.loss(model(each), each.labels).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((model(each).detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    assert results[0][1].keys() == results[1][1].keys()
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], rtol=0, atol=0, msg=name)


def saved_while(run) -> list[tuple[int, torch.dtype, int]]:
    """(data_ptr, dtype, numel) of every tensor autograd saves while ``run()`` builds a graph."""
    saved = []

    def pack(tensor):
        saved.append((tensor.untyped_storage().data_ptr(), tensor.dtype, tensor.numel()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return saved


@pytest.mark.parametrize("variant", ["linear", "gated"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autograd_saves_taps_in_their_storage_dtype(variant, dtype):
    torch.manual_seed(0)
    shape = (2, 7, 32)
    config = FusionConfig(hidden_size=32, num_taps=3, reduction=4, dropout=0.0, variant=variant)
    fusion = MTSAFusion(config)
    taps = [torch.randn(shape).to(dtype) for _ in range(3)]
    last = taps[-1]
    big = int(np.prod(shape))

    def distinct(saved, wanted):
        return {ptr for ptr, kind, numel in saved if kind == wanted and numel == big}

    kept = saved_while(lambda: fusion(taps, last).sum().backward())
    grads = {n: p.grad.clone() for n, p in fusion.named_parameters()}
    fusion.zero_grad()
    widened = [t.float() for t in taps]
    plain = saved_while(lambda: fusion(widened, widened[-1]).sum().backward())
    tap_storage = {t.untyped_storage().data_ptr() for t in taps}
    assert distinct(kept, dtype) == tap_storage  # each tap saved once, in its own dtype
    # The float32 path saves a float32 copy of every tap besides what both paths save (saved
    # tensors live until backward, so distinct storages are distinct tensors).
    widened_storage = {t.untyped_storage().data_ptr() for t in widened}
    assert widened_storage <= distinct(plain, torch.float32)
    assert len(distinct(plain, torch.float32)) == len(distinct(kept, torch.float32)) + len(taps)
    assert not distinct(plain, dtype)
    for name, param in fusion.named_parameters():  # and the gradients are identical
        torch.testing.assert_close(grads[name], param.grad, rtol=0, atol=0, msg=name)


def test_first_linear_matches_the_float32_linear_bitwise():
    torch.manual_seed(1)
    layer = nn.Linear(64, 16)
    tap = torch.randn(3, 11, 64).to(torch.bfloat16).requires_grad_(True)
    widened = tap.detach().float().requires_grad_(True)
    grad = torch.randn(3, 11, 16)
    out = first_linear(layer, tap)
    out.backward(grad)
    got = [layer.weight.grad.clone(), layer.bias.grad.clone(), tap.grad.float()]
    layer.zero_grad()
    expected = layer(widened)
    expected.backward(grad)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(got[0], layer.weight.grad, rtol=0, atol=0)
    torch.testing.assert_close(got[1], layer.bias.grad, rtol=0, atol=0)
    torch.testing.assert_close(got[2], widened.grad.to(torch.bfloat16).float(), rtol=0, atol=0)
    assert first_linear(layer, widened) is not None  # float32: the plain layer


# --- --precision bf16 on the CPU ---------------------------------------------------------------


def late_linears(model) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.late.named_modules() if isinstance(m, nn.Linear)}


def test_auto_stays_float32_on_the_cpu_and_bf16_is_honoured():
    assert not late_bf16("auto", CPU) and not late_bf16("float32", CPU)
    assert late_bf16("bf16", CPU)


@pytest.mark.parametrize("late_mode", ["frozen", "lora", "full"])
def test_bf16_on_cpu_stores_frozen_late_linears_in_bf16(
    tmp_path, half_caches, tiny_models, late_mode
):
    config = train_config(
        tmp_path, half_caches["llama", "bfloat16"], late_mode=late_mode, precision="bf16"
    )
    seen = []
    model, result, _ = trained(config, [0, 1, 2, 3], tiny_models["llama"], keep=True, steps=2)
    assert model.late_bf16 and all(np.isfinite(result.step_losses))
    for layer in late_linears(model).values():
        layer.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    cache = open_cache(config.cache)
    evaluate(
        model, CachedFeatures(cache, "validation", [0, 1, 2, 3], 3), task_of(cache, None), CPU, 8
    )
    assert set(seen) == {torch.bfloat16}  # the late route's linears ran under bf16 autocast
    linears = late_linears(model)
    assert linears
    for name, layer in linears.items():
        adapter = "lora_" in name
        frozen = late_mode == "frozen" or (late_mode == "lora" and not adapter)
        expected = torch.bfloat16 if frozen else torch.float32
        assert layer.weight.dtype == expected, name
        assert layer.weight.requires_grad == (not frozen), name
    for name, param in model.named_parameters():
        if not name.startswith("late.") or "norm" in name:
            assert param.dtype == torch.float32, name  # fusion, head and norms


def test_bf16_weights_equal_autocast_over_float32_weights(
    tmp_path, half_caches, tiny_models, monkeypatch
):
    config = train_config(
        tmp_path, half_caches["llama", "bfloat16"], late_mode="lora", precision="bf16"
    )
    stored = trained(config, [0, 1, 2, 3], tiny_models["llama"], keep=True)
    monkeypatch.setattr(loop, "store_frozen_bf16", lambda route: 0)
    autocast = trained(config, [0, 1, 2, 3], tiny_models["llama"], keep=True)
    assert {m.weight.dtype for m in late_linears(autocast[0]).values()} == {torch.float32}
    assert_same_training(stored, autocast)


def test_auto_on_cpu_and_loaded_runs_keep_float32(tmp_path, half_caches, tiny_models):
    cache_path = half_caches["llama", "bfloat16"]
    config = train_config(tmp_path, cache_path, late_mode="frozen")
    cache = open_cache(cache_path)
    model = build_model(
        config, cache, task_of(cache, None), [0, 1, 2, 3], str(tiny_models["llama"])
    )
    place(model, CPU, "auto")
    assert not model.late_bf16
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    # Nothing to train (a run loaded for prediction): the weights stay as they were saved.
    place(model.requires_grad_(False), CPU, "bf16")
    assert model.late_bf16 and {p.dtype for p in model.parameters()} == {torch.float32}
