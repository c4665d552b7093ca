"""Cached stage results: a finished inversion or keyframe plan comes back bit for bit, memory-mapped when
large, or not at all (damaged, truncated, another key); the folder stays under its limit."""
import json
import os
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open

import longedit.core.stage_cache as stage_cache
from longedit.core.stage_cache import StageCache


def result(tmp_path, frames: int = 19):
    """Arrays like an inversion's and a plan's: a memory-mapped float16 trajectory (odd sizes), float64
    sigmas, int32 matches, int64 clip starts, a bfloat16 and a float32 torch tensor, an empty array."""
    rng = np.random.default_rng(frames)
    trajectory = np.lib.format.open_memmap(tmp_path / f"trajectory{frames}.npy", mode="w+", dtype=np.float16,
                                           shape=(3, frames, 4, 5, 7))
    trajectory[:] = rng.standard_normal(trajectory.shape).astype(np.float16)
    trajectory.flush()
    return {
        "trajectory": trajectory,
        "sigmas": np.array([14.6, 3.3, 0.0]),
        "matches_0": rng.integers(0, 35, size=(frames, 3, 35), dtype=np.int32),
        "clip_starts": np.array([0, 7, 14, frames], dtype=np.int64),
        "aas": rng.standard_normal((9, 9, 12)).astype(np.float16),
        "context": torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(frames)),
        "bf16": torch.randn(3, 5, generator=torch.Generator().manual_seed(1)).bfloat16(),
        "empty": np.zeros((0, 4), np.float32),
        "flags": np.array([True, False, True]),
    }


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return (not isinstance(b, torch.Tensor)) and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def test_a_result_comes_back_bit_for_bit_and_large_arrays_memory_mapped(tmp_path, monkeypatch):
    monkeypatch.setattr(stage_cache, "IN_RAM_BYTES", 1000)  # the trajectory (3*19*140*2 B) is "large"
    monkeypatch.setattr(stage_cache, "BLOCK_BYTES", 1001)  # many blocks, not a multiple of any item size
    cache = StageCache(str(tmp_path / "cache"), limit_bytes=10**9)
    arrays = result(tmp_path)
    info = {"levels": [[5, 7], [3, 4]], "params": {"tau_mean": 0.75, "seed": 3}, "frames": 19}
    path = cache.save("inversion", "k" * 64, arrays, info)
    assert path == cache.path("inversion", "k" * 64) and os.path.exists(path)
    loaded = cache.load("inversion", "k" * 64)
    assert loaded.info == info and set(loaded.arrays) == set(arrays)
    for name, value in arrays.items():
        assert same(value, loaded.arrays[name]), name
    trajectory = loaded.arrays["trajectory"]
    assert isinstance(trajectory, np.memmap) and trajectory.flags.writeable
    trajectory[0, 0] = 0  # copy-on-write: the file is not changed by writing into a loaded array
    assert same(arrays["trajectory"], cache.load("inversion", "k" * 64).arrays["trajectory"])
    _, length, header = header_of(path)
    for name, entry in header.items():  # every tensor starts in the file at a multiple of its item size
        if name != "__metadata__":
            itemsize = np.dtype(stage_cache.NUMPY_DTYPES.get(entry["dtype"], np.int16)).itemsize
            assert (8 + length + entry["data_offsets"][0]) % itemsize == 0, (name, entry)
    # a standard safetensors file: safetensors' own reader gives the same tensors
    with safe_open(path, framework="pt") as f:
        assert set(f.keys()) == set(arrays)
        assert torch.equal(f.get_tensor("trajectory"), torch.from_numpy(np.array(arrays["trajectory"])))
        assert torch.equal(f.get_tensor("bf16"), arrays["bf16"])
        assert torch.equal(f.get_tensor("matches_0"), torch.from_numpy(arrays["matches_0"]))
    assert not [f for f in os.listdir(tmp_path / "cache") if f.endswith(".partial")]


def test_another_key_or_stage_finds_nothing(tmp_path):
    cache = StageCache(str(tmp_path), limit_bytes=10**9)
    cache.save("inversion", "a" * 64, {"x": np.arange(5)}, {})
    assert cache.load("inversion", "b" * 64) is None
    assert cache.load("keyframes", "a" * 64) is None
    assert cache.load("inversion", "a" * 64) is not None


def header_of(path):
    data = open(path, "rb").read()
    (length,) = struct.unpack("<Q", data[:8])
    return data, length, json.loads(data[8:8 + length])


@pytest.mark.parametrize("damage", ["flip data", "flip last byte", "truncate", "truncate header", "shape",
                                    "info", "checksum", "extra bytes", "other key"])
