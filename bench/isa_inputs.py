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

mixture(heads, n, context, generator, device) -> q, k, v [1, heads, n, 128] float32: a second structured
generator built not to favour either ranking rule of ISA (mean logit vs softmax mass for context blocks,
variance vs top-k mass for query blocks) nor either tiling (ours tiles the context from its own start, the
authors' code tiles the whole sequence from 0; `structured` draws a cluster per 64 tokens from 0, which lines
up with the latter and, when n/2 is not a multiple of 64, puts every one of our context blocks across two
clusters). Every choice that would decide between them is drawn from a spread rather than fixed:
  * tokens come in runs of U{32..128} tokens (a region of a frame), each run one key cluster (64 centres as
    in `structured`, values follow keys) with its own key noise drawn from U(0.1, 0.5), so runs differ in
    how well a block mean stands for them, and no block tiling lines up with the runs;
  * each query run picks a focus width m uniformly from {1, 2, 4, 8, diffuse}: its queries point at the sum
    of m random cluster centres with random positive weights (Dirichlet-like), scaled by a temperature drawn
    from U(0.6, 1.8) (diffuse blocks: N(0, 0.3^2) noise), plus the shared 4u component and N(0, 0.2^2) token
    noise. m = 1 is where variance and top-k mass agree; m = 2..8 is where they disagree (mass spread over a
    few blocks has a high top-k sum but a moderate variance when k < m, or the reverse when k > m); the
    temperature spread lets neither rule be read off the query norm alone;
  * context relevance is graded and of two kinds, half of the context blocks each: a uniform shift (keys
    pushed against u by an offset drawn from U(CONTEXT_OFFSET / 2, 2 * CONTEXT_OFFSET), the same for every
    query: mean logit and softmax mass then rank these blocks alike), and a query-specific one (a fixed
    shift of CONTEXT_OFFSET / 2, and the block's cluster drawn from the clusters the focused source query
    blocks point at, so the queries of that cluster attend to it more than to an average source block and
    the others less: softmax mass sees this, the mean logit mostly does not). The share of the source
    queries' attention on context (`context_mass`) is ~2x that of `structured`.
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


FOCUS_WIDTHS = (1, 2, 4, 8, 0)  # 0: diffuse


def mixture(heads: int, n: int, context: bool, generator: torch.Generator, device="cpu",
            block: int = 64) -> list[torch.Tensor]:
    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device)

    def rand(*shape):
        return torch.rand(*shape, generator=generator, device=device)

    # runs of 32..128 tokens (mean 80, not a multiple of any block size): no tiling lines up with them
    lengths = torch.randint(32, 129, (n // 32 + 1,), generator=generator, device=device)
    run_of = torch.bucketize(torch.arange(n, device=device), lengths.cumsum(0), right=True)
    n_blocks = int(run_of[-1]) + 1  # "blocks" below are these runs

    def per_block(values):  # [heads, n_runs, ...] -> [heads, n, ...]
        return values[:, run_of]

    centres = F.normalize(randn(heads, CLUSTERS, D), dim=-1) * D ** 0.25 * 1.6
    shared = F.normalize(randn(D), dim=0)
    # queries: per run, a focus of m clusters with random positive weights, or diffuse
    width = torch.tensor(FOCUS_WIDTHS, device=device)[
        torch.randint(0, len(FOCUS_WIDTHS), (heads, n_blocks), generator=generator, device=device)]
    focus = torch.randint(0, CLUSTERS, (heads, n_blocks, max(FOCUS_WIDTHS)), generator=generator, device=device)
    weights = -torch.log(rand(heads, n_blocks, max(FOCUS_WIDTHS)).clamp_min(1e-6))  # exponential: Dirichlet
    weights = weights * (torch.arange(max(FOCUS_WIDTHS), device=device) < width[..., None])
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)
    direction = (weights[..., None] * centres[torch.arange(heads, device=device)[:, None, None], focus]).sum(2)
    temperature = 0.6 + 1.2 * rand(heads, n_blocks, 1)
    diffuse = (width == 0)[..., None]
    q_block = torch.where(diffuse, torch.zeros_like(direction), temperature * direction
                          / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12) * D ** 0.25 * 1.6)
    q = per_block(q_block) + torch.where(per_block(diffuse), 0.3 * randn(heads, n, D), 0.2 * randn(heads, n, D))
    q = q + 4.0 * shared
    # keys: one cluster per block, block-specific noise
    key_cluster = torch.randint(0, CLUSTERS, (heads, n_blocks), generator=generator, device=device)
    noise = 0.1 + 0.4 * rand(heads, n_blocks, 1)
    if context:
        is_ctx = torch.zeros(n_blocks, dtype=torch.bool, device=device).index_fill_(
            0, run_of[n // 2:].unique(), True)  # runs with a token in the context half
        query_specific = is_ctx & (rand(heads, n_blocks) < 0.5)
        # query-specific context blocks take a cluster that some sharp source query block points at
        src_focus = focus[:, :, 0].masked_fill(diffuse.squeeze(-1) | is_ctx, -1)
        pick = torch.randint(0, n_blocks, (heads, n_blocks), generator=generator, device=device)
        pick = torch.minimum(pick, torch.full_like(pick, max(1, int(run_of[max(0, n // 2 - 1)]))))
        picked = src_focus.gather(1, pick)
        key_cluster = torch.where(query_specific & (picked >= 0), picked, key_cluster)
        offset = torch.where(query_specific, torch.full_like(noise.squeeze(-1), CONTEXT_OFFSET / 2),
                             CONTEXT_OFFSET * (0.5 + 1.5 * rand(heads, n_blocks))) * is_ctx
    k = centres.gather(1, per_block(key_cluster)[..., None].expand(-1, -1, D)) + per_block(noise) * randn(heads, n, D)
    if context:  # q·(-c u)/sqrt(d) with q·u ~ 4 lowers the logit by the block's offset
        k = k - per_block(offset)[..., None] * math.sqrt(D) / 4.0 * shared
    value_centres = randn(heads, CLUSTERS, D)
    v = value_centres.gather(1, per_block(key_cluster)[..., None].expand(-1, -1, D)) + 0.3 * randn(heads, n, D)
    return [t[None] for t in (q, k, v)]


GENERATORS = {"gauss": lambda heads, n, context, g, device="cpu": gaussian(heads, n, g, device),
              "struct": structured, "mixture": mixture}


def context_mass(q: torch.Tensor, k: torch.Tensor, ctx_start: int, rows: int = 512) -> float:
    """Mean share of exact attention that `rows` evenly spaced source queries put on tokens >= ctx_start
    (one head at a time, so the [rows, N] logits stay small)."""
    picked = torch.linspace(0, ctx_start - 1, min(rows, ctx_start), device=q.device).long()
    shares = []
    for h in range(q.shape[1]):
        logits = q[:, h, picked].float() @ k[:, h].float().transpose(-1, -2) / math.sqrt(q.shape[-1])
        shares.append(logits.softmax(dim=-1)[..., ctx_start:].sum(dim=-1).mean())
    return torch.stack(shares).mean().item()
