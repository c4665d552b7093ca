"""Ray actors that share a GPU, with each other or with the sampling process (which runs every step's keyframe
pass there and still grows after the actors start): each actor caps its allocations at its share of what is
free once the sampling process's reserve is set aside, and sizes its chunks from free memory within that cap.

Measured before this existed (H200, 600 frames, 2 actors on one GPU): each actor took half of the card while the
sampling process held 20 GiB, and one ran out of memory. CUDA is faked here: the rule is arithmetic."""
import pytest
import torch

from longedit.core.scale import pool

GIB = 2**30


@pytest.fixture
def fake_gpu(monkeypatch):
    """A GPU with 100 GiB free of 140, this process holding 3 GiB; records the memory fraction set."""
    state = {"fraction": None}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * GIB, 140 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 * GIB)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda fraction, device=None: state.update(fraction=fraction))
    monkeypatch.setattr(pool, "gpu_uuid", lambda: "GPU-this")
    return state


@pytest.mark.parametrize("share, driver_gpu, reserve, room", [
    (0.5, "GPU-this", 20 * GIB, 40 * GIB),   # two actors beside the sampling process: half of (100 - 20) each
    (0.5, "GPU-other", 20 * GIB, 50 * GIB),  # two actors on a GPU of their own: the reserve is not theirs to keep
    (1.0, "GPU-this", 20 * GIB, 80 * GIB),   # one actor on the sampling process's GPU
    (1 / 3, None, 0, 100 * GIB / 3),         # three actors sharing, no sampling process there
])
def test_an_actor_keeps_to_its_share_of_what_the_sampling_process_leaves(fake_gpu, share, driver_gpu, reserve, room):
    cap = int(pool.ACTOR_HEADROOM * room)  # less what no cap counts (contexts, fragmentation)
    pool.keep_to_gpu_budget(pool.GpuBudget(share=share, driver_gpu=driver_gpu, driver_reserve=reserve))
    assert fake_gpu["fraction"] == pytest.approx(cap / (140 * GIB))
    free, total = torch.cuda.mem_get_info()
    assert (free, total) == (cap - 3 * GIB, cap)  # what the host sizes its chunks from


def test_an_actor_with_a_gpu_of_its_own_is_not_capped(fake_gpu):
    pool.keep_to_gpu_budget(pool.GpuBudget(share=1.0, driver_gpu="GPU-other", driver_reserve=20 * GIB))
    assert fake_gpu["fraction"] is None
    assert torch.cuda.mem_get_info() == (100 * GIB, 140 * GIB)


def test_the_cap_never_goes_below_zero():
    assert pool.actor_gpu_cap(free=10 * GIB, share=0.5, reserve=30 * GIB) == 0


def test_the_measured_out_of_memory_run_now_fits():
    """The H200 run that failed: 139.8 GiB, the sampling process holding 20.4 GiB (past its planned 16.9 GiB
    peak: nothing left to reserve), two actors with a CUDA context of up to 1 GiB each (assumed, not
    measured). Their caps and contexts, with the sampling process, now stay below the card."""
    total, held = 139.8 * GIB, 20.4 * GIB
    cap = pool.actor_gpu_cap(free=total - held, share=0.5, reserve=max(0, int(16.9 * GIB - held)))
    assert held + 2 * (cap + GIB) < total - GIB


def test_each_stage_of_a_warm_actor_sets_its_cap_again_from_what_is_free_now(fake_gpu):
    """A warm actor loads one stage's model after another (WarmPools): each stage's budget is applied to CUDA's
    own free figure, not to the previous stage's capped one, and a GPU of its own lifts the cap."""
    real = torch.cuda.mem_get_info  # the fake GPU: 100 GiB free of 140
    first = pool.keep_to_gpu_budget(pool.GpuBudget(share=0.5), real)
    second = pool.keep_to_gpu_budget(pool.GpuBudget(share=0.5, driver_gpu="GPU-this", driver_reserve=20 * GIB), real)
    assert first == int(pool.ACTOR_HEADROOM * 0.5 * 100 * GIB)
    assert second == int(pool.ACTOR_HEADROOM * 0.5 * 80 * GIB)
    assert fake_gpu["fraction"] == pytest.approx(second / (140 * GIB))
    assert torch.cuda.mem_get_info() == (second - 3 * GIB, second)
    assert pool.keep_to_gpu_budget(pool.GpuBudget(share=1.0), real) is None
    assert torch.cuda.mem_get_info is real and fake_gpu["fraction"] == 1.0
