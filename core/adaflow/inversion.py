"""DDIM inversion as the authors' code does it, in the sampler's sigma space, the trajectory kept on disk.

ComfyUI samples in the variance-exploding parameterisation x = x_vp / sqrt(alpha_bar), sigma^2 =
(1 - alpha_bar) / alpha_bar, where its deterministic DDIM is the Euler step x' = x + (sigma' - sigma) * eps and
the UNet sees x * c_in(sigma) = x_vp. The reference inversion (TokenFlow's and AdaFlow's preprocess.py)
walks the alpha_bar grid upwards from the clean latent, which it treats as sitting at alpha_bar(t=0)
(SD: sigma ~ 0.029, not 0), and at each step evaluates eps at the NEXT timestep on the PREVIOUS latent as it
is (VP scale):

    eps = eps_theta(x_vp_prev, t_next);  x0_hat = (x_vp_prev - sqrt(1 - a_prev) eps) / sqrt(a_prev)
    x_vp_next = sqrt(a_next) x0_hat + sqrt(1 - a_next) eps

In sampler space that is x_next = x_prev + (sigma_next - sigma_prev) * eps with eps = the model's estimate at
sigma_next for the sampler-space latent x_prev * sqrt((1 + sigma_next^2) / (1 + sigma_prev^2)) (that latent
times c_in(sigma_next) is x_vp_prev), starting from x0 * sqrt(1 + sigma_clean^2).

The inversion runs on its own, finer grid (the reference: 100 steps) which contains every sigma of the
sampler's schedule; the latents at the sampler's sigmas are kept, so that the editing pass runs the
unedited "source" branch at exactly the latent the sampler will see. The trajectory is float16
[steps + 1, frames, c, h, w] in the sampler's schedule order (index 0: its largest sigma; index `steps`:
sigma 0, the clean latents), memory-mapped when large. The sampler starts, as the reference does, from
add_noise(x0, eps_top, t_first), eps_top being the noise that takes x0 to the top of the inversion grid.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from ..errors import LongEditError
from ..run_plan import free_disk

ON_DISK_BYTES = 256 * 2**20

EpsFn = Callable[[torch.Tensor, float], torch.Tensor]  # (x [b, c, h, w], sigma) -> eps_hat


@dataclass
class Inversion:
    """The LONGEDIT_INVERSION object: schedule, trajectory and the source conditioning it was made with."""

    sigmas: np.ndarray  # float64 [steps + 1], the sampler's schedule: descending, last is 0
    trajectory: np.ndarray = field(repr=False)  # float16 [steps + 1, frames, c, h, w]
    source_context: torch.Tensor = field(repr=False)  # [1, tokens, dim]: the conditioning of the source branch
    path: str | None = None
    start: np.ndarray | None = field(default=None, repr=False)  # float16 [frames, c, h, w]; None: trajectory[0]
    grid: np.ndarray | None = field(default=None, repr=False)  # float64: the ascending sigmas it walked

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

    def start_latents(self, frames: np.ndarray | slice | None = None) -> torch.Tensor:
        """float32 latents (sampler space) to sample from: add_noise(x0, eps_top, sigmas[0])."""
        source = self.trajectory[0] if self.start is None else self.start
        data = source if frames is None else source[frames]
        return torch.from_numpy(np.ascontiguousarray(data)).float()


def new_trajectory(shape: tuple[int, ...], folder: str | None,
                   name: str = "trajectory.npy") -> tuple[np.ndarray, str | None]:
    nbytes = int(np.prod(shape)) * 2
    if folder is None or nbytes <= ON_DISK_BYTES:
        return np.zeros(shape, dtype=np.float16), None
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape), path


def inversion_grid(sampler_sigmas: np.ndarray, inversion_sigmas: np.ndarray, clean_sigma: float) -> np.ndarray:
    """The ascending sigmas the inversion walks: `clean_sigma` (where the clean latent is taken to sit; the
    reference: sigma at t=0), then every sigma of `inversion_sigmas` (the finer schedule, e.g. 100 steps)
    and of `sampler_sigmas` above it, merged, so that every latent the sampler asks for is visited."""
    merged = np.concatenate([np.asarray(sampler_sigmas, np.float64), np.asarray(inversion_sigmas, np.float64)])
    merged = np.unique(merged[merged > clean_sigma * (1 + 1e-6)])
    keep = np.append(True, np.diff(merged) > 1e-6 * merged[1:])  # one entry per sigma shared by both
    return np.append(float(clean_sigma), merged[keep])


def kept_indices(sigmas: np.ndarray, grid: np.ndarray) -> list[int]:
    """For each nonzero sampler sigma, its index in the grid; a sigma the grid lacks is an error."""
    out = []
    for sigma in sigmas[:-1]:
        j = int(np.argmin(np.abs(grid - sigma)))
        if abs(grid[j] - sigma) > 1e-5 * max(1.0, sigma):
            raise LongEditError(f"The sampler's sigma {sigma:.5f} is not on the inversion grid.",
                                "build the grid with inversion_grid(), which merges the sampler's sigmas in.")
        out.append(j)
    return out


def check_disk(folder: str, nbytes: int) -> None:
    free = free_disk(folder)
    if nbytes > free * 0.95:
        raise LongEditError(
            f"The inversion trajectory needs {nbytes / 2**30:.1f} GiB in {folder}, where {free / 2**30:.1f} GiB "
            f"are free.", "free disk space, use fewer steps or frames, or point ComfyUI's --temp-directory "
            "at a larger disk.")


@dataclass(frozen=True)
class InversionWalk:
    """The walk every frame takes (frames are independent): up `grid` from the clean latent, keeping the latents
    at the grid indices `kept` (grid index -> trajectory row) for a sampler whose first sigma is `sigma_first`.
    Picklable, so that other processes (Ray actors) can walk their own frames."""

    grid: np.ndarray
    kept: dict
    steps: int
    sigma_first: float

    @torch.no_grad()
    def frames(self, x0: torch.Tensor, eps: EpsFn, on_step: Callable[[int], None] | None = None,
               into: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Clean sampler-space latents x0 [n, c, h, w] (on the model's device) -> (their trajectory rows
        [steps + 1, n, c, h, w], their sampler start latents [n, c, h, w]), float16, written into `into` when
        given (views of the whole trajectory: no second copy). `on_step(n)` after each step of the walk."""
        grid = self.grid
        rows, start = into if into is not None else (np.empty((self.steps + 1, *x0.shape), dtype=np.float16),
                                                     np.empty(tuple(x0.shape), dtype=np.float16))
        rows[self.steps] = x0.cpu().numpy()
        x = x0 * float(np.sqrt(1 + grid[0] ** 2))  # the clean latent as a VP latent at grid[0]
        for j in range(len(grid)):
            if j > 0:
                prev, nxt = float(grid[j - 1]), float(grid[j])
                # the sampler-space latent at sigma_next whose VP latent (what the UNet sees) is x_prev's
                x_same_vp = x * float(np.sqrt((1 + nxt ** 2) / (1 + prev ** 2)))
                x = x + (nxt - prev) * eps(x_same_vp, nxt).float().to(x.device)
                if on_step is not None:
                    on_step(len(x))
            if j in self.kept:
                rows[self.kept[j]] = x.cpu().numpy()
        # add_noise(x0, eps_top, t_first) in sampler space, eps_top = (x_top - x0) / sigma_top
        start[...] = (x0 + (self.sigma_first / float(grid[-1])) * (x - x0)).cpu().numpy()
        return rows, start


