"""Triton ISA attention (In-context Sparse Attention): twin of `isa_reference.isa_attention_reference`.

Pooling, coarse scores and every selection are small [B, H, nb, ...] tensors computed once in torch by
`isa_reference.plan_isa`; this module runs the attention itself from that plan. One program owns one query
block of one (batch, head) and feeds a single flash-style online softmax from two sources:

* exact KV blocks: for a sharp query block every kept block in ascending order, for a Taylor block its
  near blocks best first; each a full tile of k and v tokens (`tl.dot` for q kᵀ and p v, float32
  accumulation);
* pooled pseudo-tokens (Taylor blocks only): every other kept block, BLOCK_P at a time in ascending order,
  with logits q·k̄ᵀ/√d + ln(count) and values v̄ (near blocks are masked out of these tiles).

Whenever the running max rises, the running sum and the accumulator are rescaled by exp(m_old - m_new), so
the result is the exact softmax over both sources whatever order they arrive in. Logits are kept in base 2
(scaled by log2 e) for exp2. Memory is O(N·d): no N×N tensor exists anywhere. `isa_split.py` runs the sharp
blocks through a dense attention library call instead and this kernel for the Taylor blocks only.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .isa_reference import (DEFAULT_ALPHA_F, DEFAULT_ALPHA_NS, DEFAULT_ALPHA_S, DEFAULT_BLOCK_SIZE, IsaPlan,
                            check_qkv, plan_isa)

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b with float32 accumulation; exact float32 products for float32 inputs (no TF32)."""
    if IEEE:
        product = tl.dot(a, b, input_precision="ieee")
    else:
        product = tl.dot(a, b)
    return product


@triton.jit
def _online_softmax_step(logits, values, m_i, l_i, acc, IEEE: tl.constexpr):
    """Fold one tile into the running softmax state.

    logits [BLOCK_M, T] are base-2 logits with -inf where a column does not exist; values [T, BLOCK_D].
    State: m_i running max, l_i running sum of exp2(logit - m_i), acc running sum of exp2(logit - m_i) * v.
    When the max rises, both sums are rescaled by exp2(m_old - m_new) before the tile is added."""
    m_new = tl.maximum(m_i, tl.max(logits, axis=1))
    rescale = tl.exp2(m_i - m_new)
    p = tl.exp2(logits - m_new[:, None])
    l_i = l_i * rescale + tl.sum(p, axis=1)
    acc = acc * rescale[:, None] + _dot(p.to(values.dtype), values, IEEE)
    return m_new, l_i, acc


