"""Properties of the MTSA fusion that SHERL's argument rests on, pinned on toy tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from sherl_cache.errors import ConfigError
from sherl_cache.training.fusion import (
    FUSION_VARIANTS,
    FusionConfig,
    GatedProjection,
    LinearProjection,
    MTSAFusion,
    layer_redundancy,
)

B, T, D = 2, 5, 16


def make_fusion(num_taps: int, variant: str = "linear", reduction: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    fusion = MTSAFusion(
        FusionConfig(hidden_size=D, num_taps=num_taps, reduction=reduction, variant=variant)
    )
    return fusion.eval()


def make_taps(num_taps: int, seed: int = 1, d: int = D) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, d, generator=gen) for _ in range(num_taps)]


def set_identity_projections(fusion: MTSAFusion) -> None:
    """Make every linear-variant tap projection ``LayerNorm(x)``: directions of zero-mean
    inputs survive, so cosines and alignments can be worked out by hand."""
    with torch.no_grad():
        for projection in fusion.projections:
            assert isinstance(projection, LinearProjection)
            projection.linear.weight.copy_(torch.eye(projection.linear.out_features))
            projection.linear.bias.zero_()
            projection.norm.weight.fill_(1.0)
            projection.norm.bias.zero_()
        fusion.scorer.weight.fill_(1.0)  # w positive: score = ReLU(<h_l, h_guide>)
        fusion.scorer.bias.zero_()


def tokens(*vectors: list[float]) -> list[Tensor]:
    """One (1, 1, d) tap per vector: a single token is enough for per-token maths."""
    return [torch.tensor(v, dtype=torch.float32).view(1, 1, -1) for v in vectors]


def reference_forward(fusion: MTSAFusion, taps: list[Tensor], last: Tensor) -> Tensor:
    """The spec, token by token with plain loops, as an independent check of the batched code."""
    out = torch.empty_like(last)
    for b in range(last.shape[0]):
        for t in range(last.shape[1]):
            hs = [proj(tap[b, t]) for proj, tap in zip(fusion.projections, taps, strict=True)]
            guide, shallow = hs[-1], hs[:-1]
            scores = []
            for hl in shallow:
                redundancy = sum(
                    torch.relu(torch.cosine_similarity(hl, hj, dim=0, eps=1e-12)) for hj in shallow
                )
                scores.append(torch.relu(fusion.scorer(hl * guide)).squeeze() / redundancy)
            total = sum(s.abs() for s in scores) + 1e-6 if scores else None
            aggregate = guide + sum((s / total) * hl for s, hl in zip(scores, shallow, strict=True))
            fused = fusion.out_norm(fusion.out_proj(torch.relu(aggregate)))
            out[b, t] = fused + math.tanh(fusion.gate.item() / 0.1) * last[b, t]
    return out


@pytest.mark.parametrize("variant", FUSION_VARIANTS)
@pytest.mark.parametrize("num_taps", [1, 2, 4])
def test_matches_token_by_token_reference(variant: str, num_taps: int) -> None:
    fusion = make_fusion(num_taps, variant)
    with torch.no_grad():
        fusion.gate.fill_(0.03)
    taps, last = make_taps(num_taps), torch.randn(B, T, D)
    with torch.no_grad():
        got = fusion(taps, last)
        expected = reference_forward(fusion, taps, last)
    assert got.shape == (B, T, D)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", FUSION_VARIANTS)
def test_weights_non_negative_and_l1_normalised(variant: str) -> None:
    fusion = make_fusion(5, variant)
    with torch.no_grad():
        fusion.scorer.bias.fill_(0.5)  # make every score positive, so the sum must be 1
        weights = fusion.layer_weights(make_taps(5))
    assert weights.shape == (B, T, 4)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, T), rtol=0, atol=1e-5)


def test_all_scores_zero_gives_zero_weights_and_guide_only() -> None:
    fusion = make_fusion(3)
    with torch.no_grad():
        fusion.scorer.weight.zero_()
        fusion.scorer.bias.fill_(-1.0)  # ReLU kills every score
        taps, last = make_taps(3), torch.randn(B, T, D)
        weights = fusion.layer_weights(taps)
        guide_only = fusion.out_norm(fusion.out_proj(torch.relu(fusion.projections[2](taps[2]))))
        got = fusion(taps, last)
    assert torch.equal(weights, torch.zeros(B, T, 2))
    torch.testing.assert_close(got, guide_only)


def test_duplicated_layer_shares_its_weight_exactly() -> None:
    # A and B orthogonal, both equally aligned with the guide: 1/2 each. Listing A twice makes
    # each copy redundant with the other, halving both, so A as a whole keeps 1/2.
    a, b, guide = [1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 1.0, -1.0], [1.0, -1.0, 1.0, -1.0]
    single = MTSAFusion(FusionConfig(hidden_size=4, num_taps=3, reduction=1)).eval()
    double = MTSAFusion(FusionConfig(hidden_size=4, num_taps=4, reduction=1)).eval()
    set_identity_projections(single)
    set_identity_projections(double)
    with torch.no_grad():
        w_single = single.layer_weights(tokens(a, b, guide)).flatten()
        w_double = double.layer_weights(tokens(a, a, b, guide)).flatten()
    torch.testing.assert_close(w_single, torch.tensor([0.5, 0.5]), rtol=0, atol=1e-5)
    torch.testing.assert_close(w_double, torch.tensor([0.25, 0.25, 0.5]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", FUSION_VARIANTS)
def test_duplicating_a_layer_lowers_each_copy_weight(variant: str) -> None:
    # Holds for any features as long as the duplicated layer's score is positive: its
    # redundancy grows by 1 while its competitors' grow by at most 1 (cosine <= 1).
    single = make_fusion(3, variant)
    double = make_fusion(4, variant)
    with torch.no_grad():
        shared = single.projections[0].state_dict()
        for fusion in (single, double):
            for projection in fusion.projections:
                projection.load_state_dict(shared)  # same tap -> same projected feature
        for scorer in (single.scorer, double.scorer):
            scorer.weight.fill_(0.01)  # small w, bias 1: every score positive, still varied
            scorer.bias.fill_(1.0)
        a, b, guide = make_taps(3, seed=7)
        w_single = single.layer_weights([a, b, guide])
        w_double = double.layer_weights([a, a, b, guide])
    assert (w_single[..., 0] > 0).all()
    assert (w_double[..., 0] < w_single[..., 0]).all()
    torch.testing.assert_close(w_double[..., 0], w_double[..., 1])


def test_layer_more_aligned_with_guide_gets_more_weight() -> None:
    # Orthogonal A and B (redundancy 1 each); <A, G> is twice <B, G>, so weights 2/3 and 1/3.
    fusion = MTSAFusion(FusionConfig(hidden_size=4, num_taps=3, reduction=1)).eval()
    set_identity_projections(fusion)
    a, b, guide = [1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 1.0, -1.0], [2.0, -2.0, 1.0, -1.0]
    with torch.no_grad():
        weights = fusion.layer_weights(tokens(a, b, guide)).flatten()
    torch.testing.assert_close(weights, torch.tensor([2 / 3, 1 / 3]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", FUSION_VARIANTS)
def test_zero_gate_ignores_last_feature_exactly(variant: str) -> None:
    fusion = make_fusion(3, variant).train()  # dropout on: still no path from last_feature
    taps = make_taps(3)
    outputs = []
    for last in (torch.zeros(B, T, D), 1e6 * torch.randn(B, T, D)):
        torch.manual_seed(123)
        outputs.append(fusion(taps, last))
    assert fusion.gate.item() == 0.0
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("variant", FUSION_VARIANTS)
def test_open_gate_adds_scaled_last_feature(variant: str) -> None:
    fusion = make_fusion(3, variant)
    taps, last = make_taps(3), torch.randn(B, T, D)
    with torch.no_grad():
        closed = fusion(taps, last)
        fusion.gate.fill_(0.05)
        opened = fusion(taps, last)
    torch.testing.assert_close(opened - closed, math.tanh(0.05 / 0.1) * last)
    assert fusion.gate_value().item() == pytest.approx(math.tanh(0.5))


@pytest.mark.parametrize("variant", FUSION_VARIANTS)
def test_gradient_reaches_gate_projections_and_scorer(variant: str) -> None:
    fusion = make_fusion(4, variant).train()
    taps, last = make_taps(4), torch.randn(B, T, D)
    # A random readout: a plain sum would cancel through the output LayerNorm.
    readout = torch.randn(B, T, D, generator=torch.Generator().manual_seed(3))
    (fusion(taps, last) * readout).sum().backward()
    # g = 0 at start, yet d tanh(g/T)/dg = 1/T, so the gate can open from the first step.
    assert fusion.gate.grad is not None and fusion.gate.grad.abs().item() > 0
    for name, param in fusion.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    for index, projection in enumerate(fusion.projections):
        grads = [p.grad for p in projection.parameters()]
        assert any(g.abs().sum() > 0 for g in grads), f"no gradient to projection {index}"
    assert fusion.scorer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", FUSION_VARIANTS)
def test_residual_init_starts_as_the_pretrained_network_and_learns(variant: str) -> None:
    fusion = MTSAFusion(FusionConfig(hidden_size=D, num_taps=3, variant=variant, init="residual"))
    fusion.train()  # dropout on: a zero branch stays zero
    taps, last = make_taps(3), torch.randn(B, T, D)
    out = fusion(taps, last)
    assert torch.equal(out, last)
    readout = torch.randn(B, T, D, generator=torch.Generator().manual_seed(3))
    (out * readout).sum().backward()
    # The zeroed last scale learns first; the rest of the branch follows once it is non-zero.
    last_scale = fusion.out_norm if variant == "linear" else fusion.out_proj
    assert last_scale.weight.grad.abs().sum() > 0
    torch.optim.SGD(fusion.parameters(), lr=0.1).step()
    assert not torch.equal(fusion(taps, last), last)


@pytest.mark.parametrize("variant", FUSION_VARIANTS)
def test_single_tap_uses_guide_alone(variant: str) -> None:
    fusion = make_fusion(1, variant)
    (guide,), last = make_taps(1), torch.randn(B, T, D)
    with torch.no_grad():
        fusion.gate.fill_(0.02)
        expected = fusion.out_norm(fusion.out_proj(torch.relu(fusion.projections[0](guide))))
        expected = expected + math.tanh(0.2) * last
        got = fusion([guide], last, torch.ones(B, T))
        weights = fusion.layer_weights([guide])
    torch.testing.assert_close(got, expected)
    assert weights.shape == (B, T, 0)


@pytest.mark.parametrize("variant", FUSION_VARIANTS)
def test_variants_have_their_reference_layers(variant: str) -> None:
    fusion = make_fusion(2, variant)
    kind = LinearProjection if variant == "linear" else GatedProjection
    assert all(isinstance(p, kind) for p in fusion.projections)
    assert isinstance(fusion.out_norm, nn.LayerNorm if variant == "linear" else nn.Identity)


@pytest.mark.parametrize("variant", FUSION_VARIANTS)
def test_padded_tokens_stay_finite_and_leave_real_tokens_alone(variant: str) -> None:
    fusion = make_fusion(4, variant).train()
    taps, last = make_taps(4), torch.randn(B, T, D)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 3:] = 0
    mask[1, 1:] = 0
    pads = mask == 0
    padded = [tap.masked_fill(pads.unsqueeze(-1), 0.0).requires_grad_() for tap in taps]
    last = last.masked_fill(pads.unsqueeze(-1), 0.0)

    with_mask = fusion(padded, last, mask)
    (with_mask * torch.randn_like(with_mask)).sum().backward()
    assert torch.isfinite(with_mask).all()
    assert all(torch.isfinite(tap.grad).all() for tap in padded)
    assert all(torch.isfinite(p.grad).all() for p in fusion.parameters())

    fusion.eval()
    with torch.no_grad():
        masked = fusion(padded, last, mask.bool())
        unmasked = fusion(padded, last)
        weights = fusion.layer_weights(padded, mask.float())
    assert torch.equal(masked[~pads], unmasked[~pads])
    assert torch.equal(weights[pads], torch.zeros_like(weights[pads]))


def test_redundancy_counts_self_once_and_survives_zero_vectors() -> None:
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, 0.0]])
    # Two copies of e1 see each other (+1); e2 is orthogonal; -e1 is anti-correlated (ReLU'd
    # away); the zero row has cosine 0 with everything, and counts only itself.
    torch.testing.assert_close(layer_redundancy(features), torch.tensor([2.0, 2.0, 1, 1, 1]))

    fusion = MTSAFusion(FusionConfig(hidden_size=4, num_taps=3, reduction=1, variant="gated"))
    with torch.no_grad():
        for projection in fusion.projections:
            for param in projection.parameters():
                param.zero_()  # every projected feature is exactly 0
        fusion.scorer.bias.fill_(1.0)
        taps = [torch.zeros(1, 2, 4) for _ in range(3)]
        weights = fusion.layer_weights(taps)
        out = fusion(taps, torch.zeros(1, 2, 4))
    assert torch.isfinite(weights).all() and torch.isfinite(out).all()


def test_parameter_count_for_t5_large_shape() -> None:
    """Trainable parameters at d=1024 (T5-large, BERT-large), r=8 (h=128), 13 taps.

    linear: 13 * (d*h + h + 2h) [Linear+LayerNorm per tap] + (h + 1) [w]
            + (h*d + d) [out Linear] + 2d [out LayerNorm] + 1 [gate]           = 1,843,202
    gated:  13 * (d*h + h + 2(h*h + h)) [fc1, fc2, fc3 per tap] + (h + 1)
            + (h*d + d) + 1                                                    = 2,267,138

    For the paper's 0.64% on T5-large GLUE: the reference puts one gated module in the encoder
    (embedding + 13 layers = 14 taps: 2,431,362) and one in the decoder (13 taps) with a T5
    LayerNorm each, ~4.70M in all, ~0.64% of T5-large's ~737.7M.
    """
    d, r, n = 1024, 8, 13
    h = d // r
    expected = {
        "linear": n * (d * h + h + 2 * h) + (h + 1) + (h * d + d) + 2 * d + 1,
        "gated": n * (d * h + h + 2 * (h * h + h)) + (h + 1) + (h * d + d) + 1,
    }
    assert expected == {"linear": 1_843_202, "gated": 2_267_138}
    for variant, count in expected.items():
        fusion = MTSAFusion(FusionConfig(hidden_size=d, num_taps=n, reduction=r, variant=variant))
        assert sum(p.numel() for p in fusion.parameters() if p.requires_grad) == count


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"num_taps": 0}, "--tap"),
        ({"num_taps": True}, "--tap"),
        ({"reduction": 0}, "--reduction"),
        ({"reduction": 17}, "--reduction"),
        ({"dropout": 1.0}, "--fusion-dropout"),
        ({"dropout": -0.1}, "--fusion-dropout"),
        ({"dropout": float("nan")}, "--fusion-dropout"),
        ({"dropout": "0.1"}, "--fusion-dropout"),
        ({"variant": "lstm"}, "--fusion-variant"),
        ({"init": "zeros"}, "--fusion-init"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"gate_temperature": 0.0}, "gate_temperature"),
    ],
)
def test_config_errors_name_the_flag(kwargs: dict, flag: str) -> None:
    settings = {"hidden_size": D, "num_taps": 3, **kwargs}
    with pytest.raises(ConfigError, match=flag):
        FusionConfig(**settings)


def test_config_accepts_edge_values() -> None:
    config = FusionConfig(hidden_size=D, num_taps=1, reduction=D, dropout=0.0, variant="gated")
    assert config.bottleneck_size == 1 and config.num_shallow == 0


def test_forward_rejects_mismatched_inputs() -> None:
    fusion = make_fusion(3)
    taps, last = make_taps(3), torch.randn(B, T, D)
    with pytest.raises(ConfigError, match="--tap"):
        fusion(taps[:2], last)
    with pytest.raises(ValueError, match="tap 1"):
        fusion([taps[0], taps[1][:, :-1], taps[2]], last)
    with pytest.raises(ValueError, match="tap 0"):
        fusion(make_taps(3, d=D + 1), last)
    with pytest.raises(ValueError, match="last_feature"):
        fusion(taps, last[:1])
    with pytest.raises(ValueError, match="attention_mask"):
        fusion(taps, last, torch.ones(B, T + 1))
    with pytest.raises(ValueError, match=r"\(batch, tokens, hidden\)"):
        fusion([tap[0] for tap in taps], last)
