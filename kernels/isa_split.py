"""ISA's production path: the sharp query blocks through one dense attention call, the Taylor blocks through
the Triton kernel (CUDA) or its chunked torch twin (anywhere), both from one `IsaPlan`.

Why split: a sharp query block attends to every token of the kept KV blocks, which is plain dense attention
over gathered tokens. Every head keeps the same number of tokens (`isa_reference.select_kv_blocks`), so the
sharp rows of all heads are one [B, H, n_sharp * b, d] x [B, H, n_kept_tokens, d] problem that cuDNN or
FlashAttention run at their full rate; that part is ~90% of ISA's work at the default ratios. Only the
Taylor rows (near blocks + pooled pseudo-tokens, a few percent of the work) need a custom kernel.

Copies: whole blocks of rows move between the tensors (`copy_row_blocks`: Triton on CUDA, torch elsewhere).
The sharp query blocks are packed one block per b rows, a partial block's extra rows zero and dropped on the
way back; the kept KV blocks are packed without padding, so no key is counted twice.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .isa_reference import IsaPlan, check_qkv, gather_blocks
from .row_blocks_reference import copy_row_blocks_reference

TAYLOR_CHUNK_BYTES = 256 * 2**20  # float32 logits held at once by the torch Taylor path


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ/√d) v through SDPA, preferring cuDNN then FlashAttention on CUDA (cuDNN was the fastest
    dense backend on an H200 in bench/isa_attention.py)."""
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH]
        try:
            with sdpa_kernel(order, set_priority=True):
                return F.scaled_dot_product_attention(q, k, v)
        except TypeError:  # torch < 2.6 has no set_priority
            pass
    return F.scaled_dot_product_attention(q, k, v)


def copy_row_blocks(src: torch.Tensor, src_start: torch.Tensor, dst: torch.Tensor, dst_start: torch.Tensor,
                    count: torch.Tensor, block: int, *, zero_fill: bool = False) -> torch.Tensor:
    """`row_blocks_reference.copy_row_blocks_reference`, in Triton on CUDA."""
    from . import use_triton

    if use_triton(src) and src.stride(-1) == 1 and dst.stride(-1) == 1:
        from .row_blocks import copy_row_blocks_triton

        return copy_row_blocks_triton(src, src_start, dst, dst_start, count, block, zero_fill=zero_fill)
    return copy_row_blocks_reference(src, src_start, dst, dst_start, count, block, zero_fill=zero_fill)


def packed_starts(blocks: torch.Tensor, size: int) -> torch.Tensor:
    """Row offsets 0, size, 2 * size, ... of `blocks` [B, H, n] packed one block per `size` rows."""
    return torch.arange(0, blocks.shape[-1] * size, size, device=blocks.device, dtype=torch.int32).expand_as(blocks)


def gather_kept_tokens(x: torch.Tensor, plan: IsaPlan) -> torch.Tensor:
    """The tokens of every kept block, ascending: [B, H, plan.n_kept_tokens, d] (no padding: a partial block
    contributes only its real tokens, so no key is counted twice)."""
    layout, kept = plan.layout, plan.kept_blocks
    count = layout.count32[kept]
    packed = x.new_empty(*x.shape[:2], plan.n_kept_tokens, x.shape[-1])
    offset = count.cumsum(-1, dtype=torch.int32) - count
    return copy_row_blocks(x, layout.start32[kept], packed, offset, count, layout.block_size)


def sharp_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: IsaPlan, out: torch.Tensor) -> None:
    """Exact attention of the sharp query blocks over all kept tokens, written into out [B, H, N, d]."""
    if plan.sharp_blocks.shape[-1] == 0:
        return
    layout, size = plan.layout, plan.layout.block_size
    start, count = layout.start32[plan.sharp_blocks], layout.count32[plan.sharp_blocks]
    packed = packed_starts(plan.sharp_blocks, size)
    rows = q.new_empty(*q.shape[:2], plan.sharp_blocks.shape[-1] * size, q.shape[-1])
    copy_row_blocks(q, start, rows, packed, count, size, zero_fill=True)  # padding rows are zeros
    if plan.n_kept == layout.n_blocks:  # every block kept: attend to k and v as they are, no copy
        keys, values = k, v
    else:
        keys, values = gather_kept_tokens(k, plan), gather_kept_tokens(v, plan)
    copy_row_blocks(dense_attention(rows, keys, values), packed, out, start, count, size)


