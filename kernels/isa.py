"""Triton ISA attention (In-context Sparse Attention): twin of `isa_reference.isa_attention_reference`.

Pooling, coarse scores and every selection are small [B, H, nb, ...] tensors computed once in torch by
`isa_reference.plan_isa`; this module runs the attention itself from that plan. One program owns one query
block of one (batch, head) and feeds a single flash-style online softmax from two sources:

* exact KV blocks: for a sharp query block every kept block in ascending order, for a Taylor block its
  near blocks; PAIR blocks (1 or 2, see `launch_config`) form one tile of k and v tokens (`tl.dot` for
  q kᵀ and p v, float32 accumulation);
* pooled pseudo-tokens (Taylor blocks only): every other kept block, BLOCK_P at a time in ascending order
  (the kept blocks' means are gathered into one contiguous array first), with logits q·k̄ᵀ/√d + ln(count) and values v̄ (near blocks are masked out of these tiles).

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
from triton.tools.tensor_descriptor import TensorDescriptor

from .isa_reference import (DEFAULT_ALPHA_F, DEFAULT_ALPHA_NS, DEFAULT_ALPHA_S, DEFAULT_BLOCK_SIZE,
                            DEFAULT_SALIENCY, DEFAULT_SHARPNESS, DEFAULT_TILING, IsaPlan, check_qkv, gather_blocks, plan_isa)

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
def _exact_tiles(q, k_base, v_base, slot0, slot1, has1, start_row, count_row, stride_kn, stride_vn, half, within,
                 offs_d, D, qk_scale, m_i, l_i, acc, IEEE: tl.constexpr):
    """Fold every token of kept slots slot0 and (if has1) slot1 into the running softmax: one tile of
    PAIR * BLOCK token rows, the first BLOCK rows from slot0's block, the next from slot1's (half says which);
    rows past a block's count are masked."""
    start0 = tl.load(start_row + slot0)
    count0 = tl.load(count_row + slot0)
    start1 = tl.load(start_row + slot1)
    count1 = tl.where(has1, tl.load(count_row + slot1), 0)
    valid = within < tl.where(half == 0, count0, count1)
    rows = tl.where(half == 0, start0, start1).to(tl.int64) + within
    mask = valid[:, None] & (offs_d[None, :] < D)
    k = tl.load(k_base + rows[:, None] * stride_kn + offs_d[None, :], mask=mask, other=0.0)
    v = tl.load(v_base + rows[:, None] * stride_vn + offs_d[None, :], mask=mask, other=0.0)
    logits = _dot(q, tl.trans(k), IEEE) * qk_scale
    logits = tl.where(valid[None, :], logits, float("-inf"))
    return _online_softmax_step(logits, v, m_i, l_i, acc, IEEE)


