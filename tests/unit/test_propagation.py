"""AdaFlow latent propagation: non-keyframes take their keyframe's attention output through the matches."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from longedit.core.adaflow.attention import adaflow_self_attention
from longedit.core.adaflow.edit import KeyframeEditor
from longedit.core.errors import LongEditError
from longedit.core.adaflow.inversion import Inversion
from longedit.core.adaflow.keyframes import AksParams, KeyframePlan

FRAMES, H, W = 12, 2, 5  # one attention level of 2 x 5 tokens
STEPS = 3


def make_plan(matches: np.ndarray, clip_starts=(0, 5, 12), candidates=((1, 3), (7, 10))) -> KeyframePlan:
    return KeyframePlan(
        frame_count=FRAMES, latent_size=(H, W), levels=[(H, W)], clip_starts=np.asarray(clip_starts),
        candidates=np.asarray(candidates), matches=[matches.astype(np.int32)],
        aas_scores=np.zeros((4, 4, H * W), np.float16), fingerprint=np.zeros((FRAMES, 4), np.float32),
        params=AksParams(candidates_per_clip=2))


def make_inversion(seed=0) -> Inversion:
    g = np.random.default_rng(seed)
    sigmas = np.array([3.0, 1.0, 0.3, 0.0])
    trajectory = g.standard_normal((STEPS + 1, FRAMES, 4, H, W)).astype(np.float16)
    return Inversion(sigmas=sigmas, trajectory=trajectory, source_context=torch.zeros(1, 1, 1))


def toy_model(x_in, sigma, context, layout):
    """One self-attention layer over the latent pixels as tokens (q = k = v), as the UNet's layers see it."""
    tokens = x_in.flatten(2).transpose(1, 2)
    out = adaflow_self_attention(tokens, tokens, tokens, 1, layout, pnp_layer=False, layer="layer0")
    return out.transpose(1, 2).reshape(x_in.shape)


def edit(plan, chunk_frames=4, propagate=True, branches=2, seed=1):
    editor = KeyframeEditor(make_inversion(), plan, 0.0, 0.0, kv_budget=20, chunk_frames=chunk_frames,
                            propagate=propagate)
    x = torch.randn(branches * FRAMES, 4, H, W, generator=torch.Generator().manual_seed(seed))
    sigma = torch.full((branches * FRAMES,), 1.0)
    context = torch.zeros(branches * FRAMES, 1, 1)
    return editor, editor(toy_model, x, sigma, context, branches).view(branches, FRAMES, 4, H * W)


def identity_matches():
    return np.broadcast_to(np.arange(H * W), (FRAMES, 2, H * W)).copy()


def test_identity_correspondences_reproduce_the_keyframe_outputs():
    plan = make_plan(identity_matches())
    editor, out = edit(plan)
    step = 1
    keyframes = plan.keyframes(step)
    for f in range(FRAMES):
        key = keyframes[plan.clip_of(np.array([f]))[0]]
        assert torch.equal(out[:, f], out[:, key]), f


def test_a_known_shift_reaches_every_frame_exactly_through_the_matches():
    rng = np.random.default_rng(3)
    shifts = rng.integers(-2, 3, size=FRAMES)
    cols = np.arange(H * W) % W
    matches = np.empty((FRAMES, 2, H * W), np.int64)
    for f in range(FRAMES):  # token t of frame f shows what token t + shift (same row) shows in the keyframe
        target = np.clip(cols + shifts[f], 0, W - 1) + (np.arange(H * W) // W) * W
        matches[f] = target
    plan = make_plan(matches)
    _, out = edit(plan)
    keyframes = plan.keyframes(1)
    for f in set(range(FRAMES)) - set(keyframes.tolist()):
        key = keyframes[plan.clip_of(np.array([f]))[0]]
        assert torch.equal(out[:, f], out[:, key][:, :, matches[f, 0]]), f


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_chunked_propagation_equals_one_chunk(chunk):
    rng = np.random.default_rng(5)
    plan = make_plan(rng.integers(0, H * W, size=(FRAMES, 2, H * W)))
    _, whole = edit(plan, chunk_frames=FRAMES)
    _, chunked = edit(plan, chunk_frames=chunk)
    assert torch.equal(whole, chunked)


def test_frame_order_and_count_survive_and_keyframes_are_edited_jointly():
    plan = make_plan(identity_matches())
    editor, out = edit(plan, propagate=False)
    assert out.shape == (2, FRAMES, 4, H * W)
    _, propagated = edit(plan, propagate=True)
    keyframes = plan.keyframes(1)
    assert torch.equal(out[:, keyframes], propagated[:, keyframes])  # the keyframe pass is the same either way
    others = np.setdiff1d(np.arange(FRAMES), keyframes)
    assert not torch.equal(out[:, others], propagated[:, others])


def test_propagation_needs_a_plan():
    with pytest.raises(LongEditError, match="keyframe plan"):
        KeyframeEditor(make_inversion(), None, 0.0, 0.0, 20, propagate=True)


class Cancelled(Exception):
    pass


def test_progress_is_reported_per_chunk_and_cancel_stops_within_one_chunk():
    """The host's progress callback runs after the keyframe pass and after each chunk of other frames; a
    Cancel raised there ends the step before the next chunk runs."""
    plan = make_plan(identity_matches())
    editor = KeyframeEditor(make_inversion(), plan, 0.0, 0.0, kv_budget=20, chunk_frames=3, propagate=True)
    x = torch.randn(2 * FRAMES, 4, H, W)
    sigma, context = torch.full((2 * FRAMES,), 1.0), torch.zeros(2 * FRAMES, 1, 1)
    runs, reports = [], []

    def counting_model(x_in, sigma, context, layout):
        runs.append(x_in.shape[0])
        return toy_model(x_in, sigma, context, layout)

    editor.on_progress = lambda done, frames: reports.append((done, frames))
    editor(counting_model, x, sigma, context, 2)
    n_key = len(plan.keyframes(1))
    chunks = -(-(FRAMES - n_key) // 3)
    assert len(runs) == 2 + chunks  # the keyframe pass runs once per CFG branch (source + that branch)
    assert [d for d, _ in reports] == [n_key] + [min(FRAMES, n_key + 3 * (i + 1)) for i in range(chunks)]
    assert reports[-1] == (FRAMES, FRAMES)

    def cancel_after_first_chunk(done, frames):
        if done > n_key:
            raise Cancelled()

    runs.clear()
    editor.on_progress = cancel_after_first_chunk
    with pytest.raises(Cancelled):
        editor(counting_model, x, sigma, context, 2)
    assert len(runs) == 3  # the keyframe pass (two branches) and one chunk, not the remaining chunks
