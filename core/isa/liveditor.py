"""LIVEditor (the ISA paper's in-context video editor, LIVEditor-14B) as plain tensor functions.

LIVEditor is Wan2.2-T2V-A14B (high-noise expert) fine-tuned for editing. Per model call it builds ONE token
sequence [target | source]: the noisy target latent through the usual patch embedding, the CLEAN source
latent (VAE-encoded input video, never noised) through a second patch embedding of the same shape
(`source_video_embedding_more_memory`). Both halves carry the sampler's timestep (one modulation for the
whole sequence) and each half has its own 3-D RoPE grid starting at position 0, so source frame f sits at the
same position as target frame f. Only the target half goes to the output head. The source is given to both
the conditional and the unconditional (negative prompt) call; the authors sample 32 UniPC steps, flow shift
6, CFG 2.5.

Every self-attention adds a learned gate times the block-pooled attention output:
    out = attention(q, k, v) + g ⊙ pooled(q, k, v),   g = (sigmoid(x · w_alpha1) − 0.5) · 0.5
where x is the block's modulated self-attention input, w_alpha1 [dim] one weight row per block, g one
scalar per token shared by all heads, and pooled(q, k, v) the attention of block-mean queries over block-mean
keys/values (blocks of 64 tokens tiled over the WHOLE sequence from token 0, the last one partial), copied to
every token of its query block. The trained weights depend on it, so it is kept whatever attention runs
inside (exact or ISA).

Long videos: the model was trained on clips of up to 21 latent frames (81 video frames). A longer latent is
denoised in overlapping windows of `clip` latent frames; at every sampling step each window is one model call
on its own [target | source] pair (positions from 0 again) and the predictions are averaged with weights that
ramp linearly across each overlap, so neighbouring windows agree in the overlap at every step and no seam is
left to show (temporal co-denoising, as in Gen-L-Video).

This module never imports ComfyUI; `nodes/liveditor.py` installs these functions on a cloned ModelPatcher.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..errors import LongEditError

GATE_BLOCK = 64  # tokens per block of the gate's pooled attention (fixed by the trained weights)
SOURCE_EMBEDDING = "source_video_embedding_more_memory"
GATE_KEY = re.compile(r"^blocks\.(\d+)\.self_attn\.alpha_1\.weight$")
# prefixes the authors' loader strips, plus ComfyUI's own ones for merged files
KEY_PREFIXES = ("wanx_unimodel.guidance_model.feedforward_model.", "model.diffusion_model.", "diffusion_model.",
                "model_ema.", "model.")
TRAINED_CLIP_LATENT_FRAMES = 21  # 81 frames at the Wan VAE's 4x time compression
AUTHORS_SAMPLING = {"steps": 32, "cfg": 2.5, "shift": 6.0, "sampler": "uni_pc"}


# ---------------------------------------------------------------------------------------------- checkpoint

@dataclass
class LiveditorWeights:
    """The weights LIVEditor adds to a Wan model: the source patch embedding and one gate row per block."""

    source_weight: torch.Tensor  # [dim, in_channels, pt, ph, pw]
    source_bias: torch.Tensor  # [dim]
    gates: torch.Tensor  # [layers, dim]: alpha_1 of every block (alpha_2 is in the file but never used)

    @property
    def dim(self) -> int:
        return self.gates.shape[1]

    @property
    def layers(self) -> int:
        return self.gates.shape[0]

    def to(self, device, dtype) -> LiveditorWeights:
        return LiveditorWeights(*(t.to(device=device, dtype=dtype) for t in
                                  (self.source_weight, self.source_bias, self.gates)))


def canonical_key(key: str) -> str:
    """A checkpoint key without the wrapper prefixes of the authors' or ComfyUI's files."""
    for prefix in KEY_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def liveditor_keys(keys: Iterable[str]) -> dict[str, str]:
    """canonical name -> key in the file, for the LIVEditor-only tensors among `keys`."""
    found = {}
    for key in keys:
        name = canonical_key(key)
        if name.startswith(SOURCE_EMBEDDING + ".") or GATE_KEY.match(name):
            found[name] = key
    return found


def weights_from_tensors(tensors: dict[str, torch.Tensor], what: str) -> LiveditorWeights:
    """LiveditorWeights from {canonical name: tensor}; a clear error when the file is not a LIVEditor one."""
    gates = {int(GATE_KEY.match(n).group(1)): t for n, t in tensors.items() if GATE_KEY.match(n)}
    weight, bias = tensors.get(SOURCE_EMBEDDING + ".weight"), tensors.get(SOURCE_EMBEDDING + ".bias")
    if weight is None or bias is None or not gates:
        missing = [n for n, ok in ((SOURCE_EMBEDDING + ".weight", weight is not None),
                                   (SOURCE_EMBEDDING + ".bias", bias is not None),
                                   ("blocks.N.self_attn.alpha_1.weight", bool(gates))) if not ok]
        raise LongEditError(
            f"{what} is not a LIVEditor checkpoint: it lacks {', '.join(missing)} (the source-video patch "
            f"embedding and the per-block attention gates LIVEditor adds to Wan).",
            "choose the LIVEditor-14B file (model hub: sst12345/liveditor) that the Load Diffusion Model node "
            "also loads; a plain Wan 2.1/2.2 checkpoint cannot edit videos in context.")
    layers = max(gates) + 1
    if sorted(gates) != list(range(layers)):
        raise LongEditError(f"{what} has attention gates for blocks {sorted(gates)}, not for 0..{layers - 1}.",
                            "the file is incomplete or damaged: download it again.")
    rows = torch.stack([gates[i].reshape(-1) for i in range(layers)])
    return LiveditorWeights(weight, bias, rows)


def check_matches_model(weights: LiveditorWeights, dim: int, layers: int, patch_weight_shape: tuple) -> None:
    """The extra weights must belong to the loaded Wan model (same width, depth and patch embedding shape)."""
    if (weights.dim, weights.layers, tuple(weights.source_weight.shape)) != (dim, layers, tuple(patch_weight_shape)):
        raise LongEditError(
            f"The LIVEditor weights (width {weights.dim}, {weights.layers} blocks, source embedding "
            f"{tuple(weights.source_weight.shape)}) do not fit the connected Wan model (width {dim}, {layers} "
            f"blocks, patch embedding {tuple(patch_weight_shape)}).",
            "load the same LIVEditor file in Load Diffusion Model and in LIVEditor.")


# ------------------------------------------------------------------------------------ sequence and positions

def grid_position_ids(frames: int, height: int, width: int) -> torch.Tensor:
    """[frames*height*width, 3] (frame, row, column) of each token in Wan's frame-major token order."""
    f, h, w = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([f, h, w], dim=-1).reshape(-1, 3)


