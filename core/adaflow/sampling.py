"""The sampler's Euler/DDIM loop over a long video, one pass of frames at a time.

A sampler holds its state as full-batch tensors: ComfyUI's holds ~16 float32 copies of all latents at its
peak (state, noise, denoised, d, per-branch inputs and outputs, the CFG result), 1 MB per 384x672 frame,
100 GB for 100,000 frames. Euler (ComfyUI's "euler" and "ddim", AdaFlow's deterministic DDIM) updates every
frame from its own denoised estimate only:

    d = (x - denoised) / sigma;   x <- x + d * (sigma_next - sigma)

so a step may be taken pass by pass: the step's keyframes first (the keyframe pass, which records what
propagation reads), then chunks of the other frames, each updated in place in the one state tensor as soon
as its denoised estimate is known. The arithmetic per element is the sampler's own, in the same order, so
the result is the full-batch sampler's, bit for bit, given the same denoised estimates.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch

# (frame indices, their current latents, sigma as a [n] tensor) -> denoised latents of those frames
Denoise = Callable[[np.ndarray, torch.Tensor, torch.Tensor], torch.Tensor]
# (step, frame indices of the step's first pass, their denoised latents, their latents before the step)
StepDone = Callable[[int, np.ndarray, torch.Tensor, torch.Tensor], None]
# (step, groups, group k -> (its current latents, sigmas)) -> (k, denoised) once per group, in any order
Spread = Callable[[int, list, Callable[[int], tuple]], Iterator[tuple]]


def passes_of_step(frames: int, keyframes: np.ndarray, chunk: int) -> Iterator[np.ndarray]:
    """The step's keyframes (one pass: they attend to each other), then the other frames in ascending chunks."""
    keyframes = np.asarray(keyframes)
    yield keyframes
    others = np.setdiff1d(np.arange(frames), keyframes)
    for i0 in range(0, len(others), max(1, int(chunk))):
        yield others[i0:i0 + max(1, int(chunk))]


def euler_update(x: torch.Tensor, group: np.ndarray, denoised: torch.Tensor, sigma, dt) -> torch.Tensor:
    """One Euler step of the frames `group` of the state `x`, in place (the sampler's arithmetic); returns
    the denoised estimate on x's device and dtype."""
    index = torch.as_tensor(group, dtype=torch.long)
    current = x.index_select(0, index)
    denoised = denoised.to(x.device, x.dtype)
    d = (current - denoised) / sigma
    x.index_copy_(0, index, current + d * dt)
    return denoised


@torch.no_grad()
def euler_by_passes(x: torch.Tensor, sigmas: torch.Tensor, denoise: Denoise,
                    passes: Callable[[int], Iterator[np.ndarray]], on_pass: Callable[[int, int], None] | None = None,
                    on_step: StepDone | None = None, first_step: int = 0,
                    spread: Spread | None = None) -> torch.Tensor:
    """Euler steps over `sigmas` on the state `x` [F, ...] (updated in place and returned), each step taken
    over the frame groups `passes(step)` yields (they must cover every frame once). `on_pass(step, frames
    done)` runs after each pass (progress, Cancel); `on_step` after each step's passes, with its first pass.
    `first_step`: resume with `x` the state after step first_step - 1. `spread`: where the groups after the
    first are denoised elsewhere (other GPUs), in any order; each is applied as it comes back."""
    frames = x.shape[0]
    for i in range(first_step, len(sigmas) - 1):
        sigma, dt = sigmas[i], sigmas[i + 1] - sigmas[i]
        done, first = 0, None
        groups = iter(passes(i))
        for group in groups:
            current = x.index_select(0, torch.as_tensor(group, dtype=torch.long))
            denoised = denoise(group, current, sigma * current.new_ones([len(group)]))
            denoised = euler_update(x, group, denoised, sigma, dt)
            if first is None:
                first = (group, denoised, current)
            done += len(group)
            if on_pass is not None:
                on_pass(i, done)
            if spread is not None:
                break
        if spread is not None:
            rest = list(groups)

            def inputs(k: int) -> tuple[torch.Tensor, torch.Tensor]:
                current = x.index_select(0, torch.as_tensor(rest[k], dtype=torch.long))
                return current, sigma * current.new_ones([len(rest[k])])

            for k, denoised in spread(i, rest, inputs):
                euler_update(x, rest[k], denoised, sigma, dt)
                done += len(rest[k])
                if on_pass is not None:
                    on_pass(i, done)
        if done != frames:
            raise ValueError(f"the passes of step {i} covered {done} of {frames} frames")
        if on_step is not None:
            on_step(i, *first)
    return x
