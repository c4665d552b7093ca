"""ISA as the keyframe pass's slimming policy (core/adaflow/keyframe_isa.py, policy 'isa').

Expectations, none computed by the code under test:
- attention level: with every ratio at "keep everything" the output is exact extended attention (float64
  softmax over all K*T tokens), through the sharp path (alpha_f = 1) and through the Taylor path with every
  kept block near (alpha_f = 0, alpha_ns = 1);
- with slimming and alpha_f in {0, 1} (where routing the own blocks only and routing all blocks agree) it is
  the kernels' loop-by-loop ISA definition (`isa_reference`) on the in-context sequence [own | others],
  built here by hand, restricted to the own rows; with alpha_f in between, the sharp own blocks are exactly
  ceil(alpha_f * own blocks) per head and every row is `isa_attention_reference` under that routing;
- every ISA output row is a convex combination of value rows (kept tokens and block means), so it lies in
  the per-channel range of v;
- model level: AdaFlow's step through KeyframeEditor (five layers on three token grids, three keyframes,
  PnP on, propagation on) with policy 'isa' keeping everything equals the float64 transcription of full
  extended attention in test_adaflow_semantics; slimmed, it differs from it by more than float error.
Sizes are odd (grids 6x10, 3x5, 2x3; T = 63 and 20 with blocks of 16) so partial blocks and an index mix-up
between keyframes show.
"""
from __future__ import annotations

import math

import pytest
import torch

from longedit.core.adaflow.attention import PassLayout, adaflow_self_attention
from longedit.core.adaflow.edit import KeyframeEditor
from longedit.core.adaflow.keyframe_isa import keyframe_isa_attention, keyframe_isa_plan, in_context_sequences
from longedit.core.adaflow.slimming import KeyframeSlimming, effective_slimming
from longedit.core.errors import LongEditError
from longedit.kernels.isa_reference import count_for_ratio, isa_attention_reference, isa_reference, plan_isa

from . import test_adaflow_semantics as semantics

HEADS, D = 3, 8
KEEP_ALL = dict(alpha_s=1.0, alpha_f=1.0, alpha_ns=1.0, block_size=16)


