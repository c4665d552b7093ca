"""Saved sampling states: the latest step of a keyed run comes back whole, or not at all."""
import os

import numpy as np
import pytest
import torch

from longedit.core.resume import Fingerprint, StepStore


def state(seed: int, frames: int = 7) -> torch.Tensor:
    return torch.randn(frames, 4, 3, 5, generator=torch.Generator().manual_seed(seed))


def test_the_latest_step_of_a_run_comes_back_bit_for_bit(tmp_path):
    store = StepStore(str(tmp_path), limit_bytes=10**9)
    for step in range(3):
        store.save("run-a", step, 10, state(step))
    saved = store.load("run-a", state(0))
    assert (saved.step, saved.steps) == (2, 10) and torch.equal(saved.state, state(2))
    assert store.load("run-b", state(0)) is None  # another key: nothing
    assert [f for f in os.listdir(tmp_path)] == [os.path.basename(store.path("run-a"))]  # only the latest kept


@pytest.mark.parametrize("damage", ["flip", "truncate", "shape"])
def test_a_damaged_or_mismatched_state_is_never_used(tmp_path, damage):
    store = StepStore(str(tmp_path), limit_bytes=10**9)
    store.save("run", 4, 10, state(1))
    path = store.path("run")
    data = bytearray(open(path, "rb").read())
    like = state(0)
    if damage == "flip":
        data[-3] ^= 0x10
    elif damage == "truncate":
        data = data[: len(data) - 17]
    else:
        like = state(0, frames=8)  # a different video length
    open(path, "wb").write(bytes(data))
    assert store.load("run", like) is None
    assert not os.path.exists(path)  # and it is removed, so the run rewrites it


def test_eviction_keeps_the_folder_under_its_limit_oldest_first(tmp_path):
    store = StepStore(str(tmp_path / "s"), limit_bytes=10**9)
    size = None
    for i, key in enumerate(["a", "b", "c", "d"]):
        store.save(key, 0, 1, state(i))
        os.utime(store.path(key), (1000 + i, 1000 + i))  # a clear order of age
        size = size or os.path.getsize(store.path(key))
    store.limit_bytes = 2 * size
    store.save("e", 0, 1, state(9))
    kept = sorted(os.listdir(tmp_path / "s"))
    assert kept == sorted(os.path.basename(store.path(k)) for k in ("d", "e")), kept
    store.limit_bytes = 0
    store.save("f", 0, 1, state(3))  # the state just written stays, even over the limit
    assert os.listdir(tmp_path / "s") == [os.path.basename(store.path("f"))]


def test_fingerprints_tell_apart_what_changes_a_run_and_read_only_samples_of_weights(tmp_path):
    base = {"latents": state(0), "sigmas": np.array([14.6, 1.0, 0.0]), "seed": 0, "cfg": 7.5, "prompt": state(1)[:1]}
    key = Fingerprint().add(base).hex()
    assert Fingerprint().add(dict(base)).hex() == key  # deterministic
    for name, value in (("latents", state(0) + 1e-6), ("sigmas", np.array([14.6, 2.0, 0.0])), ("seed", 1),
                        ("cfg", 7.0), ("prompt", state(2)[:1])):
        assert Fingerprint().add({**base, name: value}).hex() != key, name
    weights = torch.randn(1000, 100)
    changed = weights + 1e-3 * torch.randn(1000, 1) @ torch.randn(1, 100)  # a rank-1 LoRA moves every element
    assert Fingerprint().add(weights, sample=64).hex() != Fingerprint().add(changed, sample=64).hex()
    # a memory-mapped trajectory is sampled, not read whole
    path = tmp_path / "big.npy"
    big = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(64, 1024, 64))
    big[:] = 1.0
    assert Fingerprint().add(big, sample=4096).hex() == Fingerprint().add(np.ones((64, 1024, 64), np.float16),
                                                                        sample=4096).hex()