# (walk, frame chunks, chunk k -> its clean latents) -> (k, (trajectory rows, start)) once per chunk, in any order
SpreadInversion = Callable[[InversionWalk, list, Callable[[int], torch.Tensor]], Iterator[tuple[int, tuple]]]


@torch.no_grad()
def ddim_invert(latents: torch.Tensor, sigmas: np.ndarray, eps: EpsFn, frames_per_chunk: int,
                folder: str | None = None, source_context: torch.Tensor | None = None,
                on_progress: Callable[[int], None] | None = None,
                device: torch.device | str | None = None, grid: np.ndarray | None = None,
                spread: SpreadInversion | None = None) -> Inversion:
    """Invert clean sampler-space latents [N, c, h, w] along `grid`, keeping the latents at `sigmas`.

    `sigmas`: the sampler's schedule (descending, ending at 0). `grid`: the ascending sigmas to invert along
    (see inversion_grid; grid[0] is where the clean latent sits, the reference's sigma at t=0); by default
    the sampler's own sigmas above a clean latent at sigma 0. `eps(x, sigma)` returns the model's noise
    estimate for sampler-space latents `x` at `sigma`. Frames are processed `frames_per_chunk` at a time
    through all steps, on `device` (the model's; default: where the latents are); `on_progress(done)`
    counts frame-steps. `spread`: the chunks are inverted elsewhere (Ray actors), each written as it comes back.
    """
    sigmas = np.asarray(sigmas, dtype=np.float64)
    if sigmas.ndim != 1 or len(sigmas) < 2 or sigmas[-1] != 0 or np.any(np.diff(sigmas) >= 0):
        raise LongEditError("The sigma schedule must be descending and end at 0.", "use a standard scheduler.")
    grid = np.append(0.0, sigmas[-2::-1]) if grid is None else np.asarray(grid, dtype=np.float64)
    if grid.ndim != 1 or len(grid) < 2 or grid[0] < 0 or np.any(np.diff(grid) <= 0):
        raise LongEditError("The inversion grid must be ascending sigmas from the clean latent's.",
                            "build it with inversion_grid().")
    steps = len(sigmas) - 1
    walk = InversionWalk(grid=grid, kept=dict(zip(kept_indices(sigmas, grid), range(steps))), steps=steps,
                         sigma_first=float(sigmas[0]))
    shape = (steps + 1, *latents.shape)
    if folder is not None:
        check_disk(folder, int(np.prod(shape)) * 2 + int(np.prod(latents.shape)) * 2)
    trajectory, path = new_trajectory(shape, folder)
    start, _ = new_trajectory(tuple(latents.shape), folder, "start.npy")
    chunks = [slice(i0, min(i0 + frames_per_chunk, len(latents))) for i0 in range(0, len(latents), frames_per_chunk)]
    done = 0

    def count(frames: int) -> None:
        nonlocal done
        done += frames
        if on_progress is not None:
            on_progress(done)

    if spread is None:
        for rows in chunks:
            walk.frames(latents[rows].float().to(device or latents.device), eps, count,
                        into=(trajectory[:, rows], start[rows]))
    else:
        for k, (rows, first) in spread(walk, chunks, lambda k: latents[chunks[k]].float()):
            trajectory[:, chunks[k]] = rows
            start[chunks[k]] = first
            count(len(first) * (len(grid) - 1))
    for array in (trajectory, start):
        if isinstance(array, np.memmap):
            array.flush()
    context = source_context if source_context is not None else torch.zeros(1, 1, 1)
    return Inversion(sigmas=sigmas, trajectory=trajectory, start=start, grid=grid, source_context=context.cpu(),
                     path=path)


@torch.no_grad()
def ddim_sample(x: torch.Tensor, sigmas: np.ndarray, eps: EpsFn) -> torch.Tensor:
    """Deterministic DDIM (Euler in sigma space) from sigmas[0] down to 0: what KSampler's 'ddim' does."""
    for i in range(len(sigmas) - 1):
        x = x + (float(sigmas[i + 1]) - float(sigmas[i])) * eps(x, float(sigmas[i])).float()
    return x
