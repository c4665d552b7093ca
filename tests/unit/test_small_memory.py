"""Chunk sizes are ints that fit, whatever types the host reports memory in; the GPU plan offloads and
refuses as the arithmetic of the card says."""
import dataclasses
import numpy as np
import pytest
from longedit.core.errors import LongEditError
from longedit.core.memory import HOST_CHUNK_BYTES, MAX_CHUNK_FRAMES, frames_per_chunk
from longedit.core.run_plan import (
    GIB,
    MIN_WEIGHTS_ON_GPU,
    GpuPlan,
    RunPlan,
    check_gpu,
    check_resources,
)

MIB = 2**20


@pytest.mark.parametrize("free, per_frame", [
    (1000.5 * MIB, 100.25 * MIB),  # ComfyUI's memory_required is a float
    (np.float64(1000 * MIB), np.float32(100 * MIB)),
    (np.int64(1000 * MIB), 100 * MIB),
    (1000 * MIB, 100 * MIB),
])
def test_chunk_size_is_an_int_whatever_the_input_types(free, per_frame):
    n = frames_per_chunk(free, per_frame, 1.5)
    assert type(n) is int and n == 7  # floor(0.75 * 1000 / 100)
    assert range(0, 20, n)  # usable where an int is required


def test_chunk_size_fits_and_is_the_largest_that_fits():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        free = float(rng.uniform(0, 64) * GIB)
        per_frame = float(rng.uniform(1, 4096) * MIB)
        host = float(rng.uniform(1, 64) * MIB)
        n = frames_per_chunk(free, per_frame, host)
        assert type(n) is int and 1 <= n <= MAX_CHUNK_FRAMES
        budget = 0.75 * free
        if n > 1:  # more than the minimum only when it fits both limits
            assert n * per_frame <= budget and n * host <= HOST_CHUNK_BYTES
        if n < MAX_CHUNK_FRAMES:  # one more frame would not fit one of them
            assert (n + 1) * per_frame > budget or (n + 1) * host > HOST_CHUNK_BYTES


def plan_on(card_gib: float, weights=1.6 * GIB, pass_bytes=3.0 * GIB, recorded=0.5 * GIB) -> GpuPlan:
    return GpuPlan(card_bytes=int(card_gib * GIB), reserved_bytes=int(1.0 * GIB), weights_bytes=int(weights),
                   pass_bytes=int(pass_bytes), recorded_bytes=int(recorded))


def test_weights_stay_whole_when_the_card_has_room():
    plan = plan_on(8)
    assert not plan.offloads and plan.fits
    # the keyframe pass runs with no records on the device; a chunk with its clips' records and its own pass
    assert plan.peak_bytes == int(1.6 * GIB) + max(int(3.0 * GIB), int(0.5 * GIB))
    chunked = dataclasses.replace(plan, chunk_pass_bytes=int(2.9 * GIB))
    assert chunked.peak_bytes == int(1.6 * GIB) + int(0.5 * GIB) + int(2.9 * GIB)


def test_weights_are_offloaded_as_far_as_the_card_needs():
    plan = plan_on(5.5)  # 5.5 - 1 reserved - 3.0 for the keyframe pass leaves 1.5 GiB for 1.6 GiB of weights
    assert plan.offloads and plan.fits
    assert plan.weights_on_gpu == int(5.5 * GIB) - int(1.0 * GIB) - int(3.0 * GIB)
    assert plan.peak_bytes == int(5.5 * GIB) - int(1.0 * GIB)  # the card, less the reserve, exactly
    assert "offloaded" in plan.describe()


def test_a_keyframe_pass_larger_than_the_card_is_refused_up_front_with_the_numbers():
    plan = plan_on(4.0, pass_bytes=3.5 * GIB)  # 3.5 GiB keyframe pass + 1 reserved leaves nothing for weights
    assert not plan.fits and plan.room_for_weights < MIN_WEIGHTS_ON_GPU
    run = RunPlan(frames=10_000, latent_shape=(4, 48, 84), steps=50, clips=40, per_clip=3, gpu=plan)
    with pytest.raises(LongEditError) as err:
        check_gpu(run)
    message = str(err.value)
    assert "3.50 GiB" in message and "4.0 GiB card" in message and "3.00 GiB" in message
    assert "10000 frames" in message and "fewer keyframes" in message
    with pytest.raises(LongEditError):  # the whole resource check refuses it too
        check_resources(run, "/tmp", ram=10**15, disk=10**15)
    check_gpu(RunPlan(frames=10_000, latent_shape=(4, 48, 84), steps=50, gpu=plan_on(8)))  # fits: no error


