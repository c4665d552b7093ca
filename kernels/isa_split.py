"""ISA's production path: the sharp query blocks through one dense attention call, the Taylor blocks through
the Triton kernel (CUDA) or its chunked torch twin (anywhere), both from one `IsaPlan`.

Why split: a sharp query block attends to every token of the kept KV blocks, which is plain dense attention
over gathered tokens. Every head keeps the same number of tokens (`isa_reference.select_kv_blocks`), so the
sharp rows of all heads are one [B, H, n_sharp * b, d] x [B, H, n_kept_tokens, d] problem that cuDNN or
FlashAttention run at their full rate; that part is ~90% of ISA's work at the default ratios. Only the
Taylor rows (near blocks + pooled pseudo-tokens, a few percent of the work) need a custom kernel.

Padding: a partial sharp query block is gathered as a full block whose extra rows repeat its last token;
those rows are written to a scratch row N of the output and dropped.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .isa_reference import IsaPlan, check_qkv

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


def block_tokens(blocks: torch.Tensor, plan: IsaPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Token indices of `blocks` [B, H, n]: (tokens [B, H, n * b], real [B, H, n * b] bool).

    Slots past a partial block's count repeat its last token and are marked not real."""
    size = plan.layout.block_size
    start = plan.layout.start[blocks].unsqueeze(-1)
    count = plan.layout.count[blocks].unsqueeze(-1)
    offset = torch.arange(size, device=blocks.device)
    real = offset < count
    tokens = start + torch.minimum(offset, count - 1)
    return tokens.flatten(-2), real.flatten(-2)


def kept_tokens(plan: IsaPlan) -> torch.Tensor:
    """int64 [B, H, T]: the tokens of every kept block, ascending; T is the same for every head."""
    tokens, real = block_tokens(plan.kept_blocks, plan)
    batch, heads = tokens.shape[:2]
    return tokens[real].view(batch, heads, -1)


def sharp_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: IsaPlan, out: torch.Tensor) -> None:
    """Exact attention of the sharp query blocks over all kept tokens, written into out [B, H, N + 1, d]."""
    if plan.sharp_blocks.shape[-1] == 0:
        return
    batch, heads, n_tokens, _ = q.shape
    b_index = torch.arange(batch, device=q.device).view(-1, 1, 1)
    h_index = torch.arange(heads, device=q.device).view(1, -1, 1)
    rows, real = block_tokens(plan.sharp_blocks, plan)
    if plan.n_kept == plan.layout.n_blocks:  # every block kept: attend to k and v as they are, no copy
        keys, values = k, v
    else:
        kv = kept_tokens(plan)
        keys, values = k[b_index, h_index, kv], v[b_index, h_index, kv]
    result = dense_attention(q[b_index, h_index, rows], keys, values)
    out[b_index, h_index, torch.where(real, rows, n_tokens)] = result.to(out.dtype)


def taylor_rows_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: IsaPlan, out: torch.Tensor) -> None:
    """The Taylor query blocks in torch, a chunk of blocks at a time (float32 logits, one softmax over the
    near blocks' tokens and the pooled pseudo-tokens of the other kept blocks); written into out."""
    n_taylor = plan.taylor_blocks.shape[-1]
    if n_taylor == 0:
        return
    batch, heads, n_tokens, d = q.shape
    size, n_kept = plan.layout.block_size, plan.n_kept
    b_index = torch.arange(batch, device=q.device).view(-1, 1, 1, 1)
    h_index = torch.arange(heads, device=q.device).view(1, -1, 1, 1)
    kept_k = plan.pooled_k.gather(2, plan.kept_blocks.unsqueeze(-1).expand(-1, -1, -1, d))  # [B, H, n_kept, d]
    kept_v = plan.pooled_v.gather(2, plan.kept_blocks.unsqueeze(-1).expand(-1, -1, -1, d))
    kept_log_count = plan.layout.count[plan.kept_blocks].float().log()  # [B, H, n_kept]
    width = plan.n_near * size + n_kept
    chunk = max(1, TAYLOR_CHUNK_BYTES // (4 * batch * heads * size * width))
    scale = 1.0 / math.sqrt(d)
    for c0 in range(0, n_taylor, chunk):
        blocks = plan.taylor_blocks[..., c0:c0 + chunk]  # [B, H, c]
        slots = plan.near_slots[..., c0:c0 + chunk, :]  # [B, H, c, n_near]
        rows, real_rows = block_tokens(blocks, plan)  # [B, H, c * b]
        c = blocks.shape[-1]
        rows, real_rows = rows.view(batch, heads, c, size), real_rows.view(batch, heads, c, size)
        near_tokens, near_real = block_tokens(plan.kept_blocks.gather(-1, slots.flatten(-2)), plan)
        near_tokens = near_tokens.view(batch, heads, c, -1)  # [B, H, c, n_near * b]
        near_real = near_real.view(batch, heads, c, -1)
        qc = q[b_index, h_index, rows].float()  # [B, H, c, b, d]
        exact_logits = (qc @ k[b_index, h_index, near_tokens].float().transpose(-1, -2)) * scale
        exact_logits = exact_logits.masked_fill(~near_real.unsqueeze(-2), float("-inf"))
        pooled_logits = (qc @ kept_k.unsqueeze(2).transpose(-1, -2)) * scale + kept_log_count[:, :, None, None, :]
        is_near = torch.zeros(batch, heads, c, n_kept, dtype=torch.bool, device=q.device).scatter_(-1, slots, True)
        pooled_logits = pooled_logits.masked_fill(is_near.unsqueeze(-2), float("-inf"))
        p = torch.cat([exact_logits, pooled_logits], dim=-1).softmax(dim=-1)
        n_exact_tokens = near_tokens.shape[-1]
        result = (p[..., :n_exact_tokens] @ v[b_index, h_index, near_tokens].float()
                  + p[..., n_exact_tokens:] @ kept_v.unsqueeze(2))
        out[b_index, h_index, torch.where(real_rows, rows, n_tokens)] = result.to(out.dtype)


def isa_attention_split(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: IsaPlan, *,
                        taylor: str = "auto") -> torch.Tensor:
    """ISA attention of q, k, v [B, H, N, d] under `plan` -> [B, H, N, d] in q's dtype: sharp rows by dense
    attention over gathered tokens, Taylor rows by the Triton kernel (taylor='triton', or 'auto' on CUDA
    with Triton installed) or in torch (taylor='torch', or 'auto' elsewhere)."""
    check_qkv(q, k, v)
    batch, heads, n_tokens, d = q.shape
    k, v = k.to(q.dtype), v.to(q.dtype)
    out = torch.empty(batch, heads, n_tokens + 1, d, dtype=q.dtype, device=q.device)  # row N: scratch
    sharp_rows(q, k, v, plan, out)
    if taylor == "auto":
        from . import use_triton

        taylor = "triton" if use_triton(q) else "torch"
    if taylor == "triton":
        from .isa import isa_attention_triton

        isa_attention_triton(q, k, v, plan, out=out, sharp=False)
    else:
        taylor_rows_torch(q, k, v, plan, out)
    return out[:, :, :n_tokens]
