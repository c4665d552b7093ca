"""ISA (In-context Sparse Attention) as the keyframe pass's slimming policy.

Extended attention lets keyframe i's T tokens attend to the tokens of all K keyframes. Seen from keyframe i
that is an in-context sequence: [its own T tokens | the other K-1 keyframes' tokens, in keyframe order], the
own tokens playing ISA's "source" (the queries whose output is wanted) and the others its "context". So for
every query keyframe this module lays out that sequence and applies ISA's rules from kernels/isa_reference
(block pooling, context pre-selection by the own queries, sharpness routing, near blocks, 0-th order Taylor
pseudo-tokens), with one difference that the layout calls for: only the own query blocks are routed and
computed (the context tokens' own outputs belong to other keyframes' passes), so alpha_f is the share of the
keyframe's own query blocks that go exact. With alpha_s = 1 and alpha_f = 1 it is exact extended attention.

The attention itself runs on the kernels' production path (`isa_attention_split`: sharp rows by dense SDPA
over the kept tokens, Taylor rows by Triton on CUDA or torch elsewhere), a few query keyframes at a time so
the rotated copies stay small.
"""
from __future__ import annotations

import math

import torch

from ...kernels.isa_reference import (IsaPlan, block_layout, coarse_scores, context_saliency, count_for_ratio,
                                      gather_blocks, kept_token_count, pool_blocks, query_sharpness,
                                      select_exact_queries, select_kv_blocks, split_queries)
from ...kernels.isa_split import isa_attention_split
from .slimming import KeyframeSlimming

CHUNK_BYTES = 1 << 30  # rotated q, k, v and the output of the query keyframes handled at once


def in_context_order(frames: int, query: int) -> list[int]:
    """Keyframe order of query keyframe `query`'s sequence: itself, then the others in keyframe order."""
    return [query] + [j for j in range(frames) if j != query]


def in_context_sequences(x: torch.Tensor, queries: list[int], heads: int) -> torch.Tensor:
    """x [K, T, H*d] -> [n, H, K*T, d]: for each query keyframe, its tokens then the other keyframes'."""
    frames, tokens, width = x.shape
    order = torch.tensor([in_context_order(frames, i) for i in queries], device=x.device)
    rotated = x[order]  # [n, K, T, C]
    return rotated.view(len(queries), frames * tokens, heads, width // heads).transpose(1, 2)


def keyframe_isa_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, own_tokens: int,
                      settings: KeyframeSlimming) -> IsaPlan:
    """The ISA plan of in-context sequences q, k, v [n, H, N, d] whose first `own_tokens` are the query
    keyframe's: context pre-selection as ISA's (ranked by the own query blocks), and the routing restricted
    to the own query blocks (the top ceil(alpha_f * own blocks) by sharpness go exact)."""
    n_tokens = q.shape[2]
    layout = block_layout(n_tokens, own_tokens, n_tokens, settings.block_size, device=q.device)
    pooled_q, pooled_k, pooled_v = (pool_blocks(x, layout) for x in (q, k, v))
    kept = select_kv_blocks(context_saliency(pooled_q, pooled_k, layout), layout, settings.alpha_s)
    kept_k = gather_blocks(pooled_k, kept)
    own_blocks = math.ceil(own_tokens / settings.block_size)  # the own segment is tiled first, from token 0
    own_scores = coarse_scores(pooled_q[:, :, :own_blocks], kept_k)  # [n, H, own_blocks, n_kept]
    sharp_flags = select_exact_queries(query_sharpness(own_scores, layout.count.float().log()[kept]),
                                       settings.alpha_f)
    sharp, taylor = split_queries(sharp_flags, count_for_ratio(settings.alpha_f, own_blocks))
    n_kept = kept.shape[-1]
    n_near = min(n_kept, max(1, count_for_ratio(settings.alpha_ns, n_kept)))
    taylor_scores = own_scores.gather(2, taylor.unsqueeze(-1).expand(-1, -1, -1, n_kept))
    exact_query = torch.zeros(*q.shape[:2], layout.n_blocks, dtype=torch.bool, device=q.device)
    exact_query[:, :, :own_blocks] = sharp_flags
    return IsaPlan(layout=layout, pooled_k=pooled_k, pooled_v=pooled_v, kept_blocks=kept, exact_query=exact_query,
                   sharp_blocks=sharp, taylor_blocks=taylor,
                   near_slots=taylor_scores.topk(n_near, dim=-1, sorted=False).indices,
                   n_kept_tokens=kept_token_count(layout, settings.alpha_s))


def keyframe_isa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                           settings: KeyframeSlimming, chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """Extended attention of K keyframes slimmed by ISA: q, k, v [K, T, H*d] -> [K, T, H*d]."""
    frames, tokens, width = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"keyframe ISA: q, k, v must share one shape [K, T, H*d], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    per_query = 4 * frames * tokens * width * q.element_size()  # rotated q, k, v and the output
    chunk = max(1, chunk_bytes // per_query)
    taylor = "torch" if settings.backend == "torch" else "auto"
    out = torch.empty_like(q)
    for i0 in range(0, frames, chunk):
        queries = list(range(i0, min(frames, i0 + chunk)))
        qs, ks, vs = (in_context_sequences(x, queries, heads) for x in (q, k, v))
        plan = keyframe_isa_plan(qs, ks, vs, tokens, settings)
        result = isa_attention_split(qs, ks, vs, plan, taylor=taylor)  # rows of the context are not computed
        out[i0:i0 + len(queries)] = result[:, :, :tokens].transpose(1, 2).reshape(len(queries), tokens, width)
    return out
