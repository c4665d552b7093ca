"""Sampling a long video pass by pass: the keyframe records kept per clip off the device, and Euler steps
taken one group of frames at a time, against their definitions."""
import numpy as np
import pytest
import torch

from longedit.core.adaflow.records import ROWS, KeyframeRecords
from longedit.core.adaflow.sampling import euler_by_passes, passes_of_step


def full_record(clips: int, tokens: int, channels: int, seed: int) -> torch.Tensor:
    """[ROWS, clips * tokens, C]: what one joint keyframe pass [source | cond | uncond] outputs at a layer."""
    return torch.randn(ROWS, clips * tokens, channels, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("folder", [False, True])
def test_a_chunk_reads_exactly_its_clips_records_whatever_the_order_passes_wrote_them(folder, tmp_path):
    clips, layers = 5, {"a": (6, 4), "b": (15, 2), "c": (2, 8)}  # layer -> (tokens, channels)
    truth = {name: full_record(clips, t, c, seed) for seed, (name, (t, c)) in enumerate(layers.items())}
    records = KeyframeRecords(clips, folder=str(tmp_path / "rec") if folder else None)
    records.begin(step=3)
    for branch in (1, 0):  # ComfyUI may run uncond before cond, each in its own keyframe pass
        writer = records.writer([branch])
        for name, value in truth.items():
            writer[name] = value[[0, 1 + branch]]
    assert records.nbytes == sum(v.numel() * 4 for v in truth.values())
    if folder:
        assert len(list((tmp_path / "rec").iterdir())) == len(layers)
    for spanned, branch_ids in (([1, 2], [0, 1]), ([2], [1]), ([0, 4], [0]), ([3, 4], [1, 0])):
        view = records.for_clips(spanned, branch_ids, "cpu")
        assert sorted(records._on_device) == spanned  # clips no chunk needs now are dropped from the device
        rows = [0] + [1 + b for b in branch_ids]
        for name, (tokens, _) in layers.items():
            expected = torch.cat([truth[name][rows][:, c * tokens:(c + 1) * tokens] for c in spanned], dim=1)
            assert torch.equal(view[name], expected), (spanned, branch_ids, name)


def test_a_new_keyframe_pass_drops_the_device_copies_of_the_last_step():
    records = KeyframeRecords(2)
    records.begin(0)
    records.writer([0, 1])["x"] = torch.zeros(3, 2 * 4, 3)
    assert torch.equal(records.for_clips([1], [0], "cpu")["x"], torch.zeros(2, 4, 3))
    records.begin(1)
    records.writer([0, 1])["x"] = torch.ones(3, 2 * 4, 3)
    assert torch.equal(records.for_clips([1], [0], "cpu")["x"], torch.ones(2, 4, 3))


def euler_reference(x: np.ndarray, sigmas: np.ndarray, denoise) -> np.ndarray:
    """Euler for dx/dsigma = (x - D(x, sigma)) / sigma over the whole batch (Karras et al. 2022, Alg. 2, no
    churn; ComfyUI's sample_euler and its "ddim"), in float64."""
    for i in range(len(sigmas) - 1):
        d = (x - denoise(np.arange(len(x)), x, sigmas[i])) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def test_euler_pass_by_pass_is_euler_over_the_whole_batch():
    frames, steps = 23, 4
    rng = np.random.default_rng(0)
    sigmas = np.append(np.geomspace(14.6, 0.1, steps), 0.0)
    weights = rng.normal(size=(frames, 3))

    def denoise_np(idx, x, sigma):  # per frame, nonlinear in x and sigma: an index mix-up shows
        return np.tanh(x * weights[idx][:, :, None]) / (1.0 + sigma)

    x0 = rng.normal(size=(frames, 3, 5))
    expected = euler_reference(x0.copy(), sigmas, denoise_np)
    keyframes = {i: np.sort(rng.choice(frames, 4, replace=False)) for i in range(steps)}
    seen, steps_done = [], []

    def denoise(group, current, sigma):
        assert sigma.shape == (len(group),) and torch.all(sigma == sigma[0])
        seen.append(np.asarray(group))
        return torch.from_numpy(denoise_np(np.asarray(group), current.numpy(), float(sigma[0])))

    x = torch.from_numpy(x0.copy())
    out = euler_by_passes(x, torch.from_numpy(sigmas), denoise, lambda i: passes_of_step(frames, keyframes[i], 5),
                          on_step=lambda i, group, den, cur: steps_done.append((i, tuple(group))))
    assert out is x
    assert torch.allclose(out, torch.from_numpy(expected), rtol=0, atol=1e-12)
    # each step: its keyframes first, then ascending chunks of at most 5 others, every frame exactly once
    per_step = len(seen) // steps
    for i in range(steps):
        groups = seen[i * per_step:(i + 1) * per_step]
        assert np.array_equal(groups[0], keyframes[i]) and all(len(g) <= 5 for g in groups[1:])
        assert np.array_equal(np.sort(np.concatenate(groups)), np.arange(frames))
    assert steps_done == [(i, tuple(keyframes[i])) for i in range(steps)]


def test_passes_that_miss_a_frame_are_an_error():
    x = torch.zeros(6, 2)
    with pytest.raises(ValueError, match="covered 5 of 6"):
        euler_by_passes(x, torch.tensor([1.0, 0.0]), lambda g, c, s: c, lambda i: iter([np.arange(5)]))