def test_a_damaged_or_foreign_entry_is_detected_removed_and_never_used(tmp_path, damage, monkeypatch):
    monkeypatch.setattr(stage_cache, "IN_RAM_BYTES", 1000)
    cache = StageCache(str(tmp_path / "cache"), limit_bytes=10**9)
    path = cache.save("keyframes", "k" * 64, result(tmp_path), {"frames": 19})
    data, length, header = header_of(path)
    data = bytearray(data)
    start = 8 + length
    if damage == "flip data":  # one bit inside the memory-mapped trajectory
        begin, _ = header["trajectory"]["data_offsets"]
        data[start + begin + 301] ^= 0x04
    elif damage == "flip last byte":
        data[-1] ^= 0x01
    elif damage == "truncate":  # a crash mid-copy: the end is missing
        data = data[:-100]
    elif damage == "truncate header":
        data = data[:start - 10]
    elif damage in ("shape", "info", "checksum", "other key"):
        if damage == "shape":  # same bytes, another shape: the data would be read wrongly
            header["matches_0"]["shape"] = [header["matches_0"]["shape"][1], header["matches_0"]["shape"][0], 35]
        elif damage == "info":
            header["__metadata__"]["info"] = json.dumps({"frames": 18})
        elif damage == "checksum":
            sums = json.loads(header["__metadata__"]["checksums"])
            sums["sigmas"] = "f" * 64
            header["__metadata__"]["checksums"] = json.dumps(sums, sort_keys=True)
        else:
            header["__metadata__"]["key"] = "j" * 64
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        data = struct.pack("<Q", len(text)) + text + data[start:]
    else:
        data += b"\0" * 8
    open(path, "wb").write(bytes(data))
    assert cache.load("keyframes", "k" * 64) is None
    assert not os.path.exists(path)  # removed: the run computes and writes it again


def test_eviction_keeps_the_folder_under_its_limit_least_recently_used_first(tmp_path):
    cache = StageCache(str(tmp_path / "c"), limit_bytes=10**9)
    size = None
    for i, key in enumerate("abcd"):
        cache.save("inversion", key * 64, {"x": np.full(1000, i, np.float32)}, {})
        os.utime(cache.path("inversion", key * 64), (1000 + i, 1000 + i))  # a clear order of age
        size = size or os.path.getsize(cache.path("inversion", key * 64))
    assert cache.load("inversion", "a" * 64) is not None  # a hit makes "a" the most recently used
    cache.limit_bytes = 3 * size
    cache.save("keyframes", "e" * 64, {"x": np.full(1000, 9, np.float32)}, {})
    kept = sorted(os.listdir(tmp_path / "c"))
    assert kept == sorted(os.path.basename(cache.path(s, k * 64)) for s, k in
                          (("inversion", "a"), ("inversion", "d"), ("keyframes", "e"))), kept
    # a result larger than the whole limit is not stored, and evicts nothing
    assert cache.save("inversion", "f" * 64, {"x": np.zeros(4000, np.float32)}, {}) is None
    assert len(os.listdir(tmp_path / "c")) == 3


def test_partial_files_of_dead_writers_are_cleared_and_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    folder = tmp_path / "c"
    folder.mkdir()
    dead = folder / f".inversion-x.safetensors.{2**22 + 12345}.abcd1234.partial"  # no such pid
    mine = folder / f".inversion-y.safetensors.{os.getpid()}.abcd1234.partial"  # being written by us
    dead.write_bytes(b"x" * 10)
    mine.write_bytes(b"x" * 10)
    cache = StageCache(str(folder), limit_bytes=10**9)
    cache.evict()
    assert not dead.exists() and mine.exists()
    mine.unlink()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(stage_cache.os, "replace", full_disk)
    assert cache.save("inversion", "k" * 64, {"x": np.arange(10)}, {}) is None
    assert os.listdir(folder) == []


def test_an_entry_that_does_not_fit_the_free_disk_is_not_written(tmp_path, monkeypatch):
    cache = StageCache(str(tmp_path), limit_bytes=10**9)

    class Usage:
        free = 100

    monkeypatch.setattr(stage_cache.shutil, "disk_usage", lambda path: Usage)
    assert cache.save("inversion", "k" * 64, {"x": np.zeros(1000, np.float32)}, {}) is None
    assert os.listdir(tmp_path) == []


def test_a_folder_that_cannot_be_created_only_skips_the_cache(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    cache = StageCache(str(blocker / "cache"), limit_bytes=10**9)  # a folder below a file
    assert cache.save("inversion", "k" * 64, {"x": np.arange(3)}, {}) is None
    assert cache.load("inversion", "k" * 64) is None
