"""Plain-torch reference for attention over a per-query-frame subset of keys/values (AdaFlow's AAS).

Extended attention lets every keyframe attend to the tokens of all keyframes; Adaptive Attention Slimming
keeps, for each query keyframe, only a subset of those tokens. Layouts are the UNet's own:
q [K, T, H*d] (K query frames of T tokens), k and v [K*T, H*d] (all keyframes' tokens, flattened),
selection [K, S] int (row i: the token indices query frame i attends to). Output [K, T, H*d].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def subset_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection: torch.Tensor,
                               heads: int, frames_per_chunk: int = 8, upcast: bool = True) -> torch.Tensor:
    """Gather each frame's keys/values, then softmax attention, a few frames at a time.

    upcast=True computes in float32 (the reference); upcast=False keeps the input dtype, so that on CUDA
    SDPA picks its fastest backend (cuDNN/flash): that is the production path on GPUs (see kernels/__init__)."""
    frames, tokens, width = q.shape
    d = width // heads
    out = torch.empty_like(q)
    for i0 in range(0, frames, frames_per_chunk):
        sel = selection[i0:i0 + frames_per_chunk].long()  # [n, S]
        n, s = sel.shape
        cast = (lambda t: t.float()) if upcast else (lambda t: t)  # noqa: E731
        qi = cast(q[i0:i0 + n]).view(n, tokens, heads, d).transpose(1, 2)  # [n, H, T, d]
        ki = cast(k[sel]).view(n, s, heads, d).transpose(1, 2)  # [n, H, S, d]
        vi = cast(v[sel]).view(n, s, heads, d).transpose(1, 2)
        oi = F.scaled_dot_product_attention(qi, ki, vi)
        out[i0:i0 + n] = oi.transpose(1, 2).reshape(n, tokens, width).to(q.dtype)
    return out


def extended_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Every query frame attends to all K*T tokens: exact extended attention (float32 math)."""
    frames, tokens, width = q.shape
    d = width // heads
    qf = q.float().reshape(1, frames * tokens, heads, d).transpose(1, 2)
    kf = k.float().reshape(1, -1, heads, d).transpose(1, 2)
    vf = v.float().reshape(1, -1, heads, d).transpose(1, 2)
    o = F.scaled_dot_product_attention(qf, kf, vf)
    return o.transpose(1, 2).reshape(frames, tokens, width).to(q.dtype)