def test_keyframe_pass_one_branch_at_a_time_is_the_same_computation():
    """With a keyframe plan the keyframe pass runs per branch ([source | branch b]) so its size does not grow
    with the CFG branches; outputs and the record propagation reads must be those of one joint pass."""
    import torch
    from longedit.core.adaflow.edit import KeyframeEditor
    from longedit.core.adaflow.inversion import ddim_invert
    from longedit.core.adaflow.keyframes import AksParams, select_keyframes

    torch.manual_seed(0)
    frames, branches, shape = 21, 2, (4, 3, 5)
    sigmas = np.append(np.geomspace(14.6, 0.03, 3), 0.0)
    latents = torch.randn(frames, *shape)
    inversion = ddim_invert(latents, sigmas, lambda x, s: 0.1 * x, 4)
    plan = select_keyframes([torch.randn(frames, 8, 3, 5)], latents,
                            AksParams(tau_mean=0.0, tau_region=0.0, max_clip_length=7, candidates_per_clip=2))
    assert plan.clip_count == 3
    # q/k injection on; residual injection off, so that the chunks run [uncond | cond] without a source branch
    editor = KeyframeEditor(inversion, plan, 1.0, 0.0, kv_budget=20, chunk_frames=4, propagate=True)
    calls = []

    def run(x_in, sigma, context, layout):  # mixes keyframes within a branch; propagation reads the record
        blocks = x_in.view(layout.branches, layout.frames, -1)
        calls.append((layout.extended, layout.branches, layout.frames))
        if layout.extended:
            out = blocks + blocks.mean(dim=1, keepdim=True)
            layout.record["layer"] = (3 * out).reshape(layout.branches, -1, 1)
            return out.reshape(x_in.shape)
        assert not layout.has_source
        rec = layout.propagate.recorded["layer"]  # the record's rows of this call's branches
        shift = torch.stack([rec[b].mean() for b in range(layout.branches)])
        return (blocks + shift[:, None, None]).reshape(x_in.shape)

    step = 1
    x = torch.randn(branches * frames, *shape, dtype=torch.float64)
    sigma = torch.full((branches * frames,), float(inversion.sigmas[step]), dtype=torch.float64)
    out = editor(run, x, sigma, torch.zeros(branches * frames, 1, 1, dtype=torch.float64), branches)

    # float64 expectation from the definitions: one joint keyframe pass [source | branch 0 | branch 1]
    keys = plan.keyframes(step)
    others = np.setdiff1d(np.arange(frames), keys)
    source = inversion.latents_at(step, keys).double().reshape(len(keys), -1)
    joint = [source] + [x[b * frames + torch.as_tensor(keys)].reshape(len(keys), -1) for b in range(branches)]
    record = [3 * (j + j.mean(dim=0, keepdim=True)) for j in joint]
    expected = torch.empty_like(x)
    for b in range(branches):
        rows_k = b * frames + torch.as_tensor(keys)
        expected[rows_k] = (joint[b + 1] + joint[b + 1].mean(dim=0, keepdim=True)).view(-1, *shape)
        for i0 in range(0, len(others), 4):  # a chunk of 4 sees the records of the clips it spans
            chunk = others[i0:i0 + 4]
            spanned = torch.as_tensor(np.unique(plan.clip_of(chunk)))
            rows_o = b * frames + torch.as_tensor(chunk)
            expected[rows_o] = x[rows_o] + record[b + 1][spanned].mean()
    assert torch.allclose(out, expected, rtol=0, atol=1e-12), (out - expected).abs().max()
    assert [c for c in calls if c[0]] == [(True, 2, 3)] * branches  # source + one branch, 3 keyframes each
