"""DDIM inversion in the sampler's sigma space, with the whole trajectory kept on disk.

ComfyUI samples in the variance-exploding parameterisation x_sigma = x0 + sigma * eps, where deterministic
DDIM is the Euler step x' = x + (sigma' - sigma) * eps_hat(x, sigma). Inversion walks the same sigmas
upwards, estimating eps at the next (noisier) sigma from the current latent, as DDIM inversion does
(Song et al.; TokenFlow's preprocess). The latent at every sigma of the schedule is stored, so that the
editing pass can run the unedited "source" branch at exactly the latent the sampler will see.

The trajectory is float16 [steps + 1, frames, c, h, w] in schedule order (index 0: the largest sigma,
the sampler's start; index `steps`: sigma 0, the clean latents), memory-mapped when large.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .errors import LongEditError
from .run_plan import free_disk

ON_DISK_BYTES = 256 * 2**20

EpsFn = Callable[[torch.Tensor, float], torch.Tensor]  # (x [b, c, h, w], sigma) -> eps_hat


@dataclass
class Inversion:
    """The LONGEDIT_INVERSION object: schedule, trajectory and the source conditioning it was made with."""

    sigmas: np.ndarray  # float64 [steps + 1], descending, last is 0
    trajectory: np.ndarray = field(repr=False)  # float16 [steps + 1, frames, c, h, w]
    source_context: torch.Tensor = field(repr=False)  # [1, tokens, dim]: the conditioning of the source branch
    path: str | None = None

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def frame_count(self) -> int:
        return self.trajectory.shape[1]

    def step_of(self, sigma: float) -> int:
        """Index of `sigma` in the schedule; a sigma the inversion never visited is an error, not a blur."""
        i = int(np.argmin(np.abs(self.sigmas - sigma)))
        if abs(self.sigmas[i] - sigma) > 1e-4 * max(1.0, abs(sigma)):
            raise LongEditError(
                f"The sampler asked for sigma {sigma:.5f}, which is not in the inversion's schedule "
                f"({self.steps} steps, sigmas {self.sigmas[0]:.4f} .. {self.sigmas[-2]:.4f}, 0).",
                "sample with the same steps and scheduler as AdaFlow Invert, starting at step 0, with noise "
                "disabled (KSamplerAdvanced: add_noise disable, start_at_step 0).")
        return i

    def latents_at(self, step: int, frames: np.ndarray | slice | None = None) -> torch.Tensor:
        """float32 latents (sampler space) of the source at schedule index `step` for `frames`."""
        data = self.trajectory[step] if frames is None else self.trajectory[step][frames]
        return torch.from_numpy(np.ascontiguousarray(data)).float()


def new_trajectory(shape: tuple[int, ...], folder: str | None) -> tuple[np.ndarray, str | None]:
    nbytes = int(np.prod(shape)) * 2
    if folder is None or nbytes <= ON_DISK_BYTES:
        return np.zeros(shape, dtype=np.float16), None
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "trajectory.npy")
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape), path


def check_disk(folder: str, nbytes: int) -> None:
    free = free_disk(folder)
    if nbytes > free * 0.95:
        raise LongEditError(
            f"The inversion trajectory needs {nbytes / 2**30:.1f} GiB in {folder}, where {free / 2**30:.1f} GiB "
            f"are free.", "free disk space, use fewer steps or frames, or point ComfyUI's --temp-directory "
            "at a larger disk.")


@torch.no_grad()
def ddim_invert(latents: torch.Tensor, sigmas: np.ndarray, eps: EpsFn, frames_per_chunk: int,
                folder: str | None = None, source_context: torch.Tensor | None = None,
                on_progress: Callable[[int], None] | None = None,
                device: torch.device | str | None = None) -> Inversion:
    """Invert clean sampler-space latents [N, c, h, w] along `sigmas` (descending, ending at 0).

    `eps(x, sigma)` returns the model's noise estimate. Frames are processed `frames_per_chunk` at a time
    through all steps, on `device` (the model's; default: where the latents are); `on_progress(done)`
    counts frame-steps.
    """
    sigmas = np.asarray(sigmas, dtype=np.float64)
    if sigmas.ndim != 1 or len(sigmas) < 2 or sigmas[-1] != 0 or np.any(np.diff(sigmas) >= 0):
        raise LongEditError("The sigma schedule must be descending and end at 0.", "use a standard scheduler.")
    steps = len(sigmas) - 1
    shape = (steps + 1, *latents.shape)
    if folder is not None:
        check_disk(folder, int(np.prod(shape)) * 2)
    trajectory, path = new_trajectory(shape, folder)
    done = 0
    for i0 in range(0, latents.shape[0], frames_per_chunk):
        x = latents[i0:i0 + frames_per_chunk].float().to(device or latents.device)
        trajectory[steps, i0:i0 + len(x)] = x.cpu().numpy()
        for i in range(steps, 0, -1):  # sigma_i -> sigma_{i-1}, upwards
            sigma_next = float(sigmas[i - 1])
            x = x + (sigma_next - float(sigmas[i])) * eps(x, sigma_next).float().to(x.device)
            trajectory[i - 1, i0:i0 + len(x)] = x.cpu().numpy()
            done += len(x)
            if on_progress is not None:
                on_progress(done)
    if isinstance(trajectory, np.memmap):
        trajectory.flush()
    context = source_context if source_context is not None else torch.zeros(1, 1, 1)
    return Inversion(sigmas=sigmas, trajectory=trajectory, source_context=context.cpu(), path=path)


@torch.no_grad()
def ddim_sample(x: torch.Tensor, sigmas: np.ndarray, eps: EpsFn) -> torch.Tensor:
    """Deterministic DDIM (Euler in sigma space) from sigmas[0] down to 0: what KSampler's 'ddim' does."""
    for i in range(len(sigmas) - 1):
        x = x + (float(sigmas[i + 1]) - float(sigmas[i])) * eps(x, float(sigmas[i])).float()
    return x
