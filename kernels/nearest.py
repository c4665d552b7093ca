"""Triton nearest-neighbour search by dot product: a tiled GEMM whose epilogue keeps a running arg-max.

Each program owns BLOCK_M query rows of one batch item and walks all key rows in BLOCK_N tiles, reducing
over the feature dimension in BLOCK_D slices; only the best score and index per row leave the chip, so the
M x N score matrix never exists in memory. Twin of `nearest_reference.nearest_reference`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _nearest_kernel(q_ptr, k_ptr, idx_ptr, score_ptr, M, N, D,
                    stride_qb, stride_qm, stride_kb, stride_kn, stride_ob,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = q_ptr + b.to(tl.int64) * stride_qb
    k_base = k_ptr + b.to(tl.int64) * stride_kb
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_M], tl.int32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            q = tl.load(q_base + offs_m[:, None] * stride_qm + d[None, :],
                        mask=(offs_m[:, None] < M) & (d[None, :] < D), other=0.0)
            k = tl.load(k_base + offs_n[:, None] * stride_kn + d[None, :],
                        mask=(offs_n[:, None] < N) & (d[None, :] < D), other=0.0)
            if IEEE:
                acc += tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                acc += tl.dot(q, tl.trans(k))
        acc = tl.where(offs_n[None, :] < N, acc, float("-inf"))
        tile_best, tile_arg = tl.max(acc, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best > best  # strict: an earlier tile wins a tie, as in the reference
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, n0 + tile_arg.to(tl.int32), best_idx)
    out = b.to(tl.int64) * stride_ob + offs_m
    tl.store(idx_ptr + out, best_idx, mask=offs_m < M)
    tl.store(score_ptr + out, best, mask=offs_m < M)


def nearest_triton(query: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """query [B, M, D], keys [B, N, D] (fp16, bf16 or fp32, same dtype) -> (index int32, score fp32) [B, M]."""
    query, keys = query.contiguous(), keys.contiguous()
    batch, m, d = query.shape
    n = keys.shape[1]
    index = torch.empty((batch, m), dtype=torch.int32, device=query.device)
    score = torch.empty((batch, m), dtype=torch.float32, device=query.device)
    block_m, block_n = 64, 64
    block_d = 64 if d >= 64 else max(16, triton.next_power_of_2(d))
    grid = (triton.cdiv(m, block_m), batch)
    _nearest_kernel[grid](query, keys, index, score, m, n, d,
                          query.stride(0), query.stride(1), keys.stride(0), keys.stride(1), index.stride(0),
                          BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                          IEEE=query.dtype == torch.float32, num_warps=4, num_stages=2)
    return index, score
