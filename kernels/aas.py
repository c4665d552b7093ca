"""Triton attention over a per-query-frame subset of keys/values, gathering the subset inside the kernel.

Flash-attention forward (online softmax over key tiles) where each key tile is gathered through the
frame's selection list, so the selected K/V are never copied out. One program per (query tile, frame,
head); q, k, v stay in the UNet's [tokens, heads*d] layout. Twin of `aas_reference`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _subset_attention_kernel(q_ptr, k_ptr, v_ptr, sel_ptr, o_ptr, T, S, D, scale_log2e,
                             stride_qf, stride_qt, stride_kr, stride_sf, stride_of, stride_ot,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    frame = tl.program_id(1)
    head = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q_base = q_ptr + frame.to(tl.int64) * stride_qf + head * D
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=(offs_m[:, None] < T) & d_mask[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    sel_base = sel_ptr + frame.to(tl.int64) * stride_sf
    for s0 in range(0, S, BLOCK_N):
        offs_n = s0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < S
        rows = tl.load(sel_base + offs_n, mask=n_mask, other=0).to(tl.int64)
        kv_off = rows[:, None] * stride_kr + head * D + offs_d[None, :]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k)) * scale_log2e  # log2 domain: exp2 below
        scores = tl.where(n_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)  # rescale what was accumulated under the old maximum
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    o_base = o_ptr + frame.to(tl.int64) * stride_of + head * D
    tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < T) & d_mask[None, :])


def subset_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection: torch.Tensor,
                            heads: int) -> torch.Tensor:
    """q [K, T, H*d], k/v [rows, H*d], selection [K, S] int -> [K, T, H*d] (same layouts as the reference)."""
    frames, tokens, width = q.shape
    d = width // heads
    q, k, v = q.contiguous(), k.contiguous(), v.to(k.dtype).contiguous()
    selection = selection.to(torch.int32).contiguous()
    out = torch.empty_like(q)
    block_d = max(16, triton.next_power_of_2(d))
    block_m = 64
    block_n = 64 if block_d <= 64 else 32
    grid = (triton.cdiv(tokens, block_m), frames, heads)
    _subset_attention_kernel[grid](q, k, v, selection, out, tokens, selection.shape[1], d,
                                   (d ** -0.5) * 1.4426950408889634,
                                   q.stride(0), q.stride(1), k.stride(0), selection.stride(0),
                                   out.stride(0), out.stride(1),
                                   BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4, num_stages=2)
    return out
