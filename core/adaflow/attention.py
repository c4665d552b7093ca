"""AdaFlow's self-attention for the keyframe pass: PnP q/k injection, extended attention, AAS.

The keyframe pass runs one batch laid out as branches x keyframes: [source | edited branch 1 | ...], each
branch holding the same K keyframes in the same order. For every UNet self-attention layer:
- the source branch (the unedited video at this step) attends within each frame, as normal;
- when PnP is on for this step and layer, the edited branches take the source branch's q and k (the
  structure of the source), keeping their own v (the appearance of the edit);
- each edited branch's frames attend to the tokens of all its K keyframes (extended attention), or with
  Adaptive Attention Slimming to a per-query-frame subset of them, ranked by DIFT similarity, or with ISA
  over the in-context sequence [own tokens | other keyframes' tokens] (keyframe_isa.py).
Everything here is plain tensors; the host (ComfyUI) installs `adaflow_self_attention` as an attn1 replace.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ...kernels import subset_attention
from .keyframe_isa import keyframe_isa_attention
from .slimming import KeyframeSlimming

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]  # (q, k, v, heads) -> out


@dataclass
class PassLayout:
    """How the current model call's batch is laid out, and what this step does (set per call)."""

    frames: int  # K keyframes per branch
    branches: int  # including the source branch when `has_source`
    has_source: bool
    inject_qk: bool  # PnP attention injection is on at this step
    inject_conv: bool  # PnP residual-feature injection is on at this step
    selection: dict[int, torch.Tensor] | None = None  # tokens per frame -> [K, S] AAS subset; None: full
    extended: bool = True  # edited branches attend across keyframes (False: per frame, e.g. non-keyframes)
    record: dict | None = None  # keyframe pass: layer -> its attention output [branches, K*T, C], kept
    propagate: "Propagation | None" = None  # propagation pass: take outputs from the recorded keyframes
    isa: KeyframeSlimming | None = None  # keyframe pass slimmed by ISA (policy 'isa'); None: AAS or full
    # A chunk pass whose source branch runs apart (see edit.py, source_use): the source-only call stores PnP's
    # residual feature here and stops; the edited branches' call then takes `source_feature` at that layer.
    capture: dict | None = None
    source_feature: torch.Tensor | None = None


@dataclass
class Propagation:
    """For a chunk of non-keyframes: where each of their tokens takes its attention output from.

    index[T] is [n, T] into the recorded keyframe outputs flattened over K*T (T tokens per frame at that
    attention level): frame f's token t takes the output of token matches[f, t] of its clip's keyframe."""

    recorded: dict
    index: dict[int, torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Plain multi-head attention on [B, N, H*d] tensors (the default when the host gives none)."""
    b, n, width = q.shape
    d = width // heads
    split = lambda t: t.view(b, -1, heads, d).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, n, width)


def extended_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Every frame's queries attend to all frames' tokens: one attention over the K*T token sequence."""
    frames, tokens, width = q.shape
    out = sdpa_attention(q.reshape(1, frames * tokens, width), k.reshape(1, -1, width), v.reshape(1, -1, width), heads)
    return out.view(frames, tokens, width)


def propagated_output(recorded: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """recorded [B, K*T, C], index [n, T] -> [B * n, T, C]: every branch gathers through the same matches."""
    b, _, c = recorded.shape
    n, t = index.shape
    return recorded[:, index.reshape(-1)].view(b * n, t, c)


def adaflow_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, layout: PassLayout,
                           pnp_layer: bool, per_frame: Attention = sdpa_attention, layer=None) -> torch.Tensor:
    """q, k, v [branches * K, T, H*d] -> attention output of the same shape (see the module docstring).

    `layer` names the attention layer, so that a keyframe pass can record its output (layout.record) and
    a propagation pass can hand non-keyframes the recorded keyframe outputs instead of attending."""
    K, B = layout.frames, layout.branches
    if q.shape[0] != K * B:
        raise ValueError(f"batch {q.shape[0]} is not {B} branches x {K} frames")
    if layout.propagate is not None:
        return propagated_output(layout.propagate.recorded[layer], layout.propagate.index[q.shape[1]]).to(q.dtype)
    q = q.view(B, K, *q.shape[1:])
    k = k.view(B, K, *k.shape[1:])
    v = v.view(B, K, *v.shape[1:])
    first_edit = 1 if layout.has_source else 0
    if layout.has_source and layout.inject_qk and pnp_layer:
        q = torch.cat([q[:1], q[:1].expand(B - 1, -1, -1, -1)])
        k = torch.cat([k[:1], k[:1].expand(B - 1, -1, -1, -1)])
    outs = []
    if layout.has_source:
        outs.append(per_frame(q[0], k[0], v[0], heads))
    tokens = q.shape[2]
    for b in range(first_edit, B):
        if not layout.extended:
            outs.append(per_frame(q[b], k[b], v[b], heads))
        elif layout.selection is not None and tokens in layout.selection:
            sel = layout.selection[tokens]
            outs.append(subset_attention(q[b], k[b].reshape(-1, k.shape[-1]), v[b].reshape(-1, v.shape[-1]), sel, heads))
        elif layout.isa is not None and K > 1:  # one keyframe has no context to slim
            outs.append(keyframe_isa_attention(q[b], k[b], v[b], heads, layout.isa))
        else:
            outs.append(extended_attention(q[b], k[b], v[b], heads))
    out = torch.stack(outs).view(B * K, *q.shape[2:])
    if layout.record is not None:
        layout.record[layer] = out.view(B, K * q.shape[2], q.shape[3])
    return out


def aas_selection(scores: torch.Tensor, levels: list[tuple[int, int]], level_of_scores: int,
                  budget_frames: int) -> dict[int, torch.Tensor]:
    """Per attention level: for each query keyframe, the indices of the `budget_frames * T` keyframe tokens
    (of K * T) it keeps, ranked by DIFT similarity.

    scores [K, K, h*w] (at `levels[level_of_scores]`): scores[a, b, j] = best match of keyframe b's token j
    in keyframe a. Finer levels inherit each token's parent score; coarser levels average 2x2 children.
    Indices are sorted so the kernel's gathers walk memory forwards.
    """
    K = scores.shape[0]
    h, w = levels[level_of_scores]
    base = scores.float().view(K * K, 1, h, w)
    maps = {level_of_scores: base}
    for level in range(level_of_scores - 1, -1, -1):  # finer: each token takes its parent's score
        fh, fw = levels[level]
        parent = maps[level + 1]
        rows = torch.arange(fh, device=scores.device) // 2
        cols = torch.arange(fw, device=scores.device) // 2
        maps[level] = parent[:, :, rows][:, :, :, cols]
    for level in range(level_of_scores + 1, len(levels)):  # coarser: mean of the (up to) 2x2 children
        maps[level] = F.avg_pool2d(maps[level - 1], 2, ceil_mode=True)
    selection = {}
    for level, (lh, lw) in enumerate(levels):
        tokens = lh * lw
        flat = maps[level].reshape(K, K * tokens)
        keep = min(budget_frames * tokens, K * tokens)
        idx = flat.topk(keep, dim=1, sorted=False).indices
        selection[tokens] = idx.sort(dim=1).values.to(torch.int32)
    return selection


def pnp_active_steps(steps: int, fraction: float) -> int:
    """PnP injects during the first int(steps * fraction) sampling steps (as TokenFlow and AdaFlow do)."""
    return int(steps * fraction)


def as_index(frames: np.ndarray, device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(frames), dtype=torch.long, device=device)
