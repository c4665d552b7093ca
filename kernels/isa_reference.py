"""Plain-torch reference for ISA, In-context Sparse Attention (Shao et al., ICML 2026, arXiv 2605.04569).

This module is the definition of the method as LongEdit implements it; `isa.py` is its Triton twin and runs
the attention step from the same `IsaPlan`. Everything is computed in float32.

The token axis holds "source" tokens and one contiguous range [ctx_start, ctx_end) of "context" tokens
(in-context editing puts the source video's tokens there). ISA works on blocks of `block_size` tokens:

1. Blocks. Each of the up to three segments [0, ctx_start), [ctx_start, ctx_end), [ctx_end, N) is tiled on
   its own, so no block straddles the context boundary. "grid" tiling (the default) cuts the plain tiling
   of the whole axis (blocks [m b, (m + 1) b)) at the segment edges, so a segment may start and end with a
   partial block; "segment" tiling starts a full block at each segment's start and only the last block of
   a segment may be partial. With ctx_start and ctx_end multiples of `block_size` both are the plain tiling.
2. Pooling. q̄, k̄, v̄ [B, H, nb, d]: the mean of each block's tokens (true count for partial blocks).
3. Coarse scores. S̄ = q̄ k̄ᵀ / sqrt(d), [B, H, nb, nb].
4. Context pre-selection. Source KV blocks are always kept. Of the context KV blocks, ceil(alpha_s *
   n_ctx_blocks) are kept: the most salient (`context_saliency`: by default "softmax_mass", the pooled
   attention mass sum_i softmax_j'(S̄[i, j'] + ln b_j')[j] over the source query blocks i; or "logit_mean",
   the mean of S̄[i, j]), except that the context segment's partial blocks (fewer than `block_size`
   tokens: its last block, and with "grid" tiling its first) are always among them when any are kept
   (even when ceil(alpha_s * n_ctx_blocks) is smaller). That way every head keeps the same number of
   tokens, which lets the exact path run as one dense attention call over gathered tokens
   (`isa_split.py`). The kept set is per (batch, head).
5. Query sharpness. For each query block i, p = softmax_j(S̄[i, j] + ln b_j) over the kept blocks j
   (b_j = tokens in block j: the pooled estimate of block j's attention mass, as in step 6), and
   sharpness_i = Var(p) = (1/n) * sum_j (p_j - 1/n)^2 with n = number of kept blocks (`query_sharpness`;
   or "topk_mass", the sum of the n_near largest p_j). The top ceil(alpha_f * nb) query blocks by
   sharpness ("sharp" blocks) take exact attention over every token of the kept blocks.
6. 0-th order Taylor path for the other ("Taylor") query blocks. Each query token attends exactly to the
   tokens of that block's top max(1, ceil(alpha_ns * n)) kept blocks (ranked by S̄[i, j]; its "near"
   blocks) and, for every other kept block j, to one pseudo-token with logit q·k̄_j / sqrt(d) + ln b_j and
   value v̄_j; one softmax runs over all of them. (exp(q·k̄_j/√d + ln b_j) = b_j exp(q·k̄_j/√d) is the 0-th
   order Taylor expansion of the block's sum of exp(q·k_t/√d) around its mean key.)

Saliency and sharpness rankings are stable descending sorts (ties go to the lower block index), so a
larger ratio always selects a superset; near blocks are a top-k by coarse score (exact ties may go either
way). Counts use ceil(ratio * n) with a 1e-9 guard against float noise (0.1 * 30 is 3).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

DEFAULT_BLOCK_SIZE = 64
DEFAULT_ALPHA_S = 0.15  # share of context KV blocks kept by pre-selection (0.125 in the paper; see README, ISA vs the authors)
DEFAULT_ALPHA_F = 0.5  # share of query blocks that take exact ("full") attention
DEFAULT_ALPHA_NS = 0.0625  # share of kept KV blocks a Taylor query block still attends to exactly
# How context blocks are ranked for pre-selection (step 4) and query blocks for exact attention (step 5).
# "logit_mean" / "variance" are the paper's rules as first implemented here; "softmax_mass" / "topk_mass" are
# the rules of the authors' code (see `context_saliency`, `query_sharpness`). bench/isa_rules.py measures them.
SALIENCY_RULES = ("logit_mean", "softmax_mass")
SHARPNESS_RULES = ("variance", "topk_mass")
TILINGS = ("segment", "grid")
DEFAULT_TILING = "grid"  # bench/isa_rules.py: see `block_layout`
DEFAULT_SALIENCY = "softmax_mass"  # bench/isa_rules.py: lower error on Gaussian and mixture inputs, equal on structured
DEFAULT_SHARPNESS = "variance"  # bench/isa_rules.py: ties "topk_mass" on every generator (within 0.5%), and is cheaper


@dataclass(frozen=True)
class BlockLayout:
    """How the token axis is cut into blocks; shared by every batch item and head.

    start, count: int64 [nb], first token and number of tokens of each block (1 <= count <= block_size).
    is_context: bool [nb], whether the block lies in [ctx_start, ctx_end).
    segments: ((start, end, is_context), ...), the non-empty segments the blocks tile, in token order.
    context_blocks: (first, end), the range of context block ids (empty when there is no context).
    context_tail_partial: whether the last context block holds fewer than block_size tokens.
    context_partial: ids of the context blocks with fewer than block_size tokens (at most two: the first
        one with "grid" tiling, the last one).
    tiling: "segment" (each segment tiled from its own start) or "grid" (blocks end on multiples of
        block_size, as in a plain tiling of the whole axis, and are cut at the segment edges).
    """

    block_size: int
    start: torch.Tensor
    count: torch.Tensor
    is_context: torch.Tensor
    segments: tuple[tuple[int, int, bool], ...]
    context_blocks: tuple[int, int] = (0, 0)
    context_tail_partial: bool = False
    context_partial: tuple[int, ...] = ()
    context_partial_tokens: int = 0
    tiling: str = "segment"

    @property
    def n_blocks(self) -> int:
        return self.start.numel()

    # int32 copies for the kernels, made once per cached layout rather than converted at every call
    @functools.cached_property
    def start32(self) -> torch.Tensor:
        return self.start.to(torch.int32)

    @functools.cached_property
    def count32(self) -> torch.Tensor:
        return self.count.to(torch.int32)

    # context block ids on the layout's device, made once: pre-selection keeps the partial ones and ranks the rest
    @functools.cached_property
    def context_partial_ids(self) -> torch.Tensor:
        return torch.tensor(self.context_partial, dtype=torch.int64, device=self.start.device)

    @functools.cached_property
    def context_full_ids(self) -> torch.Tensor:
        first, end = self.context_blocks
        full = [j for j in range(first, end) if j not in self.context_partial]
        return torch.tensor(full, dtype=torch.int64, device=self.start.device)


@dataclass(frozen=True)
class IsaPlan:
    """Everything ISA decides before attention; every attention path (reference, torch, Triton) runs from it.

    layout: the blocks.
    pooled_k, pooled_v: float32 [B, H, nb, d], block means k̄ and v̄ (the Taylor pseudo-tokens).
    kept_blocks: int64 [B, H, n_kept], KV blocks that survive context pre-selection, ascending.
    exact_query: bool [B, H, nb], the sharp query blocks (exact attention over every kept block).
    sharp_blocks: int64 [B, H, n_sharp], the sharp query blocks, ascending.
    taylor_blocks: int64 [B, H, n_taylor], the other query blocks, ascending.
    near_slots: int64 [B, H, n_taylor, n_near], for each Taylor query block the positions in kept_blocks of
        the blocks it attends to token by token (its best-scored kept blocks, in no particular order); the
        other kept blocks reach it as pooled pseudo-tokens.
    n_kept_tokens: tokens in the kept blocks, the same for every (batch, head).
    """

    layout: BlockLayout
    pooled_k: torch.Tensor
    pooled_v: torch.Tensor
    kept_blocks: torch.Tensor
    exact_query: torch.Tensor
    sharp_blocks: torch.Tensor
    taylor_blocks: torch.Tensor
    near_slots: torch.Tensor
    n_kept_tokens: int

    @property
    def n_kept(self) -> int:
        return self.kept_blocks.shape[-1]

    @property
    def n_near(self) -> int:
        return self.near_slots.shape[-1]


def count_for_ratio(ratio: float, n: int) -> int:
    """ceil(ratio * n), guarded against float noise and clipped to [0, n]."""
    return min(n, max(0, math.ceil(ratio * n - 1e-9)))


def block_layout(n_tokens: int, ctx_start: int, ctx_end: int, block_size: int = DEFAULT_BLOCK_SIZE,
                 device: torch.device | str | None = None, tiling: str = DEFAULT_TILING) -> BlockLayout:
    """Tile the source and context segments separately, so that no block mixes source and context tokens.
    Cached: a DiT asks for the same layout in every layer of every step.

    tiling "grid" (default) or "segment" (see the module notes). Measured with bench/isa_rules.py (CPU,
    1x2x10,710, context from token 5,355, 43 tokens off the 64 grid): on bench/isa_inputs.py's structured
    inputs, whose clusters follow the 64 grid of the whole axis, "segment" puts every context block across
    two clusters (rel. error 6.2e-2 vs 1.2e-2 with "grid"); on the mixture inputs, whose runs follow no
    grid, "segment" is ~4% lower (9.39e-2 vs 9.80e-2: "grid" spends a kept slot on a second partial block)."""
    if tiling not in TILINGS:
        raise ValueError(f"ISA: unknown tiling '{tiling}', expected one of {TILINGS}")
    return _block_layout(n_tokens, ctx_start, ctx_end, block_size, torch.device(device or "cpu"), tiling)


def first_full_edge(seg_start: int, seg_end: int, block_size: int, tiling: str) -> int:
    """Where a segment's first block ends under `tiling` ("segment": a full block from its start; "grid": the
    next multiple of block_size), clipped to the segment."""
    if tiling == "grid":
        return min(seg_end, -(-(seg_start + 1) // block_size) * block_size)
    return min(seg_end, seg_start + block_size)


@functools.lru_cache(maxsize=16)
def _block_layout(n_tokens: int, ctx_start: int, ctx_end: int, block_size: int, device: torch.device,
                  tiling: str = DEFAULT_TILING) -> BlockLayout:
    if not 0 <= ctx_start <= ctx_end <= n_tokens:
        raise ValueError(f"ISA: context range [{ctx_start}, {ctx_end}) does not fit in {n_tokens} tokens")
    if block_size < 1:
        raise ValueError(f"ISA: block_size must be positive, got {block_size}")
    segments = tuple((s, e, ctx) for s, e, ctx in ((0, ctx_start, False), (ctx_start, ctx_end, True),
                                                   (ctx_end, n_tokens, False)) if e > s)
    starts, counts, flags = [], [], []
    for seg_start, seg_end, is_ctx in segments:
        edge = first_full_edge(seg_start, seg_end, block_size, tiling)
        for s in [seg_start] + list(range(edge, seg_end, block_size)) if edge < seg_end else [seg_start]:
            starts.append(s)
            counts.append((edge if s == seg_start else min(seg_end, s + block_size)) - s)
            flags.append(is_ctx)
    context = [i for i, flag in enumerate(flags) if flag]
    context_blocks = (context[0], context[-1] + 1) if context else (0, 0)
    return BlockLayout(block_size=block_size,
                       start=torch.tensor(starts, dtype=torch.int64, device=device),
                       count=torch.tensor(counts, dtype=torch.int64, device=device),
                       is_context=torch.tensor(flags, dtype=torch.bool, device=device),
                       segments=segments, context_blocks=context_blocks,
                       context_tail_partial=bool(context) and counts[context[-1]] < block_size,
                       context_partial=tuple(i for i in context if counts[i] < block_size),
                       context_partial_tokens=sum(counts[i] for i in context if counts[i] < block_size), tiling=tiling)


def pool_blocks(x: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Block means of x [B, H, N, d] -> float32 [B, H, nb, d]; partial blocks divide by their true count.

    Works segment by segment on views, so no float32 copy of x is made (the reduction accumulates in
    float32)."""
    size = layout.block_size
    pieces = []
    for seg_start, seg_end, _ in layout.segments:
        edge = first_full_edge(seg_start, seg_end, size, layout.tiling)
        if edge - seg_start < size:  # a partial first block ("grid" tiling, or a segment shorter than a block)
            pieces.append(x[:, :, seg_start:edge].mean(dim=2, keepdim=True, dtype=torch.float32))
            seg_start = edge
        n_full = (seg_end - seg_start) // size
        full_end = seg_start + n_full * size
        if n_full:
            pieces.append(x[:, :, seg_start:full_end].unflatten(2, (n_full, size)).mean(dim=3, dtype=torch.float32))
        if full_end < seg_end:
            pieces.append(x[:, :, full_end:seg_end].mean(dim=2, keepdim=True, dtype=torch.float32))
    return torch.cat(pieces, dim=2)


