"""Inputs for the ISA benchmarks and tests: Gaussian and a documented structured generator.

structured(heads, n, context, generator, device) -> q, k, v [1, heads, n, 128] float32:
  * keys in 64 clusters: each block of 64 tokens draws its keys around one cluster centre (norm 1.6 d^1/4)
    plus N(0, 0.3^2) noise;
  * values follow the keys' clusters (a value centre per cluster + N(0, 0.3^2) noise): in a transformer
    K and V are two projections of the same token, so tokens with similar keys carry similar values;
  * queries: half the query blocks sharp (1.5x a cluster centre: the block attends mostly to its
    cluster), half flat (N(0, 0.3^2): near-uniform attention), all with a shared component 4u along one
    unit direction u (attention logits usually share a mean component);
  * with `context` (the second half of the tokens): 15 of 16 context blocks are "quiet": their keys are
    scaled by 1/3 and pushed against u so that every query's logit to them drops by `CONTEXT_OFFSET` (4);
    1 in 16 context blocks is as salient as a source block. `context_mass` measures the share of the source
    queries' exact attention that lands on context tokens (about 7% at 8,190 tokens).
This is the regime ISA is built for (a few relevant context blocks, sharp and flat queries); on Gaussian
inputs every context block matters as much as a source block, and pruning 7/8 of them shows in the error.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

D = 128
CLUSTERS = 64
CONTEXT_OFFSET = 4.0
SALIENT_CONTEXT = 1 / 16


def gaussian(heads: int, n: int, generator: torch.Generator, device="cpu") -> list[torch.Tensor]:
    return [torch.randn(1, heads, n, D, generator=generator, device=device) for _ in range(3)]


def structured(heads: int, n: int, context: bool, generator: torch.Generator, device="cpu",
               block: int = 64) -> list[torch.Tensor]:
    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device)

    def per_block(values):  # [heads, n_blocks, ...] -> [heads, n, ...]
        return values[:, torch.arange(n, device=device) // block]

    n_blocks = math.ceil(n / block)
    centres = F.normalize(randn(heads, CLUSTERS, D), dim=-1) * D ** 0.25 * 1.6
    shared = F.normalize(randn(D), dim=0)
    key_cluster = per_block(torch.randint(0, CLUSTERS, (heads, n_blocks), generator=generator, device=device))
    k = centres.gather(1, key_cluster[..., None].expand(-1, -1, D)) + 0.3 * randn(heads, n, D)
    query_cluster = per_block(torch.randint(0, CLUSTERS, (heads, n_blocks), generator=generator, device=device))
    sharp = per_block(torch.rand(heads, n_blocks, generator=generator, device=device) < 0.5)
    q = torch.where(sharp[..., None], 1.5 * centres.gather(1, query_cluster[..., None].expand(-1, -1, D)),
                    0.3 * randn(heads, n, D)) + 4.0 * shared
    if context:
        quiet_block = per_block(torch.rand(heads, n_blocks, generator=generator, device=device) >= SALIENT_CONTEXT)
        quiet = quiet_block & (torch.arange(n, device=device) >= n // 2)
        # q·(-c u)/sqrt(d) with q·u = 4 and c = offset * sqrt(d) / 4 lowers every logit by `offset`
        k = torch.where(quiet[..., None], k / 3 - CONTEXT_OFFSET * math.sqrt(D) / 4.0 * shared, k)
    value_centres = randn(heads, CLUSTERS, D)
    v = value_centres.gather(1, key_cluster[..., None].expand(-1, -1, D)) + 0.3 * randn(heads, n, D)
    return [t[None] for t in (q, k, v)]


def context_mass(q: torch.Tensor, k: torch.Tensor, ctx_start: int, rows: int = 512) -> float:
    """Mean share of exact attention that `rows` evenly spaced source queries put on tokens >= ctx_start
    (one head at a time, so the [rows, N] logits stay small)."""
    picked = torch.linspace(0, ctx_start - 1, min(rows, ctx_start), device=q.device).long()
    shares = []
    for h in range(q.shape[1]):
        logits = q[:, h, picked].float() @ k[:, h].float().transpose(-1, -2) / math.sqrt(q.shape[-1])
        shares.append(logits.softmax(dim=-1)[..., ctx_start:].sum(dim=-1).mean())
    return torch.stack(shares).mean().item()
