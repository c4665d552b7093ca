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


# (frame chunks, chunk k -> (its clean latents, the ensemble noise)) -> (k, features) once per chunk, in any order
SpreadFeatures = Callable[[list, Callable[[int], tuple]], Iterator[tuple[int, torch.Tensor]]]


def dift_feature_chunks(latents: torch.Tensor, featurize: Featurize, ensemble: int, seed: int,
                        frames_per_chunk: int, spread: SpreadFeatures | None = None) -> Iterator[torch.Tensor]:
    """Yield float16 feature maps [n, C, h, w] for consecutive chunks of `latents` [N, c, h, w], on the
    featurizer's device. `spread`: the chunks are computed elsewhere (Ray actors, with `ensemble_features`);
    they are still yielded in frame order."""
    if ensemble < 1 or frames_per_chunk < 1:
        raise ValueError("ensemble and frames_per_chunk must be at least 1")
    noise = ensemble_noise(tuple(latents.shape[1:]), ensemble, seed)
    chunks = [slice(i, i + frames_per_chunk) for i in range(0, latents.shape[0], frames_per_chunk)]
    if spread is None:
        for rows in chunks:
            yield ensemble_features(featurize, latents[rows], noise)
        return
    yield from in_order(spread(chunks, lambda k: (latents[chunks[k]], noise)))


def ensemble_features(featurize: Featurize, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Features of the frames x0 [n, c, h, w], averaged over the ensemble's noise draws [e, c, h, w]: float16."""
    n, ensemble = x0.shape[0], noise.shape[0]
    features = featurize(x0.repeat_interleave(ensemble, dim=0), noise.repeat(n, 1, 1, 1))
    return features.view(n, ensemble, *features.shape[1:]).float().mean(dim=1).half()


def in_order(results: Iterator[tuple[int, torch.Tensor]]) -> Iterator[torch.Tensor]:
    """(k, value) pairs arriving in any order -> the values in order of k (0, 1, ...), each as soon as it can be."""
    waiting, following = {}, 0
    for k, value in results:
        waiting[k] = value
        while following in waiting:
            yield waiting.pop(following)
            following += 1