def coarse_scores(pooled_q: torch.Tensor, pooled_k: torch.Tensor) -> torch.Tensor:
    """S̄ = q̄ k̄ᵀ / sqrt(d): float32 [B, H, nb_q, nb_k]."""
    return pooled_q.float() @ pooled_k.float().transpose(-1, -2) / math.sqrt(pooled_q.shape[-1])


def context_saliency(pooled_q: torch.Tensor, pooled_k: torch.Tensor, layout: BlockLayout,
                     rule: str = DEFAULT_SALIENCY) -> torch.Tensor:
    """Saliency of each context KV block j, [B, H, n_ctx_blocks], in the pooled tensors' dtype (float32 from
    `pool_blocks`; float64 inputs stay float64), over the source query blocks i (all query blocks if there
    are none):

    * "logit_mean": the mean coarse score S̄[i, j]. The mean of q̄_i·k̄_j over i is (mean of q̄_i)·k̄_j, so
      this costs one matrix-vector product per head instead of the [nb, nb] score matrix.
    * "softmax_mass": sum over i of P[i, j], P[i] = softmax over ALL blocks j' of S̄[i, j'] + ln b_j': the
      pooled estimate of the attention mass the source queries put on block j (the authors' code ranks by
      the block-softmax probability summed over target queries, without the ln b_j' of partial blocks)."""
    first, end = layout.context_blocks
    nb = layout.n_blocks
    pieces = [pooled_q[:, :, :first], pooled_q[:, :, end:]] if end - first < nb else [pooled_q]
    source_q = torch.cat(pieces, dim=2)
    if rule == "logit_mean":
        return _scores(source_q.mean(dim=2, keepdim=True), pooled_k[:, :, first:end]).squeeze(2)
    if rule == "softmax_mass":
        log_counts = layout.count.to(pooled_k.dtype).log()
        mass = (_scores(source_q, pooled_k) + log_counts).softmax(dim=-1)  # [B, H, n_src, nb]
        return mass[..., first:end].sum(dim=2)
    raise ValueError(f"ISA: unknown saliency rule '{rule}', expected one of {SALIENCY_RULES}")