@triton.jit
def _load_token_tile(base, start, count, stride_n, offs_rows, offs_d, D):
    """Rows start .. start+count-1 of a [N, D] matrix (row stride stride_n), zero-padded to the tile."""
    rows = start.to(tl.int64) + offs_rows
    mask = (offs_rows[:, None] < count) & (offs_d[None, :] < D)
    return tl.load(base + rows[:, None] * stride_n + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _exact_tile(q, k_base, v_base, kv_block, block_start_ptr, block_count_ptr, stride_kn, stride_vn,
                offs_rows, offs_d, D, qk_scale, m_i, l_i, acc, IEEE: tl.constexpr):
    """Fold every token of KV block `kv_block` into the running softmax."""
    kv_start = tl.load(block_start_ptr + kv_block)
    kv_count = tl.load(block_count_ptr + kv_block)
    k = _load_token_tile(k_base, kv_start, kv_count, stride_kn, offs_rows, offs_d, D)
    v = _load_token_tile(v_base, kv_start, kv_count, stride_vn, offs_rows, offs_d, D)
    logits = _dot(q, tl.trans(k), IEEE) * qk_scale
    logits = tl.where(offs_rows[None, :] < kv_count, logits, float("-inf"))
    return _online_softmax_step(logits, v, m_i, l_i, acc, IEEE)


@triton.jit
def _isa_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr,
        pooled_k_ptr, pooled_v_ptr,  # [B*H, nb, D] contiguous, q's dtype
        block_start_ptr, block_count_ptr,  # int32 [nb]
        kept_ptr,  # int32 [B*H, n_kept], ascending
        query_ptr,  # int32 [B*H, n_query], the query blocks this launch computes
        near_ptr,  # int32 [B*H, n_query, n_near], slots into kept (Taylor launches only)
        pooled_mask_ptr,  # int8 [B*H, n_query, n_kept], 1 where a kept slot is pooled (Taylor launches only)
        H, n_blocks, n_query, n_kept, n_near, D, qk_scale,  # qk_scale = log2(e) / sqrt(d)
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
        BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, SHARP: tl.constexpr,
        IEEE: tl.constexpr):
    """Grid (n_query, B*H): ISA output for query block query[program_id(1), program_id(0)]."""
    bh = tl.program_id(1)
    batch = bh // H
    head = bh % H
    offs_rows = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D

    q_base = q_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + head.to(tl.int64) * stride_kh
    v_base = v_ptr + batch.to(tl.int64) * stride_vb + head.to(tl.int64) * stride_vh
    kept_row = kept_ptr + bh.to(tl.int64) * n_kept
    query_index = bh.to(tl.int64) * n_query + tl.program_id(0)
    qb = tl.load(query_ptr + query_index)

    q_start = tl.load(block_start_ptr + qb)
    q_count = tl.load(block_count_ptr + qb)
    q = _load_token_tile(q_base, q_start, q_count, stride_qn, offs_rows, offs_d, D)

    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)

    if SHARP:  # every kept block, token by token
        for t in range(0, n_kept):
            m_i, l_i, acc = _exact_tile(q, k_base, v_base, tl.load(kept_row + t), block_start_ptr, block_count_ptr,
                                        stride_kn, stride_vn, offs_rows, offs_d, D, qk_scale, m_i, l_i, acc, IEEE)
    else:
        # near blocks token by token (there is at least one, so the running max is finite below) ...
        near_row = near_ptr + query_index * n_near
        for t in range(0, n_near):
            kv_block = tl.load(kept_row + tl.load(near_row + t))
            m_i, l_i, acc = _exact_tile(q, k_base, v_base, kv_block, block_start_ptr, block_count_ptr,
                                        stride_kn, stride_vn, offs_rows, offs_d, D, qk_scale, m_i, l_i, acc, IEEE)
        # ... then one pseudo-token (k̄_j, v̄_j, + log2 count_j) per other kept block, BLOCK_P at a time
        offs_p = tl.arange(0, BLOCK_P)
        pooled_offset = bh.to(tl.int64) * n_blocks * D
        mask_row = pooled_mask_ptr + query_index * n_kept
        for p0 in range(0, n_kept, BLOCK_P):
            slot_valid = p0 + offs_p < n_kept
            pooled = tl.load(mask_row + p0 + offs_p, mask=slot_valid, other=0) != 0
            kv_block = tl.load(kept_row + p0 + offs_p, mask=slot_valid, other=0)
            kv_count = tl.load(block_count_ptr + kv_block, mask=slot_valid, other=1)
            rows = pooled_offset + kv_block.to(tl.int64) * D
            mask = pooled[:, None] & d_valid[None, :]
            k_bar = tl.load(pooled_k_ptr + rows[:, None] + offs_d[None, :], mask=mask, other=0.0)
            v_bar = tl.load(pooled_v_ptr + rows[:, None] + offs_d[None, :], mask=mask, other=0.0)
            logits = _dot(q, tl.trans(k_bar), IEEE) * qk_scale + tl.log2(kv_count.to(tl.float32))[None, :]
            logits = tl.where(pooled[None, :], logits, float("-inf"))
            m_i, l_i, acc = _online_softmax_step(logits, v_bar, m_i, l_i, acc, IEEE)

    out = acc / l_i[:, None]
    out_base = out_ptr + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
    out_rows = q_start.to(tl.int64) + offs_rows
    tl.store(out_base + out_rows[:, None] * stride_on + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(offs_rows[:, None] < q_count) & d_valid[None, :])