@triton.jit
def _exact_tile_tma(q, k_desc, v_desc, batch, head, slot, start_row, count_row, within, qk_scale, m_i, l_i, acc,
                    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    """`_exact_tiles` for one block through the tensor-memory accelerator: the block's BLOCK rows are one
    contiguous box of the [B, H, N, d] tensor (zero past N); rows past the block's count belong to the next
    block and are masked out of the logits, so their values get weight 0."""
    start = tl.load(start_row + slot)
    count = tl.load(count_row + slot)
    k = tl.reshape(k_desc.load([batch, head, start, 0]), [BLOCK, BLOCK_D])
    v = tl.reshape(v_desc.load([batch, head, start, 0]), [BLOCK, BLOCK_D])
    logits = _dot(q, tl.trans(k), IEEE) * qk_scale
    logits = tl.where(within[None, :] < count, logits, float("-inf"))
    return _online_softmax_step(logits, v, m_i, l_i, acc, IEEE)


@triton.jit
def _isa_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr,
        pooled_k_ptr, pooled_v_ptr,  # [B*H, n_kept, D] contiguous, q's dtype: the kept blocks' means
        query_start_ptr, query_count_ptr,  # int32 [B*H, n_query]: the query blocks this launch computes
        kv_start_ptr, kv_count_ptr,  # int32 [B*H, n_kept]: the kept blocks, ascending
        near_ptr,  # int32 [B*H, n_query, n_near], slots into kept (Taylor launches only)
        pooled_mask_ptr,  # int8 [B*H, n_query, n_kept], 1 where a kept slot is pooled (Taylor launches only)
        H, n_query, n_kept, n_near, D, qk_scale,  # qk_scale = log2(e) / sqrt(d)
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
        BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, PAIR: tl.constexpr,
        SHARP: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr):
    """Grid (n_query, B*H): ISA output for query block program_id(0) of (batch, head) program_id(1)."""
    bh = tl.program_id(1)
    batch = bh // H
    head = bh % H
    offs_rows = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    offs_kv = tl.arange(0, PAIR * BLOCK)
    half = offs_kv // BLOCK
    within = offs_kv % BLOCK

    q_base = q_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    if TMA:  # k_ptr and v_ptr are tensor descriptors of [B, H, N, d] with [1, 1, BLOCK, BLOCK_D] boxes
        k_base = k_ptr
        v_base = v_ptr
    else:
        k_base = k_ptr + batch.to(tl.int64) * stride_kb + head.to(tl.int64) * stride_kh
        v_base = v_ptr + batch.to(tl.int64) * stride_vb + head.to(tl.int64) * stride_vh
    start_row = kv_start_ptr + bh.to(tl.int64) * n_kept
    count_row = kv_count_ptr + bh.to(tl.int64) * n_kept
    query_index = bh.to(tl.int64) * n_query + tl.program_id(0)
    q_start = tl.load(query_start_ptr + query_index)
    q_count = tl.load(query_count_ptr + query_index)
    q_rows = q_start.to(tl.int64) + offs_rows
    q_mask = (offs_rows[:, None] < q_count) & d_valid[None, :]
    q = tl.load(q_base + q_rows[:, None] * stride_qn + offs_d[None, :], mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)

    if SHARP:  # every kept block, token by token, PAIR blocks a step
        for t in range(0, n_kept, PAIR):
            if TMA:
                m_i, l_i, acc = _exact_tile_tma(q, k_base, v_base, batch, head, t, start_row, count_row, within,
                                                qk_scale, m_i, l_i, acc, BLOCK, BLOCK_D, IEEE)
            else:
                has1 = (PAIR == 2) & (t + 1 < n_kept)
                m_i, l_i, acc = _exact_tiles(q, k_base, v_base, t, tl.where(has1, t + 1, t), has1, start_row,
                                             count_row, stride_kn, stride_vn, half, within, offs_d, D, qk_scale,
                                             m_i, l_i, acc, IEEE)
    else:
        # near blocks token by token (there is at least one, so the running max is finite below) ...
        near_row = near_ptr + query_index * n_near
        for t in range(0, n_near, PAIR):
            slot0 = tl.load(near_row + t)
            if TMA:
                m_i, l_i, acc = _exact_tile_tma(q, k_base, v_base, batch, head, slot0, start_row, count_row, within,
                                                qk_scale, m_i, l_i, acc, BLOCK, BLOCK_D, IEEE)
            else:
                has1 = (PAIR == 2) & (t + 1 < n_near)
                slot1 = tl.load(near_row + t + 1, mask=has1, other=0)
                m_i, l_i, acc = _exact_tiles(q, k_base, v_base, slot0, slot1, has1, start_row, count_row,
                                             stride_kn, stride_vn, half, within, offs_d, D, qk_scale, m_i, l_i, acc,
                                             IEEE)
        # ... then one pseudo-token (k̄_j, v̄_j, + log2 count_j) per other kept block, BLOCK_P at a time
        offs_p = tl.arange(0, BLOCK_P)
        mask_row = pooled_mask_ptr + query_index * n_kept
        pooled_base = bh.to(tl.int64) * n_kept * D
        for p0 in range(0, n_kept, BLOCK_P):
            slot = p0 + offs_p
            slot_valid = slot < n_kept
            pooled = tl.load(mask_row + slot, mask=slot_valid, other=0) != 0
            kv_count = tl.load(count_row + slot, mask=slot_valid, other=1)
            rows = pooled_base + slot.to(tl.int64) * D
            mask = pooled[:, None] & d_valid[None, :]
            k_bar = tl.load(pooled_k_ptr + rows[:, None] + offs_d[None, :], mask=mask, other=0.0)
            v_bar = tl.load(pooled_v_ptr + rows[:, None] + offs_d[None, :], mask=mask, other=0.0)
            logits = _dot(q, tl.trans(k_bar), IEEE) * qk_scale + tl.log2(kv_count.to(tl.float32))[None, :]
            logits = tl.where(pooled[None, :], logits, float("-inf"))
            m_i, l_i, acc = _online_softmax_step(logits, v_bar, m_i, l_i, acc, IEEE)

    out = acc / l_i[:, None]
    out_base = out_ptr + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
    tl.store(out_base + q_rows[:, None] * stride_on + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _block_mean(x_ptr, out_ptr, batch, head, bh, block, start, count, n_blocks, D, stride_b, stride_h, stride_n,
                BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_rows = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    base = x_ptr + batch.to(tl.int64) * stride_b + head.to(tl.int64) * stride_h
    rows = start.to(tl.int64) + offs_rows
    mask = (offs_rows[:, None] < count) & (offs_d[None, :] < D)
    x = tl.load(base + rows[:, None] * stride_n + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / count.to(tl.float32)
    tl.store(out_ptr + (bh.to(tl.int64) * n_blocks + block) * D + offs_d, mean, mask=offs_d < D)


@triton.jit
def _pool_qkv_kernel(q_ptr, k_ptr, v_ptr, pq_ptr, pk_ptr, pv_ptr, start_ptr, count_ptr, H, n_blocks, D,
                     stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                     BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (nb, B*H): the float32 means of block program_id(0) of q, k and v for (batch, head)
    program_id(1); three tiles in flight per program."""
    bh = tl.program_id(1)
    block = tl.program_id(0)
    batch, head = bh // H, bh % H
    start = tl.load(start_ptr + block)
    count = tl.load(count_ptr + block)
    _block_mean(q_ptr, pq_ptr, batch, head, bh, block, start, count, n_blocks, D, stride_qb, stride_qh, stride_qn,
                BLOCK, BLOCK_D)
    _block_mean(k_ptr, pk_ptr, batch, head, bh, block, start, count, n_blocks, D, stride_kb, stride_kh, stride_kn,
                BLOCK, BLOCK_D)
    _block_mean(v_ptr, pv_ptr, batch, head, bh, block, start, count, n_blocks, D, stride_vb, stride_vh, stride_vn,
                BLOCK, BLOCK_D)


def pool_qkv_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout) -> tuple[torch.Tensor, ...]:
    """Twin of `isa_reference.pool_blocks` for q, k and v at once ([B, H, N, d], unit stride along d) ->
    three float32 [B, H, nb, d], in one launch and one pass over each input."""
    batch, heads, _, d = q.shape
    pooled = [torch.empty(batch, heads, layout.n_blocks, d, dtype=torch.float32, device=q.device) for _ in range(3)]
    _pool_qkv_kernel[(layout.n_blocks, batch * heads)](
        q, k, v, *pooled, layout.start32, layout.count32, heads, layout.n_blocks, d,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        BLOCK=triton.next_power_of_2(layout.block_size), BLOCK_D=max(16, triton.next_power_of_2(d)), num_warps=4)
    return tuple(pooled)


def use_tma(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """KV loads through tensor descriptors need a Hopper-or-newer GPU and 16-byte aligned strides and base."""
    if not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] < 9:
        return False
    return all(x.data_ptr() % 16 == 0 and all(s * x.element_size() % 16 == 0 for s in x.stride()[:-1])
               for x in (k, v))


def _check_plan(q: torch.Tensor, plan: IsaPlan) -> None:
    """The plan must describe q's shape, and the block size must suit tl.arange and tl.dot."""
    batch, heads, n_tokens, _ = q.shape
    size = plan.layout.block_size
    if size < 16 or size & (size - 1):
        raise ValueError(f"ISA Triton: block_size must be a power of two >= 16, got {size}")
    if plan.layout.segments[-1][1] != n_tokens or plan.kept_blocks.shape[:2] != (batch, heads):
        raise ValueError(f"ISA Triton: the plan does not describe q of shape {tuple(q.shape)}")


def launch_config(head_dim: int) -> dict:
    """Tile and launch settings of the attention kernel: PAIR KV blocks per softmax step, BLOCK_P pooled
    pseudo-tokens per step, num_warps, num_stages. From bench/isa_breakdown.py's sweep on an H200 (Triton
    3.6, bf16, d 128, default ratios): one KV block a step beat two (2.05 vs 3.01 ms for the Taylor rows at
    1x12x65,520; 34.9 vs 53.1 ms at 1x40x151,200), 8 warps were slower than 4 for these 64-row tiles, and
    BLOCK_P 128 with 4 stages runs out of shared memory. d <= 64 keeps last session's single stage.
    Separately, the KV blocks load through tensor descriptors (TMA) wherever `use_tma` allows: 1.79 vs
    2.05 ms and 31.4 vs 34.9 ms for the same Taylor rows."""
    return {"PAIR": 1, "BLOCK_P": 64, "num_warps": 4, "num_stages": 1 if head_dim <= 64 else 3}


def pooled_slot_mask(plan: IsaPlan) -> torch.Tensor:
    """int8 [B, H, n_taylor, n_kept]: 1 where a Taylor query block reaches a kept slot as a pseudo-token."""
    mask = torch.ones((*plan.near_slots.shape[:3], plan.n_kept), dtype=torch.int8, device=plan.near_slots.device)
    return mask.scatter_(-1, plan.near_slots, 0)


def isa_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: IsaPlan, *,
                         out: torch.Tensor | None = None, sharp: bool = True,
                         config: dict | None = None) -> torch.Tensor:
    """ISA attention of q, k, v [B, H, N, d] (one dtype; any strides with unit stride along d) under
    `plan` -> [B, H, N, d] in q's dtype.

    out: write into this [B, H, N, d] tensor instead of a new one. sharp=False computes only the Taylor
    query blocks' rows (the caller fills the sharp rows another way). config: overrides `launch_config`
    (benchmarks sweep it)."""
    check_qkv(q, k, v)
    _check_plan(q, plan)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    k, v = k.to(q.dtype), v.to(q.dtype)
    batch, heads, _, d = q.shape
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    layout, kept = plan.layout, plan.kept_blocks
    int32 = dict(device=q.device, dtype=torch.int32)
    kv_start, kv_count = layout.start32[kept], layout.count32[kept]
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3])
    launches = [(plan.taylor_blocks, False)] + ([(plan.sharp_blocks, True)] if sharp else [])
    for query_blocks, is_sharp in launches:
        n_query = query_blocks.shape[-1]
        if n_query == 0:
            continue
        settings = {**launch_config(d), **(config or {})}
        if is_sharp:
            pooled_k = pooled_v = near = mask = kv_start  # unused by the sharp path
            n_near = 0
        else:
            pooled_k = gather_blocks(plan.pooled_k, kept).to(q.dtype).contiguous()
            pooled_v = gather_blocks(plan.pooled_v, kept).to(q.dtype).contiguous()
            near, mask, n_near = plan.near_slots.to(**int32).contiguous(), pooled_slot_mask(plan), plan.n_near
        tma = settings.pop("TMA", None)
        tma = use_tma(q, k, v) if tma is None else tma
        if tma:  # one block per step through descriptors; needs 16-byte aligned strides
            settings["PAIR"] = 1
            box = [1, 1, layout.block_size, max(16, triton.next_power_of_2(d))]
            k_arg, v_arg = (TensorDescriptor(x, list(x.shape), list(x.stride()), box) for x in (k, v))
        else:
            k_arg, v_arg = k, v
        _isa_attention_kernel[(n_query, batch * heads)](
            q, k_arg, v_arg, out, pooled_k, pooled_v,
            layout.start32[query_blocks], layout.count32[query_blocks], kv_start, kv_count,
            near, mask, heads, n_query, plan.n_kept, n_near, d, LOG2E / math.sqrt(d), *strides,
            BLOCK=layout.block_size, BLOCK_D=max(16, triton.next_power_of_2(d)), SHARP=is_sharp,
            IEEE=q.dtype == torch.float32, TMA=tma, **settings)
    return out


def isa_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx_start: int, ctx_end: int, *,
               block_size: int = DEFAULT_BLOCK_SIZE, alpha_s: float = DEFAULT_ALPHA_S,
               alpha_f: float = DEFAULT_ALPHA_F, alpha_ns: float = DEFAULT_ALPHA_NS,
               saliency: str = DEFAULT_SALIENCY, sharpness: str = DEFAULT_SHARPNESS,
               tiling: str = DEFAULT_TILING) -> torch.Tensor:
    """Plan ISA in torch and run its attention in Triton: q, k, v [B, H, N, d] -> [B, H, N, d]."""
    plan = plan_isa(q, k, v, ctx_start, ctx_end, block_size=block_size, alpha_s=alpha_s, alpha_f=alpha_f,
                    alpha_ns=alpha_ns, saliency=saliency, sharpness=sharpness, tiling=tiling)
    return isa_attention_triton(q, k, v, plan)