def _scores(pooled_q: torch.Tensor, pooled_k: torch.Tensor) -> torch.Tensor:
    """q̄ k̄ᵀ / sqrt(d) in the inputs' dtype (`coarse_scores` always computes in float32)."""
    return pooled_q @ pooled_k.transpose(-1, -2) / math.sqrt(pooled_q.shape[-1])


def kept_context_counts(layout: BlockLayout, alpha_s: float) -> tuple[int, int]:
    """(context blocks kept, how many of them are the partial context blocks), from the layout alone. When
    any context block is kept, every partial one is (at most two)."""
    first, end = layout.context_blocks
    n_keep_ctx = count_for_ratio(alpha_s, end - first)
    if end - first == layout.n_blocks:  # nothing but context: keep at least one block
        n_keep_ctx = max(1, n_keep_ctx)
    n_partial = len(layout.context_partial) if n_keep_ctx else 0
    return max(n_keep_ctx, n_partial), n_partial


def select_kv_blocks(saliency: torch.Tensor, layout: BlockLayout, alpha_s: float) -> torch.Tensor:
    """Context pre-selection: int64 [B, H, n_kept] kept KV blocks, ascending.

    Every source block is kept; ceil(alpha_s * n_ctx_blocks) context blocks are kept: the partial context
    blocks, if there are any, and the most salient of the others (`context_saliency`). At least one
    block is kept. No device round trip: every count comes from the layout."""
    batch, heads = saliency.shape[:2]
    nb = layout.n_blocks
    first, end = layout.context_blocks
    device = saliency.device
    src_blocks = torch.cat([torch.arange(first, device=device), torch.arange(end, nb, device=device)])
    n_keep_ctx, n_partial = kept_context_counts(layout, alpha_s)
    kept = [src_blocks.expand(batch, heads, -1)]
    if n_partial:  # always kept, so that every head keeps the same number of tokens
        kept.append(layout.context_partial_ids.to(device).expand(batch, heads, -1))
    if n_keep_ctx > n_partial:
        candidates = layout.context_full_ids.to(device)
        best = saliency[..., candidates - first].argsort(dim=-1, descending=True, stable=True)
        kept.append(candidates[best[..., :n_keep_ctx - n_partial]])
    return torch.cat(kept, dim=-1).sort(dim=-1).values