def sequence_position_ids(target_grid: tuple[int, int, int], source_grid: tuple[int, int, int]) -> torch.Tensor:
    """[N_target + N_source, 3]: the [target | source] sequence's RoPE positions, each half from 0."""
    return torch.cat([grid_position_ids(*target_grid), grid_position_ids(*source_grid)])


def check_source(target_shape: tuple, source_shape: tuple | None) -> None:
    """LIVEditor pairs every target latent frame with the source frame at the same position."""
    if source_shape is None:
        raise LongEditError("The model is patched for LIVEditor but this call carries no source video latent.",
                            "connect the positive and negative outputs of LIVEditor (not the prompts directly) "
                            "to the sampler.")
    if tuple(source_shape[2:]) != tuple(target_shape[2:]) or source_shape[1] != target_shape[1]:
        raise LongEditError(
            f"The source latent {tuple(source_shape[1:])} and the target latent {tuple(target_shape[1:])} "
            f"(channels, frames, height, width) differ.",
            "sample the empty latent that LIVEditor outputs (it matches the source), and do not resize between.")


# ------------------------------------------------------------------------------------------- gate and pooling

def modulated_input(x: torch.Tensor, norm: Callable, modulation: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
    """A Wan block's self-attention input norm(x) * (1 + scale) + shift, from the block's modulation table
    [1, 6, dim] and the time embedding `vec` ([B, 6, dim], or [B, L, 6, dim] per token/frame)."""
    if vec.ndim == 4:
        e = (modulation.to(vec).unsqueeze(0) + vec).unbind(2)  # each [B, L, dim]
        shift, scale = (_repeat_tokens(t, x.shape[1]) for t in e[:2])
    else:
        e = (modulation.to(vec) + vec).chunk(6, dim=1)  # each [B, 1, dim]
        shift, scale = e[0], e[1]
    return torch.addcmul(shift.to(x.dtype), norm(x), 1 + scale.to(x.dtype))


def _repeat_tokens(e: torch.Tensor, n: int) -> torch.Tensor:
    """Per-frame modulation [B, L, dim] repeated to n tokens (L divides n, or L == 1)."""
    if e.shape[1] in (1, n):
        return e
    return torch.repeat_interleave(e, n // e.shape[1], dim=1)


def gate_values(attention_input: torch.Tensor, gate_weight: torch.Tensor) -> torch.Tensor:
    """g = (sigmoid(x · w) − 0.5) · 0.5 for x [B, N, dim] and w [dim] -> [B, N] in float32 (in (−0.25, 0.25)).
    The dot product runs in x's dtype (float32 accumulation), as the authors' bf16 Linear does."""
    logits = (attention_input @ gate_weight.to(attention_input.dtype).reshape(-1)).float()
    return (torch.sigmoid(logits) - 0.5) * 0.5


def block_means(x: torch.Tensor, block: int = GATE_BLOCK) -> torch.Tensor:
    """[B, H, N, d] -> float32 [B, H, ceil(N / block), d]: mean of each block of tokens (the last may be partial).
    Sums accumulate in float32 without a float32 copy of x."""
    b, h, n, d = x.shape
    full = n // block
    parts = [x[:, :, :full * block].reshape(b, h, full, block, d).sum(3, dtype=torch.float32) / block]
    if n > full * block:
        parts.append(x[:, :, full * block:].sum(2, keepdim=True, dtype=torch.float32) / (n - full * block))
    return torch.cat(parts, dim=2)


def pooled_attention_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            block: int = GATE_BLOCK) -> torch.Tensor:
    """softmax(q̄ k̄ᵀ / √d) v̄ over the blocks of the whole sequence: [B, H, N, d] -> float32 [B, H, nb, d].
    O(N·d + (N/block)²·d) work: 0.5 GFLOP per head at 85,680 tokens."""
    pq, pk, pv = (block_means(t, block) for t in (q, k, v))
    weights = torch.softmax(pq @ pk.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return weights @ pv


def pooled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int = GATE_BLOCK) -> torch.Tensor:
    """`pooled_attention_blocks` with each block's row copied to its tokens: [B, H, N, d] float32."""
    return pooled_attention_blocks(q, k, v, block).repeat_interleave(block, dim=2)[:, :, :q.shape[2]]


def add_gated_pooled(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     gate: torch.Tensor) -> torch.Tensor:
    """out + g ⊙ pooled(q, k, v) for out, q, k, v [B, H, N, d] and g [B, N] (one value per token, all heads),
    added in out's dtype (the authors add in bf16 too); the pooled rows are computed in float32."""
    per_token = pooled_attention_blocks(q, k, v).to(out.dtype).repeat_interleave(GATE_BLOCK, dim=2)
    return torch.addcmul(out, gate[:, None, :, None].to(out.dtype), per_token[:, :, :out.shape[2]])


# ----------------------------------------------------------------------------------------- long-video windows

def clip_windows(frames: int, clip: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) latent-frame windows of length min(clip, frames) covering 0..frames, consecutive ones
    sharing at least `overlap` frames; the last window ends at `frames` (so all windows are full length)."""
    if clip < 1:
        raise LongEditError(f"clip_frames must be at least 1 latent frame (got {clip}).", "use 21 (81 frames).")
    if frames <= clip:
        return [(0, frames)]
    if not 0 <= overlap < clip:
        raise LongEditError(f"overlap ({overlap}) must be smaller than clip_frames ({clip}).",
                            "use an overlap of about a quarter of clip_frames.")
    stride = clip - overlap
    starts = list(range(0, frames - clip, stride)) + [frames - clip]
    return [(s, s + clip) for s in starts]


def window_weights(windows: list[tuple[int, int]], frames: int) -> list[torch.Tensor]:
    """Per window, float64 [end - start] blend weights: in each overlap the earlier window fades out linearly
    while the later fades in (weights in (0, 1), away from the ends), elsewhere 1; they sum to 1 per frame."""
    raw = []
    for i, (start, end) in enumerate(windows):
        w = torch.ones(end - start, dtype=torch.float64)
        if i > 0:  # ramp up over the overlap with the previous window
            left = windows[i - 1][1] - start
            w[:left] = torch.arange(1, left + 1, dtype=torch.float64) / (left + 1)
        if i + 1 < len(windows):  # ramp down over the overlap with the next window
            right = end - windows[i + 1][0]
            w[end - start - right:] = torch.minimum(
                w[end - start - right:], torch.arange(right, 0, -1, dtype=torch.float64) / (right + 1))
        raw.append(w)
    total = torch.zeros(frames, dtype=torch.float64)
    for (start, end), w in zip(windows, raw):
        total[start:end] += w
    return [w / total[start:end] for (start, end), w in zip(windows, raw)]


def denoise_in_windows(predict: Callable[[int, int], torch.Tensor], target_shape: tuple, clip: int,
                       overlap: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """One model prediction for a [B, C, T, H, W] latent as the blend of predict(start, end) over the
    windows (each returning [B, C, end - start, H, W])."""
    frames = target_shape[2]
    windows = clip_windows(frames, clip, overlap)
    if len(windows) == 1:
        return predict(0, frames)
    out = None
    for (start, end), w in zip(windows, window_weights(windows, frames)):
        part = predict(start, end)
        if out is None:
            out = torch.zeros(target_shape, dtype=dtype, device=device if device is not None else part.device)
        out[:, :, start:end] += part.to(out.dtype) * w.to(out)[None, None, :, None, None]
    return out


# --------------------------------------------------------------------------------------- frame counts (Wan VAE)

def wan_frame_count(frames: int) -> int:
    """The smallest 4k + 1 >= frames: the Wan VAE keeps 1 + 4k frames (first frame alone, then groups of 4)."""
    if frames < 1:
        raise LongEditError("The video has no frames.", "check the Load Video selection.")
    return 1 + 4 * math.ceil((frames - 1) / 4)


def pad_frames(images: torch.Tensor, frames: int) -> torch.Tensor:
    """IMAGE [N, H, W, C] -> [frames, H, W, C], repeating the last frame (frames >= N)."""
    extra = frames - images.shape[0]
    if extra <= 0:
        return images
    return torch.cat([images, images[-1:].expand(extra, *images.shape[1:])])
