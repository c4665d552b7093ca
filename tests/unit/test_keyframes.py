"""AKS on synthetic DIFT-like features with known structure: cuts, shifts, thresholds, order, memory."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from longedit.core.errors import LongEditError
from longedit.core.adaflow.keyframes import (
    AksParams, attention_levels, chunks_of, reference_all_pairs_bytes, select_keyframes, spread_candidates,
)

H, W, C = 16, 24, 32


def texture(seed: int, width: int = W + 64) -> torch.Tensor:
    return torch.randn(C, H, width, generator=torch.Generator().manual_seed(seed))


def scene_video(cuts: list[int], frames: int, noise: float = 0.05, seed: int = 0) -> torch.Tensor:
    """Static scenes (a random feature texture each) with a little per-frame noise; scenes change at `cuts`."""
    g = torch.Generator().manual_seed(seed + 999)
    out = torch.empty(frames, C, H, W)
    scene = 0
    for f in range(frames):
        scene += f in cuts
        out[f] = texture(seed + scene)[:, :, :W] + noise * torch.randn(C, H, W, generator=g)
    return out


def panning_video(frames: int, step: int = 1, seed: int = 5) -> torch.Tensor:
    """One texture seen through a window that moves `step` columns per frame."""
    tex = texture(seed, width=W + frames * step)
    return torch.stack([tex[:, :, f * step:f * step + W] for f in range(frames)])


def latents_for(frames: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(frames, 4, H, W, generator=torch.Generator().manual_seed(seed))


def plan_for(features: torch.Tensor, chunk: int = 7, **params):
    return select_keyframes(chunks_of(features, chunk), latents_for(len(features)), AksParams(**params))


def test_clip_boundaries_fall_exactly_on_scene_cuts():
    cuts = [9, 10, 23, 31]
    plan = plan_for(scene_video(cuts, 40))
    assert plan.clip_starts.tolist() == [0, *cuts, 40]


@pytest.mark.parametrize("chunk", [1, 5, 40])
def test_segmentation_does_not_depend_on_chunking(chunk):
    features = scene_video([6, 17], 30)
    assert plan_for(features, chunk=chunk).clip_starts.tolist() == [0, 6, 17, 30]


def test_max_clip_length_splits_long_scenes():
    plan = plan_for(scene_video([], 25), max_clip_length=10)
    assert plan.clip_starts.tolist() == [0, 10, 20, 25]


@pytest.mark.parametrize("name, values", [
    ("tau_mean", [0.0, 0.3, 0.6, 0.8, 0.9, 0.99]),
    ("tau_region", [0.0, 0.3, 0.6, 0.8, 0.9, 0.99]),
])
def test_stricter_thresholds_never_give_fewer_clips(name, values):
    features = panning_video(30)
    counts = [plan_for(features, **{name: v, "tau_mean" if name == "tau_region" else "tau_region": 0.0}).clip_count
              for v in values]
    assert counts == sorted(counts) and counts[0] == 1 and counts[-1] > counts[0], counts


def test_longer_max_clip_length_never_gives_more_clips():
    features = scene_video([13], 40)
    counts = [plan_for(features, max_clip_length=n).clip_count for n in (1, 3, 8, 20, 400)]
    assert counts == sorted(counts, reverse=True) and counts[0] == 40 and counts[-1] == 2


def test_correspondences_recover_a_known_shift():
    frames = 12
    plan = plan_for(panning_video(frames, step=2), tau_mean=0, tau_region=0, candidates_per_clip=1)
    [[key]] = plan.candidates.tolist()
    for level, (h, w) in enumerate(plan.levels[:2]):
        scale = 2 ** level
        cols = np.arange(w)
        for f in range(frames):
            shift = (f - key) * 2 // scale  # the frame shows the texture `shift` level columns later
            match = plan.matches[level][f, 0].reshape(h, w)
            visible = (cols + shift >= 0) & (cols + shift < w)
            expected = np.broadcast_to(np.arange(h)[:, None] * w + cols[None] + shift, (h, w))
            assert np.array_equal(match[:, visible], expected[:, visible]), (level, f)


def test_candidates_are_spread_and_the_step_choice_rotates_reproducibly():
    assert spread_candidates(0, 9, 3).tolist() == [1, 4, 7]
    assert spread_candidates(10, 12, 3).tolist() == [10, 11]
    plan = plan_for(scene_video([10, 11, 30], 40), seed=3)
    assert plan.candidates[1].tolist() == [10, 10, 10]  # a one-frame clip repeats its only frame
    steps = [plan.keyframes(t) for t in range(6)]
    for clip in range(plan.clip_count):
        lo, hi = plan.clip_starts[clip], plan.clip_starts[clip + 1]
        used = {int(s[clip]) for s in steps}
        assert all(lo <= f < hi for f in used)
        assert used == set(plan.candidates[clip].tolist())  # every candidate serves within per_clip steps
    again = plan_for(scene_video([10, 11, 30], 40), seed=3)
    assert all(np.array_equal(plan.keyframes(t), again.keyframes(t)) for t in range(6))


def test_a_frame_order_permutation_is_caught():
    features = scene_video([12], 24)
    latents = latents_for(24)
    plan = select_keyframes(chunks_of(features, 8), latents)
    plan.check_latents(latents)  # the same frames pass
    swapped = latents.clone()
    swapped[[5, 6]] = swapped[[6, 5]]
    with pytest.raises(LongEditError, match="first at frame 5"):
        plan.check_latents(swapped)
    with pytest.raises(LongEditError, match="do not match the keyframe plan"):
        plan.check_latents(latents[:-1])


def test_aas_scores_rank_a_keyframes_own_tokens_first():
    plan = plan_for(scene_video([8, 16], 24), candidates_per_clip=2)
    scores = plan.aas_scores.astype(np.float32)
    count = scores.shape[0]
    for a in range(count):
        assert np.allclose(scores[a, a], 1.0, atol=1e-2)  # a token's best match in its own frame is itself
        same_scene = [b for b in range(count) if b // 2 == a // 2]
        other = [b for b in range(count) if b // 2 != a // 2]
        assert scores[a, same_scene].mean() > scores[a, other].mean() + 0.3


def test_correspondence_store_grows_linearly_with_frames(tmp_path):
    sizes = {}
    for frames in (500, 5000):
        features = scene_video(list(range(100, frames, 100)), frames).half()
        plan = select_keyframes(chunks_of(features, 256), latents_for(frames), AksParams(),
                                folder=str(tmp_path / str(frames)))
        sizes[frames] = sum(m.nbytes for m in plan.matches)
        assert plan.matches[0].dtype == np.int32
    assert sizes[5000] == 10 * sizes[500]
    tokens = sum(h * w for h, w in attention_levels(H, W))
    assert sizes[500] == 500 * 3 * tokens * 4
    # The reference's all-pairs int64 store for the same 100-frame clips is 100 / 3 * 2 = 67x larger.
    assert reference_all_pairs_bytes([100] * 50, attention_levels(H, W)) > 60 * sizes[5000]
