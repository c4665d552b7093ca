"""LIVEditor's host-agnostic pieces (core/isa/liveditor.py) against float64 transcriptions of the authors'
equations and against invariants; the whole model on a reduced random checkpoint is in
tests/integration/test_liveditor.py (it needs ComfyUI's Wan)."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from longedit.core.errors import LongEditError
from longedit.core.isa import liveditor as lv
from longedit.core.isa.policy import IsaAttention, IsaSettings

TOOL = Path(__file__).resolve().parents[1] / "tools" / "make_random_liveditor.py"
_spec = importlib.util.spec_from_file_location("make_random_liveditor", TOOL)
_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tool)
key_shapes, random_state = _tool.key_shapes, _tool.random_state

F64 = torch.float64


def pooled_reference(q, k, v, block=64):
    """Per token i: softmax_j(mean_q(block(i)) · mean_k(j) / √d) · mean_v(j), loops over blocks in float64."""
    b, h, n, d = q.shape
    bounds = [(s, min(s + block, n)) for s in range(0, n, block)]
    qm = torch.stack([q[:, :, s:e].double().mean(2) for s, e in bounds], 2)
    km = torch.stack([k[:, :, s:e].double().mean(2) for s, e in bounds], 2)
    vm = torch.stack([v[:, :, s:e].double().mean(2) for s, e in bounds], 2)
    out = torch.empty(b, h, n, d, dtype=F64)
    for i, (s, e) in enumerate(bounds):
        w = torch.softmax(torch.einsum("bhd,bhjd->bhj", qm[:, :, i], km) / math.sqrt(d), -1)
        out[:, :, s:e] = torch.einsum("bhj,bhjd->bhd", w, vm)[:, :, None]
    return out


@pytest.mark.parametrize("n", [64, 100, 201])  # one block, a partial tail, several blocks
def test_pooled_attention_matches_blockwise_definition(n):
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for _ in range(3))
    got = lv.pooled_attention(q, k, v)
    ref = pooled_reference(q, k, v)
    # float32 sums of <= 64 terms and a softmax over <= 4 logits: ~1e-6 relative
    assert torch.allclose(got.double(), ref, rtol=0, atol=1e-5), (got.double() - ref).abs().max()


def test_gate_is_the_authors_squashed_sigmoid():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 32, generator=g, dtype=F64)
    w = torch.randn(32, generator=g, dtype=F64)
    ref = (1 / (1 + torch.exp(-(x @ w))) - 0.5) * 0.5
    got = lv.gate_values(x.float(), w.float())
    assert got.shape == (2, 7) and got.abs().max() < 0.25
    assert torch.allclose(got.double(), ref, atol=1e-6)


def test_gated_output_adds_gate_times_pooled_per_token_shared_by_heads():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 130, 8, generator=g) for _ in range(3))
    base = torch.randn(1, 2, 130, 8, generator=g)
    gate = torch.rand(1, 130, generator=g) - 0.5
    got = lv.add_gated_pooled(base, q, k, v, gate)
    ref = base.double() + gate.double()[:, None, :, None] * pooled_reference(q, k, v)
    assert torch.allclose(got.double(), ref, atol=1e-5)


def test_modulated_input_matches_wan_block_formula():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 12, 16, generator=g)
    modulation = torch.randn(1, 6, 16, generator=g)
    norm = torch.nn.LayerNorm(16, eps=1e-6, elementwise_affine=False)
    for vec in (torch.randn(2, 6, 16, generator=g), torch.randn(2, 1, 6, 16, generator=g)):
        e = (modulation + vec.reshape(2, 6, 16)).double()  # one modulation for every token
        ref = torch.nn.functional.layer_norm(x.double(), (16,), eps=1e-6) * (1 + e[:, 1:2]) + e[:, 0:1]
        assert torch.allclose(lv.modulated_input(x, norm, modulation, vec).double(), ref, atol=1e-5)


def test_positions_of_target_and_source_each_start_at_zero():
    ids = lv.sequence_position_ids((3, 2, 5), (3, 2, 5))
    assert ids.shape == (60, 3)
    half = [(f, h, w) for f in range(3) for h in range(2) for w in range(5)]  # Wan's frame-major order
    assert [tuple(r) for r in ids[:30].tolist()] == half and [tuple(r) for r in ids[30:].tolist()] == half


def test_source_must_match_target():
    lv.check_source((1, 16, 5, 8, 8), (1, 16, 5, 8, 8))
    with pytest.raises(LongEditError, match="no source video latent"):
        lv.check_source((1, 16, 5, 8, 8), None)
    with pytest.raises(LongEditError, match="differ"):
        lv.check_source((1, 16, 5, 8, 8), (1, 16, 4, 8, 8))


@pytest.mark.parametrize("frames,clip,overlap", [(21, 21, 5), (22, 21, 5), (50, 21, 5), (37, 9, 3), (10, 4, 3)])
def test_windows_cover_every_frame_and_weights_sum_to_one(frames, clip, overlap):
    windows = lv.clip_windows(frames, clip, overlap)
    assert windows[0][0] == 0 and windows[-1][1] == frames
    assert all(e - s == min(clip, frames) for s, e in windows)
    assert all(b[0] - a[1] <= -overlap for a, b in zip(windows, windows[1:]))  # neighbours share >= overlap
    total = torch.zeros(frames, dtype=F64)
    for (s, e), w in zip(windows, lv.window_weights(windows, frames)):
        assert (w > 0).all() and (w <= 1).all()
        total[s:e] += w
    assert torch.allclose(total, torch.ones(frames, dtype=F64))


def test_window_blend_keeps_order_and_reaches_every_frame():
    """A 'model' whose prediction for a frame depends only on that frame (plus its index) must come back
    unchanged, frame for frame in order, whatever the windows; a window-dependent one must be the ramp blend."""
    frames = 23
    x = torch.randn(1, 2, frames, 3, 4, dtype=F64)
    same = lv.denoise_in_windows(lambda s, e: x[:, :, s:e] * 2 + torch.arange(s, e, dtype=F64)[None, None, :, None, None],
                                 x.shape, clip=7, overlap=2, dtype=F64)
    # weights summing to 1 up to float64 rounding: equal to ~1e-15
    assert torch.allclose(same, x * 2 + torch.arange(frames, dtype=F64)[None, None, :, None, None], rtol=0, atol=1e-12)
    windows = lv.clip_windows(frames, 7, 2)
    per_window = lv.denoise_in_windows(lambda s, e: torch.full((1, 2, e - s, 3, 4), float(s), dtype=F64),
                                       x.shape, clip=7, overlap=2, dtype=F64)
    expected = torch.zeros(frames, dtype=F64)
    for (s, e), w in zip(windows, lv.window_weights(windows, frames)):
        expected[s:e] += w * s
    assert torch.allclose(per_window[0, 0, :, 0, 0], expected)


def test_overlap_weights_ramp_linearly_by_hand():
    """12 frames, clips of 7 overlapping by 2: windows 0-6 and 5-11; in frames 5 and 6 the first clip fades
    2/3 -> 1/3 and the second 1/3 -> 2/3 (ramps (i + 1) / (overlap + 1)), elsewhere each clip alone."""
    windows = lv.clip_windows(12, 7, 2)
    assert windows == [(0, 7), (5, 12)]
    first, second = lv.window_weights(windows, 12)
    third = 1 / 3
    assert torch.allclose(first, torch.tensor([1, 1, 1, 1, 1, 2 * third, third], dtype=F64))
    assert torch.allclose(second, torch.tensor([third, 2 * third, 1, 1, 1, 1, 1], dtype=F64))


def test_bad_window_settings_are_explained():
    with pytest.raises(LongEditError, match="overlap"):
        lv.clip_windows(40, 21, 21)
    with pytest.raises(LongEditError, match="clip_frames"):
        lv.clip_windows(40, 0, 0)


@pytest.mark.parametrize("n,padded", [(1, 1), (2, 5), (5, 5), (6, 9), (81, 81), (100, 101)])
def test_wan_frame_padding_and_trim_keep_count_and_order(n, padded):
    assert lv.wan_frame_count(n) == padded
    images = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 2, 3, 3)
    out = lv.pad_frames(images, lv.wan_frame_count(n))
    assert out.shape[0] == padded and torch.equal(out[:n], images) and (out[n:] == n - 1).all()


def test_liveditor_keys_found_under_any_wrapper_prefix_and_plain_wan_is_refused():
    state = random_state("tiny", seed=0)
    for prefix in ("", "model.", "model.diffusion_model.", "wanx_unimodel.guidance_model.feedforward_model."):
        names = lv.liveditor_keys(prefix + k for k in state)
        assert set(names) == {k for k in state if k.startswith(lv.SOURCE_EMBEDDING) or
                              (".self_attn.alpha_1" in k)}
        weights = lv.weights_from_tensors({n: state[k[len(prefix):]] for n, k in names.items()}, "file")
        assert weights.layers == 3 and weights.dim == 256
        assert torch.equal(weights.gates[2], state["blocks.2.self_attn.alpha_1.weight"][0])
    plain = {k: v for k, v in state.items() if ".alpha_" not in k and not k.startswith(lv.SOURCE_EMBEDDING)}
    with pytest.raises(LongEditError, match="not a LIVEditor checkpoint"):
        lv.weights_from_tensors({n: plain[k] for n, k in lv.liveditor_keys(plain).items()}, "'wan.safetensors'")
    with pytest.raises(LongEditError, match="do not fit"):
        lv.check_matches_model(weights, 512, 3, tuple(state["patch_embedding.weight"].shape))


def test_isa_with_alpha_f_one_plus_gate_equals_exact_attention_plus_gate():
    """ISA (the pack's policy, context = second half = the source) with alpha_f = alpha_s = 1, plus the gate,
    against float64 exact attention plus the float64 gate term, on a [target | source] layout of odd size."""
    g = torch.Generator().manual_seed(5)
    b, h, n_half, d = 1, 2, 75, 32
    q, k, v = (torch.randn(b, h, 2 * n_half, d, generator=g) for _ in range(3))
    gate = lv.gate_values(torch.randn(b, 2 * n_half, 16, generator=g), torch.randn(16, generator=g))
    isa = IsaAttention(IsaSettings(context="second half", alpha_f=1.0, alpha_s=1.0, block_size=16, backend="torch"))
    flat = [t.transpose(1, 2).reshape(b, 2 * n_half, h * d) for t in (q, k, v)]
    out = isa(None, *flat, h).view(b, 2 * n_half, h, d).transpose(1, 2)  # func unused: ISA takes self-attention
    got = lv.add_gated_pooled(out, q, k, v, gate)
    exact = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(d), -1) @ v.double()
    ref = exact + gate.double()[:, None, :, None] * pooled_reference(q, k, v)
    assert isa.counts["isa"] == 1
    # float32 attention over 150 keys: ~1e-6; the bound leaves 10x
    assert (got.double() - ref).abs().max() < 1e-5
    lossy = IsaAttention(IsaSettings(context="second half", alpha_f=0.25, alpha_s=0.25, block_size=16, backend="torch"))
    sparse = lossy(None, *flat, h).view(b, 2 * n_half, h, d).transpose(1, 2)
    assert (lv.add_gated_pooled(sparse, q, k, v, gate).double() - ref).abs().max() > 1e-3  # the test can tell


def test_random_checkpoint_has_the_authors_layout():
    shapes = key_shapes(dim=5120, ffn_dim=13824, num_layers=40)
    params = sum(math.prod(s) for s in shapes.values())
    assert 14.0e9 < params < 14.6e9, params  # Wan2.2-T2V-A14B expert (+ the LIVEditor extras)
    assert shapes["blocks.39.self_attn.alpha_1.weight"] == (1, 5120)
    assert shapes["source_video_embedding_more_memory.weight"] == shapes["patch_embedding.weight"]