def _check_plan(q: torch.Tensor, plan: IsaPlan) -> None:
    """The plan must describe q's shape, and the block size must suit tl.arange and tl.dot."""
    batch, heads, n_tokens, _ = q.shape
    size = plan.layout.block_size
    if size < 16 or size & (size - 1):
        raise ValueError(f"ISA Triton: block_size must be a power of two >= 16, got {size}")
    if plan.layout.segments[-1][1] != n_tokens or plan.kept_blocks.shape[:2] != (batch, heads):
        raise ValueError(f"ISA Triton: the plan does not describe q of shape {tuple(q.shape)}")


def launch_config(head_dim: int) -> dict:
    """num_warps and num_stages for the attention kernel: the best of warps {4, 8} x stages {1..4} on an
    H200 with Triton 3.6, bf16, N = 32760, 12 heads (8 warps was ~2x slower for these 64-row tiles)."""
    return {"num_warps": 4, "num_stages": 1 if head_dim <= 64 else 3}


def pooled_slot_mask(plan: IsaPlan) -> torch.Tensor:
    """int8 [B, H, n_taylor, n_kept]: 1 where a Taylor query block reaches a kept slot as a pseudo-token."""
    mask = torch.ones((*plan.near_slots.shape[:3], plan.n_kept), dtype=torch.int8, device=plan.near_slots.device)
    return mask.scatter_(-1, plan.near_slots, 0)


def isa_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: IsaPlan, *,
                         out: torch.Tensor | None = None, sharp: bool = True) -> torch.Tensor:
    """ISA attention of q, k, v [B, H, N, d] (one dtype; any strides with unit stride along d) under
    `plan` -> [B, H, N, d] in q's dtype.

    out: write into this [B, H, >= N, d] tensor instead of a new one. sharp=False computes only the Taylor
    query blocks' rows (the caller fills the sharp rows another way)."""
    check_qkv(q, k, v)
    _check_plan(q, plan)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    k, v = k.to(q.dtype), v.to(q.dtype)
    batch, heads, _, d = q.shape
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    pooled_k = plan.pooled_k.to(q.dtype).contiguous()
    pooled_v = plan.pooled_v.to(q.dtype).contiguous()
    int32 = dict(device=q.device, dtype=torch.int32)
    block_start, block_count = plan.layout.start.to(**int32), plan.layout.count.to(**int32)
    kept = plan.kept_blocks.to(**int32).contiguous()
    common = dict(BLOCK=plan.layout.block_size, BLOCK_D=max(16, triton.next_power_of_2(d)),
                  BLOCK_P=max(16, min(64, triton.next_power_of_2(plan.n_kept))), IEEE=q.dtype == torch.float32,
                  **launch_config(d))
    args = (heads, plan.layout.n_blocks)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3])
    launches = [(plan.taylor_blocks, False)] + ([(plan.sharp_blocks, True)] if sharp else [])
    for query_blocks, is_sharp in launches:
        n_query = query_blocks.shape[-1]
        if n_query == 0:
            continue
        if is_sharp:
            near = mask = kept  # unused by the sharp path
            n_near = 0
        else:
            near, mask, n_near = plan.near_slots.to(**int32).contiguous(), pooled_slot_mask(plan), plan.n_near
        _isa_attention_kernel[(n_query, batch * heads)](
            q, k, v, out, pooled_k, pooled_v, block_start, block_count, kept,
            query_blocks.to(**int32).contiguous(), near, mask,
            *args, n_query, plan.n_kept, n_near, d, LOG2E / math.sqrt(d), *strides, SHARP=is_sharp, **common)
    return out


def isa_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx_start: int, ctx_end: int, *,
               block_size: int = DEFAULT_BLOCK_SIZE, alpha_s: float = DEFAULT_ALPHA_S,
               alpha_f: float = DEFAULT_ALPHA_F, alpha_ns: float = DEFAULT_ALPHA_NS) -> torch.Tensor:
    """Plan ISA in torch and run its attention in Triton: q, k, v [B, H, N, d] -> [B, H, N, d]."""
    plan = plan_isa(q, k, v, ctx_start, ctx_end, block_size=block_size, alpha_s=alpha_s, alpha_f=alpha_f,
                    alpha_ns=alpha_ns)
    return isa_attention_triton(q, k, v, plan)