def keyframe_qkv(frames: int, tokens: int, seed: int, gain: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    shape = (frames, tokens, HEADS * D)
    q = torch.randn(shape, generator=g) * gain  # peaked attention: a wrong key set moves the output clearly
    return q, torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def extended64(q, k, v) -> torch.Tensor:
    """Every keyframe's tokens attend to all K*T tokens: float64 softmax per head."""
    frames, tokens, width = q.shape
    out = torch.empty(q.shape, dtype=torch.float64)
    keys, values = k.double().reshape(-1, width), v.double().reshape(-1, width)
    for h in range(HEADS):
        cols = slice(h * D, (h + 1) * D)
        logits = q.double().reshape(-1, width)[:, cols] @ keys[:, cols].T / math.sqrt(D)
        out.view(-1, width)[:, cols] = logits.softmax(dim=-1) @ values[:, cols]
    return out


def by_hand_sequence(x: torch.Tensor, query: int) -> torch.Tensor:
    """[1, H, K*T, d]: keyframe `query`'s tokens first, then the other keyframes' in keyframe order."""
    frames, tokens, width = x.shape
    parts = [x[query]] + [x[j] for j in range(frames) if j != query]
    return torch.cat(parts).view(1, frames * tokens, HEADS, D).transpose(1, 2)


def rows_of(x: torch.Tensor, tokens: int) -> torch.Tensor:
    """[1, H, N, d] -> the first `tokens` rows as [tokens, H*d]."""
    return x[0, :, :tokens].transpose(0, 1).reshape(tokens, HEADS * D)


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# float32 softmax attention over <= 5*63 keys of unit-scale values against float64: each output is a sum of
# a few hundred float32 products, relative error ~ sqrt(n) * 2^-24 ~ 1e-6; 1e-5 leaves room, far below
# the ~1e-1 that slimming or a wrong key set moves it.
TOL = 1e-5


@pytest.mark.parametrize("frames,tokens", [(3, 63), (5, 20)])
@pytest.mark.parametrize("route", ["sharp", "taylor"])
def test_keep_everything_is_exact_extended_attention(frames, tokens, route):
    q, k, v = keyframe_qkv(frames, tokens, seed=frames)
    ratios = dict(KEEP_ALL) if route == "sharp" else dict(KEEP_ALL, alpha_f=0.0)
    got = keyframe_isa_attention(q, k, v, HEADS, KeyframeSlimming(policy="isa", backend="torch", **ratios))
    assert rel(got, extended64(q, k, v)) < TOL


@pytest.mark.parametrize("alpha_f,alpha_ns", [(0.0, 0.2), (1.0, 0.2), (0.0, 0.0)])  # alpha_ns 0: one near block
def test_slimmed_rows_are_isa_on_the_in_context_sequence(alpha_f, alpha_ns):
    frames, tokens = 4, 63
    q, k, v = keyframe_qkv(frames, tokens, seed=7)
    settings = KeyframeSlimming(policy="isa", alpha_s=0.3, alpha_f=alpha_f, alpha_ns=alpha_ns, block_size=16,
                                backend="torch")
    got = keyframe_isa_attention(q, k, v, HEADS, settings, chunk_bytes=1)  # one query keyframe at a time
    for i in range(frames):
        qs, ks, vs = (by_hand_sequence(x, i) for x in (q, k, v))
        expected = isa_reference(qs, ks, vs, tokens, frames * tokens, block_size=16, alpha_s=0.3,
                                 alpha_f=alpha_f, alpha_ns=alpha_ns)
        assert rel(got[i], rows_of(expected, tokens)) < TOL, f"keyframe {i}"
    full = extended64(q, k, v)
    assert rel(got, full) > 100 * TOL  # slimming is not exact attention


def test_partial_sharp_routing_counts_and_rows():
    frames, tokens = 3, 63
    q, k, v = keyframe_qkv(frames, tokens, seed=3)
    settings = KeyframeSlimming(policy="isa", alpha_s=0.5, alpha_f=0.5, alpha_ns=0.25, block_size=16,
                                backend="torch")
    got = keyframe_isa_attention(q, k, v, HEADS, settings)
    own_blocks = math.ceil(tokens / 16)
    for i in range(frames):
        qs, ks, vs = (by_hand_sequence(x, i) for x in (q, k, v))
        assert torch.equal(in_context_sequences(q, [i], HEADS), qs)
        plan = keyframe_isa_plan(qs, ks, vs, tokens, settings)
        assert (plan.exact_query[..., :own_blocks].sum(-1) == count_for_ratio(0.5, own_blocks)).all()
        assert not plan.exact_query[..., own_blocks:].any()  # the context's rows are not routed
        # the same routing through the kernels' full planner and loop-by-loop attention
        reference_plan = plan_isa(qs, ks, vs, tokens, frames * tokens, block_size=16, alpha_s=0.5, alpha_ns=0.25,
                                  exact_query=plan.exact_query)
        assert torch.equal(reference_plan.kept_blocks, plan.kept_blocks)
        expected = isa_attention_reference(qs, ks, vs, reference_plan)
        assert rel(got[i], rows_of(expected, tokens)) < TOL, f"keyframe {i}"


def test_outputs_stay_in_the_range_of_the_values():
    q, k, v = keyframe_qkv(5, 20, seed=11, gain=4.0)
    settings = KeyframeSlimming(policy="isa", alpha_s=0.25, alpha_f=0.25, alpha_ns=0.1, block_size=16,
                                backend="torch")
    got = keyframe_isa_attention(q, k, v, HEADS, settings).reshape(-1, HEADS * D)
    low, high = v.reshape(-1, HEADS * D).min(0).values, v.reshape(-1, HEADS * D).max(0).values
    slack = 1e-5 * v.abs().max()
    assert (got >= low - slack).all() and (got <= high + slack).all()


def test_pass_layout_routes_edited_branches_through_isa_and_the_source_per_frame():
    branches, frames, tokens = 3, 3, 20  # source + two edited branches
    q, k, v = keyframe_qkv(branches * frames, tokens, seed=5)
    settings = KeyframeSlimming(policy="isa", alpha_s=0.5, alpha_f=0.5, alpha_ns=0.25, block_size=16,
                                backend="torch")
    layout = PassLayout(frames=frames, branches=branches, has_source=True, inject_qk=False, inject_conv=False,
                        isa=settings)
    got = adaflow_self_attention(q, k, v, HEADS, layout, pnp_layer=False)
    source = extended64(q[0:1], k[0:1], v[0:1])  # one frame at a time: per-frame attention
    for f in range(frames):
        assert rel(got[f], extended64(q[f:f + 1], k[f:f + 1], v[f:f + 1])[0]) < TOL
    del source
    for b in (1, 2):
        rows = slice(b * frames, (b + 1) * frames)
        expected = keyframe_isa_attention(q[rows], k[rows], v[rows], HEADS, settings)
        assert torch.allclose(got[rows], expected, atol=0, rtol=0)


def test_mismatched_shapes_are_refused():
    q, k, v = keyframe_qkv(3, 20, seed=1)
    settings = KeyframeSlimming(policy="isa", block_size=16, backend="torch")
    for bad in ((q, k[:2], v), (q, k, v[:, :19])):
        with pytest.raises(ValueError, match="share one shape"):
            keyframe_isa_attention(*bad, HEADS, settings)


def test_settings_precedence_and_validation():
    assert effective_slimming({"kv_budget": 7}) == KeyframeSlimming(policy="aas", kv_budget=7)
    explicit = KeyframeSlimming(policy="isa", alpha_f=0.25)
    assert effective_slimming({"kv_budget": 7, "slimming": explicit}) is explicit  # the node wins
    for bad in (dict(policy="sparse"), dict(alpha_s=1.5), dict(alpha_f=-0.01), dict(alpha_ns=1.01),
                dict(block_size=48), dict(block_size=8), dict(block_size=96), dict(kv_budget=0),
                dict(backend="cuda")):
        with pytest.raises(LongEditError):
            KeyframeSlimming(**bad).validate()
    for edge in (dict(kv_budget=1), dict(block_size=16), dict(block_size=128), dict(alpha_s=0.0, alpha_f=1.0),
                 dict(alpha_ns=1.0, alpha_f=0.0)):
        KeyframeSlimming(**edge).validate()  # accepted
    # defaults: AdaFlow's budget of 20 keyframes; ISA's paper ratios and block size
    d = KeyframeSlimming()
    assert (d.policy, d.kv_budget, d.alpha_s, d.alpha_f, d.alpha_ns, d.block_size) == ("aas", 20, 0.15, 0.5, 0.0625, 64)


# ------------------------------------------------------------------ model level: AdaFlow's step, ISA policy

def isa_editor(setup, **ratios) -> KeyframeEditor:
    _, plan, inversion, _, _ = setup
    return KeyframeEditor(inversion, plan, semantics.PNP_ATTN_T, semantics.PNP_F_T, kv_budget=semantics.BUDGET,
                          chunk_frames=7, propagate=True,
                          slimming=KeyframeSlimming(policy="isa", block_size=16, backend="torch", **ratios))


@pytest.fixture(scope="module")
def setup():
    return semantics.TinyUNet(), semantics.random_plan(), semantics.random_inversion(), *semantics.sampler_inputs()


def editor_step(setup, editor, step):
    model, _, _, x, context = setup
    sigma = torch.full((semantics.BRANCHES * semantics.FRAMES,), float(semantics.SIGMAS[step]))
    return editor(semantics.run_under_test(model), x, sigma, context, semantics.BRANCHES)


@pytest.mark.parametrize("step", [1, 4])  # PnP on / off
def test_isa_keeping_everything_is_full_extended_attention_through_the_model(setup, step):
    model, plan, inversion, x, context = setup
    clips = len(semantics.CLIP_STARTS) - 1
    got = editor_step(setup, isa_editor(setup, alpha_s=1.0, alpha_f=1.0, alpha_ns=1.0), step)
    expected = semantics.reference_step(model, plan, inversion, x, context, step, propagate=True, budget=clips)
    assert rel(got, expected) < semantics.TOLERANCE


def test_slimmed_isa_through_the_model_differs_from_full_but_stays_close(setup):
    model, plan, inversion, x, context = setup
    clips = len(semantics.CLIP_STARTS) - 1
    step = 1
    got = editor_step(setup, isa_editor(setup, alpha_s=0.3, alpha_f=0.0, alpha_ns=0.2), step)
    full = semantics.reference_step(model, plan, inversion, x, context, step, propagate=True, budget=clips)
    error = rel(got, full)
    # above float error (slimming acts), and below AAS's at a budget of one keyframe, which drops two thirds
    # of the tokens outright (ISA keeps each keyframe's own tokens exactly and a summary of the others)
    aas_one = semantics.reference_step(model, plan, inversion, x, context, step, propagate=True, budget=1)
    assert 100 * semantics.TOLERANCE < error < rel(aas_one.float(), full)


def test_triton_taylor_rows_follow_the_keyframe_plan():
    """The GPU path runs the Taylor rows in the kernels' Triton kernel from this module's restricted plan
    (only own query blocks routed); here in Triton's interpreter, against the torch twin."""
    pytest.importorskip("triton", reason="Triton is not installed (it is on Linux; kernels run in its interpreter)")
    from longedit.kernels.isa_split import isa_attention_split

    frames, tokens, heads, d = 3, 63, 2, 16
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(frames, tokens, heads * d, generator=g) * gain for gain in (2.0, 1.0, 1.0))
    settings = KeyframeSlimming(policy="isa", alpha_s=0.5, alpha_f=0.5, alpha_ns=0.25, block_size=16)
    qs, ks, vs = (in_context_sequences(x, list(range(frames)), heads) for x in (q, k, v))
    plan = keyframe_isa_plan(qs, ks, vs, tokens, settings)
    assert plan.taylor_blocks.shape[-1] > 0
    torch_rows = isa_attention_split(qs, ks, vs, plan, taylor="torch")[:, :, :tokens]
    triton_rows = isa_attention_split(qs, ks, vs, plan, taylor="triton")[:, :, :tokens]
    assert rel(triton_rows, torch_rows) < TOL