def kept_token_count(layout: BlockLayout, alpha_s: float) -> int:
    """Tokens in the kept blocks of every head (the same for all heads, see `select_kv_blocks`)."""
    n_ctx_tokens = sum(e - s for s, e, ctx in layout.segments if ctx)
    n_keep_ctx, n_partial = kept_context_counts(layout, alpha_s)
    partial = layout.context_partial_tokens if n_partial else 0
    return layout.segments[-1][1] - n_ctx_tokens + partial + (n_keep_ctx - n_partial) * layout.block_size


def gather_blocks(per_block: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """per_block [B, H, nb, d] -> [B, H, n, d], the rows of `blocks` [B, H, n]."""
    return per_block.gather(2, blocks.unsqueeze(-1).expand(-1, -1, -1, per_block.shape[-1]))


def query_sharpness(kept_scores: torch.Tensor, kept_log_counts: torch.Tensor, rule: str = DEFAULT_SHARPNESS,
                    top: int = 1) -> torch.Tensor:
    """Sharpness of each query block from p = softmax over kept blocks j of S̄[i, j] + ln b_j, [B, H, nb_q] in
    kept_scores' dtype. kept_scores [B, H, nb_q, n_kept] are the coarse scores of the kept blocks,
    kept_log_counts [B, H, n_kept] their ln b_j.

    * "variance": Var(p) = (1/n) * sum_j (p_j - 1/n)^2 (the mean of p is exactly 1/n). High variance means
      a peaked block distribution, which the 0-th order Taylor path approximates worst, so those blocks go
      exact.
    * "topk_mass": the sum of the `top` largest p_j (the authors' code sums the top-k block probabilities
      over the target key blocks, k = 1/16 of them; here the kept blocks, k given by the caller)."""
    p = (kept_scores + kept_log_counts.unsqueeze(2)).softmax(dim=-1)
    n = p.shape[-1]
    if rule == "variance":
        # (1/n) * sum_j (p_j - 1/n)^2 = (sum_j p_j^2 - 1/n) / n, since sum_j p_j = 1: one pass over p, not four
        return (torch.linalg.vector_norm(p, dim=-1).square() - 1.0 / n) / n
    if rule == "topk_mass":
        return p.topk(min(max(1, top), n), dim=-1, sorted=False).values.sum(dim=-1)
    raise ValueError(f"ISA: unknown sharpness rule '{rule}', expected one of {SHARPNESS_RULES}")


def select_exact_queries(sharpness: torch.Tensor, alpha_f: float) -> torch.Tensor:
    """bool [B, H, nb]: the top ceil(alpha_f * nb) query blocks by sharpness."""
    n_exact = count_for_ratio(alpha_f, sharpness.shape[-1])
    best = sharpness.argsort(dim=-1, descending=True, stable=True)[..., :n_exact]
    return torch.zeros_like(sharpness, dtype=torch.bool).scatter_(-1, best, True)


def split_queries(exact_query: torch.Tensor, n_sharp: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sharp, taylor) int64 [B, H, n] ascending block ids; each (batch, head) must have the same counts
    (checked unless the caller passes n_sharp, which it knows by construction)."""
    batch, heads, nb = exact_query.shape
    if n_sharp is None:
        n_sharp = int(exact_query[0, 0].sum()) if exact_query.numel() else 0
        if exact_query.numel() and not (exact_query.sum(-1) == n_sharp).all():
            raise ValueError("ISA: every (batch, head) must route the same number of query blocks to exact "
                             "attention")
    ids = torch.arange(nb, device=exact_query.device).expand(batch, heads, nb)
    # a stable sort on the flag puts sharp blocks first, each group in ascending block order
    order = (~exact_query).to(torch.uint8).argsort(dim=-1, stable=True)
    ordered = ids.gather(-1, order)
    return ordered[..., :n_sharp], ordered[..., n_sharp:]


def plan_isa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx_start: int, ctx_end: int, *,
             block_size: int = DEFAULT_BLOCK_SIZE, alpha_s: float = DEFAULT_ALPHA_S,
             alpha_f: float = DEFAULT_ALPHA_F, alpha_ns: float = DEFAULT_ALPHA_NS,
             exact_query: torch.Tensor | None = None, pooled: tuple | None = None,
             saliency: str = DEFAULT_SALIENCY, sharpness: str = DEFAULT_SHARPNESS,
             tiling: str = DEFAULT_TILING) -> IsaPlan:
    """Everything before attention (steps 1-5 and the near blocks of step 6), computed once in torch.

    exact_query (bool [B, H, nb], optional) overrides the sharpness routing; tests use it to compare
    routings on one input. pooled: (q̄, k̄, v̄) already computed by a twin of `pool_blocks` (the Triton one
    on CUDA). saliency, sharpness: the ranking rules of steps 4 and 5 (`context_saliency`,
    `query_sharpness`; "topk_mass" sums the top n_near block probabilities, n_near as in step 6). tiling:
    `block_layout`'s; `pooled`, when given, must come from the same layout."""
    check_qkv(q, k, v)
    if saliency not in SALIENCY_RULES or sharpness not in SHARPNESS_RULES:
        raise ValueError(f"ISA: unknown ranking rule (saliency '{saliency}', sharpness '{sharpness}'); expected "
                         f"saliency in {SALIENCY_RULES} and sharpness in {SHARPNESS_RULES}")
    for name, ratio in (("alpha_s", alpha_s), ("alpha_f", alpha_f), ("alpha_ns", alpha_ns)):
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ISA: {name} must lie in [0, 1], got {ratio}")
    layout = block_layout(q.shape[2], ctx_start, ctx_end, block_size, device=q.device, tiling=tiling)
    pooled_q, pooled_k, pooled_v = pooled or (pool_blocks(x, layout) for x in (q, k, v))
    if pooled_q.shape[2] != layout.n_blocks:
        raise ValueError(f"ISA: {pooled_q.shape[2]} pooled blocks given for a layout of {layout.n_blocks} blocks")
    pooled_q, pooled_k, pooled_v = (x.float() for x in (pooled_q, pooled_k, pooled_v))
    kept = select_kv_blocks(context_saliency(pooled_q, pooled_k, layout, saliency), layout, alpha_s)
    kept_k = gather_blocks(pooled_k, kept)
    kept_scores = coarse_scores(pooled_q, kept_k)  # [B, H, nb, n_kept]
    n_kept = kept.shape[-1]
    n_near = min(n_kept, max(1, count_for_ratio(alpha_ns, n_kept)))
    n_sharp = None  # a routing given by the caller is checked
    if exact_query is None:
        block_sharpness = query_sharpness(kept_scores, layout.count.float().log()[kept], sharpness, top=n_near)
        exact_query = select_exact_queries(block_sharpness, alpha_f)
        n_sharp = count_for_ratio(alpha_f, layout.n_blocks)
    sharp, taylor = split_queries(exact_query, n_sharp)
    taylor_scores = coarse_scores(gather_blocks(pooled_q, taylor), kept_k)  # [B, H, n_taylor, n_kept]
    return IsaPlan(layout=layout, pooled_k=pooled_k, pooled_v=pooled_v, kept_blocks=kept,
                   exact_query=exact_query, sharp_blocks=sharp, taylor_blocks=taylor,
                   near_slots=taylor_scores.topk(n_near, dim=-1, sorted=False).indices,
                   n_kept_tokens=kept_token_count(layout, alpha_s))


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q, k, v must share one [B, H, N, d] shape (self-attention over the whole in-context sequence)."""
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"ISA: expected q, k, v of one shape [B, H, N, d], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] == 0:
        raise ValueError("ISA: the sequence is empty")


def attend_block(q_rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pooled_k: torch.Tensor,
                 pooled_v: torch.Tensor, exact_blocks: list[int], pooled_blocks: list[int],
                 starts: list[int], counts: list[int]) -> torch.Tensor:
    """Output rows of one query block, all float32: q_rows [c, d]; k, v [N, d]; pooled_k, pooled_v [nb, d].

    One softmax over every token of `exact_blocks` and one pseudo-token per block j of `pooled_blocks`
    (logit q·k̄_j/√d + ln b_j, value v̄_j)."""
    exact_k = torch.cat([k[starts[j]:starts[j] + counts[j]] for j in exact_blocks])
    exact_v = torch.cat([v[starts[j]:starts[j] + counts[j]] for j in exact_blocks])
    keys = torch.cat([exact_k, pooled_k[pooled_blocks]])
    values = torch.cat([exact_v, pooled_v[pooled_blocks]])
    log_counts = [math.log(counts[j]) for j in pooled_blocks]
    bias = torch.tensor([0.0] * exact_k.shape[0] + log_counts, device=k.device)
    logits = q_rows @ keys.T / math.sqrt(q_rows.shape[-1]) + bias
    return logits.softmax(dim=-1) @ values


def block_routes(plan: IsaPlan, b: int, h: int):
    """(query block, exact KV blocks, pooled KV blocks) for every query block of (batch b, head h), in the
    order the kernels visit them: near blocks in the plan's order, pooled blocks ascending."""
    kept = plan.kept_blocks[b, h].tolist()
    for i in plan.sharp_blocks[b, h].tolist():
        yield i, kept, []
    for i, slots in zip(plan.taylor_blocks[b, h].tolist(), plan.near_slots[b, h].tolist()):
        near = set(slots)
        yield i, [kept[s] for s in slots], [kept[s] for s in range(len(kept)) if s not in near]


def isa_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: IsaPlan) -> torch.Tensor:
    """ISA attention of q, k, v [B, H, N, d] under `plan`, in float32, returned in q's dtype.

    A sharp query block attends token by token to every kept block; a Taylor block to its near blocks, and
    through pooled pseudo-tokens to the other kept blocks. Loops over (batch, head, query block): memory is
    O(block_size * N) at a time, but it is slow; it is the definition the other paths are checked against,
    not a production path for long sequences."""
    check_qkv(q, k, v)
    batch, heads = q.shape[:2]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    starts, counts = plan.layout.start.tolist(), plan.layout.count.tolist()
    for b in range(batch):
        for h in range(heads):
            qf, kf, vf = q[b, h].float(), k[b, h].float(), v[b, h].float()
            for i, exact_blocks, pooled_blocks in block_routes(plan, b, h):
                s, c = starts[i], counts[i]
                out[b, h, s:s + c] = attend_block(qf[s:s + c], kf, vf, plan.pooled_k[b, h], plan.pooled_v[b, h],
                                                  exact_blocks, pooled_blocks, starts, counts)
    return out.to(q.dtype)


def isa_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx_start: int, ctx_end: int, *,
                  block_size: int = DEFAULT_BLOCK_SIZE, alpha_s: float = DEFAULT_ALPHA_S,
                  alpha_f: float = DEFAULT_ALPHA_F, alpha_ns: float = DEFAULT_ALPHA_NS,
                  saliency: str = DEFAULT_SALIENCY, sharpness: str = DEFAULT_SHARPNESS,
                  tiling: str = DEFAULT_TILING) -> torch.Tensor:
    """Plan and run ISA in plain torch: q, k, v [B, H, N, d] -> [B, H, N, d] in q's dtype."""
    plan = plan_isa(q, k, v, ctx_start, ctx_end, block_size=block_size, alpha_s=alpha_s, alpha_f=alpha_f,
                    alpha_ns=alpha_ns, saliency=saliency, sharpness=sharpness, tiling=tiling)
    return isa_attention_reference(q, k, v, plan)