def taylor_rows_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: IsaPlan, out: torch.Tensor) -> None:
    """The Taylor query blocks in torch, a chunk of blocks at a time (float32 logits, one softmax over the
    near blocks' tokens and the pooled pseudo-tokens of the other kept blocks); written into out."""
    n_taylor = plan.taylor_blocks.shape[-1]
    if n_taylor == 0:
        return
    batch, heads, _, d = q.shape
    layout, size, n_kept = plan.layout, plan.layout.block_size, plan.n_kept
    b_index = torch.arange(batch, device=q.device).view(-1, 1, 1, 1)
    h_index = torch.arange(heads, device=q.device).view(1, -1, 1, 1)
    kept_k = gather_blocks(plan.pooled_k, plan.kept_blocks)  # [B, H, n_kept, d]
    kept_v = gather_blocks(plan.pooled_v, plan.kept_blocks)
    kept_log_count = layout.count[plan.kept_blocks].float().log()  # [B, H, n_kept]
    width = plan.n_near * size + n_kept
    chunk = max(1, TAYLOR_CHUNK_BYTES // (4 * batch * heads * size * width))
    scale = 1.0 / math.sqrt(d)
    offs = torch.arange(size, device=q.device)
    for c0 in range(0, n_taylor, chunk):
        blocks = plan.taylor_blocks[..., c0:c0 + chunk]  # [B, H, c]
        slots = plan.near_slots[..., c0:c0 + chunk, :]  # [B, H, c, n_near]
        c = blocks.shape[-1]
        start, count = layout.start[blocks], layout.count[blocks]
        rows = start.unsqueeze(-1) + torch.minimum(offs, count.unsqueeze(-1) - 1)  # [B, H, c, b]; pads repeat
        near = plan.kept_blocks.gather(-1, slots.flatten(-2)).view(batch, heads, c, -1)  # [B, H, c, n_near]
        near_count = layout.count[near].unsqueeze(-1)
        near_tokens = (layout.start[near].unsqueeze(-1) + torch.minimum(offs, near_count - 1)).flatten(-2)
        near_real = (offs < near_count).flatten(-2)  # [B, H, c, n_near * b]
        qc = q[b_index, h_index, rows].float()  # [B, H, c, b, d]
        exact_logits = (qc @ k[b_index, h_index, near_tokens].float().transpose(-1, -2)) * scale
        exact_logits = exact_logits.masked_fill(~near_real.unsqueeze(-2), float("-inf"))
        pooled_logits = (qc @ kept_k.unsqueeze(2).transpose(-1, -2)) * scale + kept_log_count[:, :, None, None, :]
        is_near = torch.zeros(batch, heads, c, n_kept, dtype=torch.bool, device=q.device).scatter_(-1, slots, True)
        pooled_logits = pooled_logits.masked_fill(is_near.unsqueeze(-2), float("-inf"))
        p = torch.cat([exact_logits, pooled_logits], dim=-1).softmax(dim=-1)
        n_exact_tokens = near_tokens.shape[-1]
        result = (p[..., :n_exact_tokens] @ v[b_index, h_index, near_tokens].float()
                  + p[..., n_exact_tokens:] @ kept_v.unsqueeze(2))  # [B, H, c, b, d]
        copy_row_blocks_reference(result.flatten(2, 3), packed_starts(blocks, size), out, start, count, size)


def isa_attention_split(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: IsaPlan, *,
                        taylor: str = "auto") -> torch.Tensor:
    """ISA attention of q, k, v [B, H, N, d] under `plan` -> [B, H, N, d] in q's dtype: sharp rows by dense
    attention over gathered tokens, Taylor rows by the Triton kernel (taylor='triton', or 'auto' on CUDA
    with Triton installed) or in torch (taylor='torch', or 'auto' elsewhere).

    (Running the Taylor rows on a second CUDA stream beside the dense call was slower on an H200: 15.9 vs
    15.4 ms at 1x12x65,520, bench/isa_breakdown.py; cuDNN keeps every multiprocessor busy.)"""
    check_qkv(q, k, v)
    batch, heads, n_tokens, d = q.shape
    k, v = k.to(q.dtype), v.to(q.dtype)
    out = torch.empty(batch, heads, n_tokens, d, dtype=q.dtype, device=q.device)
    sharp_rows(q, k, v, plan, out)
    if taylor == "auto":
        from . import use_triton

        taylor = "triton" if use_triton(q) else "torch"
    if taylor == "triton":
        from .isa import isa_attention_triton

        isa_attention_triton(q, k, v, plan, out=out, sharp=False)
    else:
        taylor_rows_torch(q, k, v, plan, out)
    return out
