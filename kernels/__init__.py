"""Tensor kernels: each Triton kernel sits beside its plain-torch reference; the functions here dispatch
to Triton on CUDA (when Triton is installed) and to the reference everywhere else."""
from __future__ import annotations

import torch

from .aas_reference import subset_attention_reference
from .isa_reference import plan_isa
from .nearest_reference import nearest_reference

try:  # Triton is optional at runtime (CPU and Mac users have none)
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False


def use_triton(t: torch.Tensor) -> bool:
    """Triton for CUDA tensors; the reference elsewhere. (Tests call the Triton twins directly under
    TRITON_INTERPRET=1 to check them on the CPU.)"""
    return HAVE_TRITON and t.is_cuda


def find_nearest(query: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query row, (index int32, score float32) of the key row with the largest dot product.

    query [B, M, D], keys [B, N, D]; normalise rows first for cosine similarity. Memory stays
    O(B * M) whatever N: scores are reduced tile by tile.
    """
    if query.ndim != 3 or keys.ndim != 3 or query.shape[0] != keys.shape[0] or query.shape[2] != keys.shape[2]:
        raise ValueError(f"find_nearest: expected [B, M, D] and [B, N, D], got {tuple(query.shape)}, {tuple(keys.shape)}")
    if use_triton(query):
        from .nearest import nearest_triton

        return nearest_triton(query, keys.to(query.dtype))
    return nearest_reference(query, keys)


def subset_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection: torch.Tensor,
                     heads: int) -> torch.Tensor:
    """Attention of each query frame over its own subset of the keyframes' tokens (AdaFlow's AAS).

    q [K, T, H*d]; k, v [K*T, H*d]; selection [K, S] token indices; returns [K, T, H*d]."""
    if q.ndim != 3 or k.ndim != 2 or v.shape != k.shape or selection.ndim != 2 or selection.shape[0] != q.shape[0]:
        raise ValueError(f"subset_attention: got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"selection {tuple(selection.shape)}")
    if q.is_cuda:
        # Measured on an H200 (bench/keyframe_edit.py, 100 keyframes at level 0): gathering 8 frames' subsets
        # and running cuDNN SDPA takes 105.6 ms, the Triton kernel that gathers inside (kernels/aas.py)
        # 128.3 ms: cuDNN's attention is faster by more than the gather costs, so it is the default.
        return subset_attention_reference(q, k, v, selection, heads, frames_per_chunk=8, upcast=False)
    return subset_attention_reference(q, k, v, selection, heads)


def plan_isa_fast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx_start: int, ctx_end: int, *,
                  pool_in_triton: bool = True, **ratios):
    """`isa_reference.plan_isa`, pooling q, k and v with the Triton twin on CUDA (one launch)."""
    pooled = None
    if pool_in_triton and use_triton(q) and all(x.stride(-1) == 1 for x in (q, k, v)) and q.shape == k.shape == v.shape:
        from .isa import pool_qkv_triton
        from .isa_reference import DEFAULT_BLOCK_SIZE, DEFAULT_TILING, block_layout

        layout = block_layout(q.shape[2], ctx_start, ctx_end, ratios.get("block_size", DEFAULT_BLOCK_SIZE), q.device,
                              ratios.get("tiling", DEFAULT_TILING))
        pooled = pool_qkv_triton(q, k.to(q.dtype), v.to(q.dtype), layout)
    return plan_isa(q, k, v, ctx_start, ctx_end, pooled=pooled, **ratios)


def isa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx_start: int, ctx_end: int, *,
                  block_size: int = 64, alpha_s: float = 0.15, alpha_f: float = 0.5,
                  alpha_ns: float = 0.0625, backend: str = "auto") -> torch.Tensor:
    """ISA sparse attention; q, k, v [B, H, N, d] -> [B, H, N, d] in q's dtype; context is tokens
    [ctx_start, ctx_end). The block selection is planned in torch. backend 'auto': sharp query blocks by
    dense SDPA over gathered tokens, Taylor blocks in Triton on CUDA (torch elsewhere); 'triton': everything
    in the Triton kernel; 'torch': no Triton at all."""
    from .isa_split import isa_attention_split

    plan = plan_isa_fast(q, k, v, ctx_start, ctx_end, block_size=block_size, alpha_s=alpha_s, alpha_f=alpha_f,
                         alpha_ns=alpha_ns, pool_in_triton=backend != "torch")
    if backend == "triton":
        from .isa import isa_attention_triton

        return isa_attention_triton(q, k, v, plan)
    return isa_attention_split(q, k, v, plan, taylor="torch" if backend == "torch" else "auto")
