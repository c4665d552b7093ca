"""DIFT features (Tang et al. 2023): decoder features of the diffusion model on lightly noised latents.

The host supplies `featurize(x0, noise) -> [b, C, h, w]`, which noises the clean latents `x0` to the chosen
timestep with `noise` and runs the denoiser up to the feature block with an empty prompt. This module
only schedules it: frames in chunks, each frame seen under the same `ensemble` noise draws (so that the
average is comparable across frames), averaged, returned as float16 where the featurizer computed them
(so a GPU pipeline does not round-trip features through the host).
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

Featurize = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ensemble_noise(latent_shape: tuple[int, ...], ensemble: int, seed: int) -> torch.Tensor:
    """[ensemble, c, h, w] noise, shared by every frame."""
    return torch.randn((ensemble, *latent_shape), generator=torch.Generator().manual_seed(seed))


def dift_feature_chunks(latents: torch.Tensor, featurize: Featurize, ensemble: int, seed: int,
                        frames_per_chunk: int) -> Iterator[torch.Tensor]:
    """Yield float16 feature maps [n, C, h, w] for consecutive chunks of `latents` [N, c, h, w], on the
    featurizer's device."""
    if ensemble < 1 or frames_per_chunk < 1:
        raise ValueError("ensemble and frames_per_chunk must be at least 1")
    noise = ensemble_noise(tuple(latents.shape[1:]), ensemble, seed)
    for i in range(0, latents.shape[0], frames_per_chunk):
        x0 = latents[i:i + frames_per_chunk]
        n = x0.shape[0]
        features = featurize(x0.repeat_interleave(ensemble, dim=0), noise.repeat(n, 1, 1, 1))
        yield features.view(n, ensemble, *features.shape[1:]).float().mean(dim=1).half()
