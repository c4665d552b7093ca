"""AdaFlow's Adaptive Keyframe Selection (AKS) and the correspondences that carry an edit to every frame.

Input: DIFT feature maps of every frame, streamed in frame order. Output: a `KeyframePlan`:
- clips: a new clip starts where the frame's features drift from the clip's first frame (AdaFlow's rule:
  the map of each first-frame token's best cosine match in the frame has mean < tau_mean, or some window
  mean < tau_region), or where the clip reaches its maximum length;
- a few keyframe candidates per clip, spread over it, and a deterministic rotation choosing one per step;
- nearest-neighbour correspondences from every frame to each candidate of its clip, at every attention
  resolution of the UNet, as int32 (frames x candidates x tokens: linear in frames; on disk when large);
- for Adaptive Attention Slimming, the DIFT score of every candidate's tokens as seen from every other
  candidate (how well each token matches anything in the query keyframe), from which each step ranks the
  K/V tokens it keeps.

Differences from the reference code (jidantang55/AdaFlow), on purpose: every clip's reference frame is its
own first frame (the code compares a new clip with its second frame), and matches are stored per candidate
instead of for every pair of frames of a clip (int64 B x B x tokens), which is what bounds memory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ...kernels import find_nearest
from ..errors import LongEditError

ON_DISK_BYTES = 256 * 2**20  # arrays larger than this are memory-mapped files
MATCH_FRAMES = 16  # frames matched at once against a clip's candidates (bounds the device memory)
AAS_LEVEL = 1  # scores for slimming are computed at the second attention level (24x42 for 384x672)


@dataclass(frozen=True)
class AksParams:
    tau_mean: float = 0.75
    tau_region: float = 0.6
    max_clip_length: int = 400
    candidates_per_clip: int = 3
    seed: int = 0


def attention_levels(latent_h: int, latent_w: int, count: int = 4) -> list[tuple[int, int]]:
    """Token grids of the UNet's attention levels: the latent grid, then halved (rounding up) each level."""
    levels = [(latent_h, latent_w)]
    for _ in range(count - 1):
        h, w = levels[-1]
        levels.append(((h + 1) // 2, (w + 1) // 2))
    return levels


def _tokens(features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[n, C, h, w] -> L2-normalised tokens [n, size_h*size_w, C] at `size` (bilinear, as the reference).

    float16 on CUDA, so that matching runs on the tensor cores (cosines need no more precision than
    DIFT's own fp16 features carry); float32 elsewhere."""
    features = features.float()
    if features.shape[-2:] != size:
        features = F.interpolate(features, size=size, mode="bilinear", align_corners=False)
    tokens = F.normalize(features.flatten(2).transpose(1, 2), dim=-1)
    return tokens.half() if tokens.is_cuda else tokens


def drift_scores(reference: torch.Tensor, frames: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """For each frame: (mean, lowest window mean) of the map of each reference token's best match in it.

    reference [T, C] and frames [n, T, C] are normalised tokens on `grid`. Windows follow the reference
    code: side max(h, w) // 16, stride max(h, w) // 32 (at least 1).
    """
    n = frames.shape[0]
    _, best = find_nearest(reference.expand(n, -1, -1).contiguous(), frames)
    maps = best.view(n, 1, *grid)
    side = max(1, max(grid) // 16)
    stride = max(1, max(grid) // 32)
    windows = F.avg_pool2d(maps, side, stride)
    return maps.mean(dim=(1, 2, 3)), windows.amin(dim=(1, 2, 3))


def spread_candidates(start: int, stop: int, count: int) -> np.ndarray:
    """`count` frames spread evenly over [start, stop): the centres of equal parts of the clip."""
    length = stop - start
    count = max(1, min(count, length))
    return start + (np.arange(count) * 2 + 1) * length // (2 * count)


def new_array(shape: tuple[int, ...], dtype, folder: str | None, name: str) -> np.ndarray:
    """A zeroed numpy array, memory-mapped as `folder`/`name`.npy when larger than ON_DISK_BYTES."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if folder is None or nbytes <= ON_DISK_BYTES:
        return np.zeros(shape, dtype=dtype)
    os.makedirs(folder, exist_ok=True)
    return np.lib.format.open_memmap(os.path.join(folder, f"{name}.npy"), mode="w+", dtype=dtype, shape=shape)


@dataclass
class KeyframePlan:
    """The LONGEDIT_KEYFRAMES object: clips, candidates, per-step choice, correspondences, AAS scores."""

    frame_count: int
    latent_size: tuple[int, int]
    levels: list[tuple[int, int]]
    clip_starts: np.ndarray  # [clips + 1], the last entry is frame_count
    candidates: np.ndarray  # [clips, per_clip] absolute frame indices (a short clip repeats its last)
    matches: list[np.ndarray]  # per level: int32 [frames, per_clip, tokens] index into the candidate's tokens
    aas_scores: np.ndarray  # float16 [clips*per_clip, clips*per_clip, tokens at AAS_LEVEL]
    fingerprint: np.ndarray = field(repr=False)  # float32 [frames, channels]: per-frame latent means
    params: AksParams = AksParams()
    folder: str | None = None

    @property
    def clip_count(self) -> int:
        return len(self.clip_starts) - 1

    @property
    def per_clip(self) -> int:
        return self.candidates.shape[1]

    def clip_of(self, frames: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.clip_starts, frames, side="right") - 1

    def choice(self, step: int) -> np.ndarray:
        """Candidate slot of every clip at sampling step `step`: a rotation with a seeded offset per clip,
        so that over the steps every candidate serves as keyframe and each step is reproducible."""
        offsets = np.random.default_rng(self.params.seed).integers(0, self.per_clip, size=self.clip_count)
        return (offsets + step) % self.per_clip

    def keyframes(self, step: int) -> np.ndarray:
        """Absolute frame index of each clip's keyframe at `step`."""
        return self.candidates[np.arange(self.clip_count), self.choice(step)]

    def stored_bytes(self) -> int:
        return sum(m.nbytes for m in self.matches) + self.aas_scores.nbytes + self.fingerprint.nbytes

    def check_latents(self, latents: torch.Tensor) -> None:
        """Refuse latents that are not the frames, in the order, this plan was built from."""
        if latents.shape[0] != self.frame_count or tuple(latents.shape[-2:]) != self.latent_size:
            raise LongEditError(
                f"The latents ({latents.shape[0]} frames of {tuple(latents.shape[-2:])}) do not match the keyframe "
                f"plan ({self.frame_count} frames of {self.latent_size}).",
                "build the keyframe selection from the same video latents (same frames, same size).")
        got = latent_fingerprint(latents)
        tolerance = 1e-2 * (np.abs(self.fingerprint).max() + 1e-6)
        bad = np.nonzero(np.abs(got - self.fingerprint).max(axis=1) > tolerance)[0]
        if len(bad):
            raise LongEditError(
                f"The latents differ from the frames the keyframe plan was built from, first at frame {bad[0]} "
                f"({len(bad)} frames differ): frames were reordered, dropped or replaced.",
                "connect the same latents to Keyframe Selection and to the editing nodes.")


def latent_fingerprint(latents: torch.Tensor) -> np.ndarray:
    return latents.float().mean(dim=(-2, -1)).cpu().numpy().astype(np.float32)


class _ClipBuilder:
    """Collects the current clip's features; on close, writes its candidates' matches into the plan."""

    def __init__(self, plan_arrays: dict, levels, params: AksParams, device):
        self.arrays = plan_arrays
        self.levels = levels
        self.params = params
        self.device = device
        self.start = 0
        self.features: list[torch.Tensor] = []  # [C, h, w] each, on the host
        self.reference: torch.Tensor | None = None  # normalised tokens [T, C] on the device
        self.clip_starts = [0]
        self.candidates: list[np.ndarray] = []
        self.aas_tokens: list[torch.Tensor] = []  # candidate tokens at AAS_LEVEL, host

    def length(self) -> int:
        return len(self.features)

    def begin(self, start: int, first: torch.Tensor) -> None:
        self.start = start
        self.features = [first]
        self.reference = _tokens(first[None].to(self.device), self.levels[0])[0]

    def close(self) -> None:
        stop = self.start + len(self.features)
        chosen = spread_candidates(self.start, stop, self.params.candidates_per_clip)
        slots = np.concatenate([chosen, np.repeat(chosen[-1:], self.params.candidates_per_clip - len(chosen))])
        self.candidates.append(slots)
        cand = torch.stack([self.features[i] for i in slots - self.start]).to(self.device)
        cand_tokens = [_tokens(cand, size) for size in self.levels]  # per level [P, T, C]
        self.aas_tokens.extend(cand_tokens[AAS_LEVEL].cpu().half())
        p = len(slots)
        # The clip's features stay on the host; a few frames at a time go to the device (once for all
        # levels), so device memory does not grow with the clip length.
        for i0 in range(0, len(self.features), MATCH_FRAMES):
            group = torch.stack(self.features[i0:i0 + MATCH_FRAMES]).to(self.device)
            for level, size in enumerate(self.levels):
                frame_tokens = _tokens(group, size)
                n, t, c = frame_tokens.shape
                query = frame_tokens[:, None].expand(n, p, t, c).reshape(n * p, t, c)
                keys = cand_tokens[level][None].expand(n, p, *cand_tokens[level].shape[1:]).reshape(n * p, -1, c)
                index, _ = find_nearest(query, keys)
                self.arrays["matches"][level][self.start + i0:self.start + i0 + n] = index.view(n, p, t).cpu().numpy()
        self.clip_starts.append(stop)
        self.features = []


def _aas_scores(tokens: list[torch.Tensor], out: np.ndarray, device) -> None:
    """out[a, b, j] = best cosine match of candidate b's token j among candidate a's tokens."""
    stacked = torch.stack(tokens).to(device)  # [P, T, C]
    if not stacked.is_cuda:
        stacked = stacked.float()
    for a in range(len(tokens)):
        query_frame = stacked[a]
        for b0 in range(0, len(tokens), 64):
            keys = stacked[b0:b0 + 64]
            _, best = find_nearest(keys, query_frame[None].expand(keys.shape[0], -1, -1).contiguous())
            out[a, b0:b0 + keys.shape[0]] = best.half().cpu().numpy()


@torch.no_grad()
def select_keyframes(feature_chunks: Iterable[torch.Tensor], latents: torch.Tensor, params: AksParams = AksParams(),
                     folder: str | None = None, device: torch.device | str = "cpu",
                     on_frames: Callable[[int], None] | None = None) -> KeyframePlan:
    """Segment the video into clips and build its keyframe plan from DIFT features streamed in frame order.

    feature_chunks: [n, C, h, w] feature maps, frame order, at the latent grid (or any grid: they are
    resized to each attention level). latents [N, c, h, w] are only fingerprinted (and give the grid).
    folder: where large arrays are memory-mapped (None keeps everything in RAM).
    """
    if params.max_clip_length < 1 or params.candidates_per_clip < 1:
        raise LongEditError("max_clip_length and candidates_per_clip must be at least 1.", "raise them.")
    frames = latents.shape[0]
    if frames == 0:
        raise LongEditError("There are no frames to select keyframes from.", "check the video selection.")
    levels = attention_levels(*latents.shape[-2:])
    per_clip = params.candidates_per_clip
    matches = [new_array((frames, per_clip, h * w), np.int32, folder, f"matches_{h}x{w}") for h, w in levels]
    builder = _ClipBuilder({"matches": matches}, levels, params, device)
    seen = 0
    for chunk in feature_chunks:
        host = chunk.cpu()  # the clip builder keeps features on the host (one transfer per chunk)
        i = 0
        if seen == 0:
            builder.begin(0, host[0])
            i = 1
        while i < len(chunk):
            # Score the rest of the chunk against the current clip's first frame, up to the next cut.
            mean, lowest = drift_scores(builder.reference, _tokens(chunk[i:].to(device), levels[0]), levels[0])
            for j in range(len(mean)):
                frame = host[i + j]
                drifted = bool(mean[j] < params.tau_mean or lowest[j] < params.tau_region)
                if drifted or builder.length() >= params.max_clip_length:
                    builder.close()
                    builder.begin(seen + i + j, frame)
                    i += j + 1
                    break
                builder.features.append(frame)
            else:
                i = len(chunk)
        seen += len(chunk)
        if on_frames is not None:
            on_frames(seen)
    if seen != frames:
        raise LongEditError(f"Features came for {seen} frames but there are {frames} latents.",
                            "this is a bug in the feature extractor; please report it.")
    builder.close()
    count = len(builder.aas_tokens)
    scores = new_array((count, count, builder.aas_tokens[0].shape[0]), np.float16, folder, "aas_scores")
    _aas_scores(builder.aas_tokens, scores, device)
    return KeyframePlan(
        frame_count=frames, latent_size=tuple(latents.shape[-2:]), levels=levels,
        clip_starts=np.asarray(builder.clip_starts, dtype=np.int64), candidates=np.stack(builder.candidates),
        matches=matches, aas_scores=scores, fingerprint=latent_fingerprint(latents), params=params, folder=folder)


def reference_all_pairs_bytes(clip_lengths: Iterable[int], levels: list[tuple[int, int]]) -> int:
    """Bytes the reference code stores: per clip and level, int64 [B, B * tokens]."""
    tokens = sum(h * w for h, w in levels)
    return sum(8 * b * b * tokens for b in clip_lengths)


def chunks_of(features: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for i in range(0, features.shape[0], size):
        yield features[i:i + size]
