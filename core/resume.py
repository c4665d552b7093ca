"""Resumable sampling: the state after each completed step, on disk, keyed by everything that determines it.

A long edit samples for hours; a Cancel, an out-of-memory error, a crash or a restart would lose all of it.
After every completed step the sampler's state (the latents of every frame) is written as safetensors with
the step, the key and a checksum; only the latest step is kept. A run whose key matches starts after that
step, so at most the step in flight is lost. The key is a digest of everything that determines the state
(the host computes it: latents, noise, schedule, sampler, guidance, conditioning, the model's weights and
patches, the AdaFlow settings), so a changed video, seed, prompt, step count or model never resumes.

Files are written to a temporary name and renamed, so a crash mid-write leaves the previous state or none;
a truncated or corrupt file fails its checksum and is ignored (and removed). The folder has a size limit:
the oldest states of other runs are evicted first.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

STATE_TENSOR = "state"


class Fingerprint:
    """An incremental digest of tensors, arrays and plain values (blake2b, 32 bytes)."""

    def __init__(self):
        self.digest = hashlib.blake2b(digest_size=32)

    def add(self, value, sample: int | None = None) -> "Fingerprint":
        """Add a value. `sample`: for tensors, hash at most about this many evenly spaced elements (model
        weights: enough to tell checkpoints and patches apart without reading gigabytes)."""
        if isinstance(value, torch.Tensor):
            flat = value.detach().reshape(-1)
            if sample is not None and flat.numel() > sample:
                flat = flat[:: flat.numel() // sample]
            self._bytes(f"tensor{tuple(value.shape)}{value.dtype}")
            self._bytes(tensor_bytes(flat))
        elif isinstance(value, np.ndarray):  # memory-mapped arrays: only the sampled elements are read
            flat = value.reshape(-1)
            if sample is not None and flat.size > sample:
                flat = flat[:: flat.size // sample]
            self._bytes(f"array{value.shape}{value.dtype}")
            self._bytes(tensor_bytes(torch.from_numpy(np.ascontiguousarray(flat))))
        elif isinstance(value, dict):
            for key in sorted(value, key=repr):
                self._bytes(repr(key))
                self.add(value[key], sample)
        elif isinstance(value, (list, tuple)):
            self._bytes(f"seq{len(value)}")
            for item in value:
                self.add(item, sample)
        elif value is None or isinstance(value, (bool, int, float, str, bytes)):
            self._bytes(repr(value))
        else:  # other objects by type only: the host turns what matters of them into plain values first
            self._bytes(type(value).__qualname__)
        return self

    def _bytes(self, data) -> None:
        self.digest.update(data.encode() if isinstance(data, str) else bytes(data))

    def hex(self) -> str:
        return self.digest.hexdigest()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor on the host (bfloat16 and other types numpy lacks as their bit patterns)."""
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def checksum(t: torch.Tensor) -> str:
    return hashlib.blake2b(tensor_bytes(t.reshape(-1)), digest_size=32).hexdigest()


@dataclass(frozen=True)
class SavedStep:
    step: int  # the last completed step (0-based)
    steps: int
    state: torch.Tensor


class StepStore:
    """The latest completed step of each keyed run, in `folder`, at most `limit_bytes` in all."""

    def __init__(self, folder: str, limit_bytes: int):
        self.folder, self.limit_bytes = folder, limit_bytes

    def path(self, key: str) -> str:
        return os.path.join(self.folder, f"{key[:40]}.safetensors")

    def save(self, key: str, step: int, steps: int, state: torch.Tensor) -> None:
        os.makedirs(self.folder, exist_ok=True)
        target = self.path(key)
        temporary = f"{target}.{os.getpid()}.partial"
        metadata = {"key": key, "step": str(step), "steps": str(steps), "checksum": checksum(state)}
        save_file({STATE_TENSOR: state.detach().to("cpu").contiguous()}, temporary, metadata=metadata)
        os.replace(temporary, target)  # atomic: the previous step's file stays whole until this one is
        self.evict(keep=target)

    def load(self, key: str, like: torch.Tensor) -> SavedStep | None:
        """The saved step of this run, if there is one whose key, shape and checksum are right."""
        path = self.path(key)
        if not os.path.exists(path):
            return None
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                state = f.get_tensor(STATE_TENSOR)
            good = (metadata.get("key") == key and state.shape == like.shape and state.dtype == like.dtype
                    and metadata.get("checksum") == checksum(state))
            saved = SavedStep(int(metadata["step"]), int(metadata["steps"]), state) if good else None
        except Exception as error:  # truncated or foreign file: safetensors' own checks fail
            logging.warning(f"LongEdit: ignoring unreadable sampling state {path}: {error}")
            saved = None
        if saved is None:
            logging.warning(f"LongEdit: the sampling state {path} is damaged or stale; recomputing from the start.")
            os.remove(path)
        return saved

    def evict(self, keep: str) -> None:
        """Delete the oldest other states until the folder fits its limit (the one just written stays)."""
        files = [os.path.join(self.folder, f) for f in os.listdir(self.folder) if f.endswith(".safetensors")]
        files.sort(key=os.path.getmtime)
        total = sum(os.path.getsize(f) for f in files)
        for f in files:
            if total <= self.limit_bytes:
                break
            if f != keep:
                total -= os.path.getsize(f)
                os.remove(f)
