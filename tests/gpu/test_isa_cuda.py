"""Compiled ISA Triton kernel on CUDA against its float32 torch reference (one shared plan), and against
exact attention when ISA keeps and computes everything exactly."""
import math

import pytest
import torch

from longedit.kernels import isa_attention
from longedit.kernels.isa import isa_attention_triton
from longedit.kernels.isa_reference import isa_attention_reference, plan_isa
from longedit.kernels.isa_split import isa_attention_split

TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}  # relative L2


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def structured_qkv(batch, heads, n, d, dtype, seed=0, block=64):
    """Block-clustered keys and queries of varied scale, so sharpness, selection and both paths matter."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    block_of = torch.arange(n, device="cuda") // block
    centres = torch.randn(batch, heads, int(block_of[-1]) + 1, d, device="cuda", generator=g)
    k = centres[:, :, block_of] + 0.5 * torch.randn(batch, heads, n, d, device="cuda", generator=g)
    scale = 0.2 + 2.3 * torch.rand(batch, heads, int(block_of[-1]) + 1, 1, device="cuda", generator=g)
    q = torch.randn(batch, heads, n, d, device="cuda", generator=g) * scale[:, :, block_of]
    v = torch.randn(batch, heads, n, d, device="cuda", generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


SHAPES = [(1, 4, 8190, 64, (4095, 8190)), (2, 2, 6001, 128, (3000, 6001)), (1, 2, 4133, 128, (37, 2100))]


@pytest.mark.parametrize("batch, heads, n, d, ctx", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_isa_triton_matches_reference(batch, heads, n, d, ctx, dtype):
    q, k, v = structured_qkv(batch, heads, n, d, dtype, seed=n)
    plan = plan_isa(q, k, v, *ctx)  # the defaults: b 64, alpha_s 0.125, alpha_f 0.5, alpha_ns 0.0625
    out = isa_attention_triton(q, k, v, plan)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_l2(out, isa_attention_reference(q, k, v, plan)) <= TOLERANCE[dtype]


def test_isa_triton_matches_reference_in_float32_with_strided_inputs():
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in structured_qkv(1, 3, 3001, 64, torch.float32))
    plan = plan_isa(q, k, v, 1500, 3001, alpha_s=0.5, alpha_f=0.25, alpha_ns=0.125)
    out = isa_attention_triton(q, k, v, plan)
    assert rel_l2(out, isa_attention_reference(q, k, v, plan)) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_isa_triton_with_everything_exact_is_attention(d, dtype):
    q, k, v = structured_qkv(1, 4, 8190, d, dtype, seed=d)
    plan = plan_isa(q, k, v, 4095, 8190, alpha_s=1.0, alpha_f=1.0, alpha_ns=0.0)
    out = isa_attention_triton(q, k, v, plan)
    exact = ((q.float() @ k.float().transpose(-1, -2)) / math.sqrt(d)).softmax(dim=-1) @ v.float()
    assert rel_l2(out, exact) <= TOLERANCE[dtype]


@pytest.mark.parametrize("batch, heads, n, d, ctx", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_split_path_matches_reference(batch, heads, n, d, ctx, dtype):
    """Sharp rows by cuDNN/Flash SDPA over gathered tokens, Taylor rows by the Triton kernel."""
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in structured_qkv(batch, heads, n, d, dtype, seed=n))
    plan = plan_isa(q, k, v, *ctx)
    out = isa_attention_split(q, k, v, plan)
    assert out.dtype == dtype and out.shape == q.shape and torch.isfinite(out).all()
    assert rel_l2(out, isa_attention_reference(q, k, v, plan)) <= TOLERANCE[dtype]
    torch_taylor = isa_attention_split(q, k, v, plan, taylor="torch")
    assert rel_l2(torch_taylor, isa_attention_reference(q, k, v, plan)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
def test_every_backend_with_everything_exact_is_attention(backend):
    q, k, v = structured_qkv(1, 4, 6001, 128, torch.bfloat16, seed=3)
    out = isa_attention(q, k, v, 3000, 6001, alpha_s=1.0, alpha_f=1.0, alpha_ns=0.0, backend=backend)
    exact = ((q.float() @ k.float().transpose(-1, -2)) / math.sqrt(128)).softmax(dim=-1) @ v.float()
    assert rel_l2(out, exact) <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("tma, pair, block_p, warps, stages", [(False, 1, 64, 4, 3), (False, 2, 128, 8, 2),
                                                                (False, 2, 64, 4, 4), (True, 1, 64, 4, 3),
                                                                (True, 1, 32, 8, 2)])
def test_triton_launch_settings_do_not_change_the_result(tma, pair, block_p, warps, stages):
    q, k, v = structured_qkv(1, 2, 6001, 128, torch.float16, seed=9)
    plan = plan_isa(q, k, v, 3000, 6001)
    config = {"TMA": tma, "PAIR": pair, "BLOCK_P": block_p, "num_warps": warps, "num_stages": stages}
    out = isa_attention_triton(q, k, v, plan, config=config)
    assert rel_l2(out, isa_attention_reference(q, k, v, plan)) <= TOLERANCE[torch.float16]


@pytest.mark.parametrize("zero_fill", [False, True])
def test_row_block_copy_on_cuda_matches_reference(zero_fill):
    from longedit.kernels.row_blocks import copy_row_blocks_triton
    from longedit.kernels.row_blocks_reference import copy_row_blocks_reference

    g = torch.Generator(device="cuda").manual_seed(1)
    src = torch.randn(2, 5000, 12, 128, device="cuda", generator=g).to(torch.bfloat16).transpose(1, 2)
    count = torch.randint(1, 65, (2, 12, 50), device="cuda", generator=g)
    src_start = torch.randint(0, 5000 - 64, (2, 12, 50), device="cuda", generator=g)
    dst_start = (torch.arange(50, device="cuda") * 64).expand(2, 12, -1)
    fill = torch.full((2, 12, 3200, 128), 3.0, device="cuda", dtype=torch.bfloat16)
    ref = copy_row_blocks_reference(src, src_start, fill.clone(), dst_start, count, 64, zero_fill=zero_fill)
    assert torch.equal(copy_row_blocks_triton(src, src_start, fill.clone(), dst_start, count, 64,
                                              zero_fill=zero_fill), ref)


def test_triton_pooling_matches_the_reference():
    from longedit.kernels.isa import pool_qkv_triton
    from longedit.kernels.isa_reference import block_layout, pool_blocks

    q, k, v = structured_qkv(2, 3, 6001, 128, torch.bfloat16, seed=4)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    for ctx in ((3000, 6001), (37, 2100), (6001, 6001)):
        layout = block_layout(6001, *ctx, 64, device="cuda")
        for pooled, x in zip(pool_qkv_triton(q, k, v, layout), (q, k, v)):
            assert rel_l2(pooled, pool_blocks(x, layout)) <= 1e-6


@pytest.mark.parametrize("saliency, sharpness, tiling", [("logit_mean", "variance", "segment"),
                                                         ("softmax_mass", "topk_mass", "grid"),
                                                         ("softmax_mass", "topk_mass", "segment")])
def test_ranking_rules_and_tilings_run_on_cuda_as_in_the_reference(saliency, sharpness, tiling):
    """Each rule pair and tiling: the plan on CUDA (Triton pooling included) equals the CPU plan, and the split
    path and the one-kernel path match the reference under it (context start and end off the 64 grid)."""
    from longedit.kernels.isa_reference import block_layout
    from longedit.kernels.isa import pool_qkv_triton

    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2)
               for x in structured_qkv(1, 4, 6001, 128, torch.bfloat16, seed=17))
    layout = block_layout(6001, 2990, 5990, 64, device="cuda", tiling=tiling)
    plan = plan_isa(q, k, v, 2990, 5990, saliency=saliency, sharpness=sharpness, tiling=tiling,
                    pooled=pool_qkv_triton(q, k, v, layout))
    cpu = plan_isa(q.cpu(), k.cpu(), v.cpu(), 2990, 5990, saliency=saliency, sharpness=sharpness, tiling=tiling)
    assert plan.kept_blocks.shape == cpu.kept_blocks.shape
    # float32 sums in another order may swap near-tied blocks, nothing more
    assert (plan.kept_blocks.cpu() != cpu.kept_blocks).float().mean() <= 0.02
    assert (plan.exact_query.cpu() != cpu.exact_query).float().mean() <= 0.02
    reference = isa_attention_reference(q, k, v, plan)
    assert rel_l2(isa_attention_split(q, k, v, plan), reference) <= TOLERANCE[torch.bfloat16]
    assert rel_l2(isa_attention_triton(q, k, v, plan), reference) <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("tiling", ["segment", "grid"])
def test_fast_plan_pools_with_the_tiling_it_plans_with(tiling):
    """plan_isa_fast's Triton pooling uses the caller's tiling: its plan equals the torch-pooled plan of that
    tiling (a pooled layout of another tiling is refused by plan_isa, so a mix-up fails here)."""
    from longedit.kernels import plan_isa_fast

    q, k, v = structured_qkv(1, 4, 6001, 128, torch.bfloat16, seed=23)
    fast = plan_isa_fast(q, k, v, 2990, 5990, tiling=tiling)
    torch_pooled = plan_isa(q, k, v, 2990, 5990, tiling=tiling)
    assert fast.kept_blocks.shape == torch_pooled.kept_blocks.shape
    assert (fast.kept_blocks != torch_pooled.kept_blocks).float().mean() <= 0.02
