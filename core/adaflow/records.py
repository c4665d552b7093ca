"""The keyframe pass's record for propagation, kept off the GPU and brought back one clip at a time.

Propagation hands every other frame, at every self-attention layer, the output its clip's keyframe got in
this step's keyframe pass. That record grows with the number of clips (a 384x672 SD2.1 keyframe is ~70 MB
over the source, uncond and cond rows), so on a small card it cannot stay on the GPU for a long video. It
lives in RAM, or in a memory-mapped file when RAM is short; a chunk of frames reads only the keyframes of
the clips it spans (frames are sorted, so one or two), which are copied to the model's device when first
needed and dropped when a chunk no longer needs them. GPU memory then holds the records of the clips one
chunk spans, whatever the length of the video, and each clip's record crosses the bus once per step.

Rows: 0 is the source branch; 1 + b is branch id b (ComfyUI names cond 0 and uncond 1), so that passes of
one step made in separate model calls (ComfyUI may run cond and uncond apart) fill one record.
"""
from __future__ import annotations

import os
from typing import Iterable

import numpy as np
import torch

ROWS = 3  # source, branch id 0, branch id 1


class KeyframeRecords:
    def __init__(self, clips: int, pin: bool = False, folder: str | None = None):
        self.clips = clips
        self.pin = pin  # page-locked RAM: faster, asynchronous copies to a CUDA device
        self.folder = folder  # memory-mapped files here instead of RAM
        self.layers: dict = {}  # layer -> [clips, ROWS, T, C] (keyframe of clip c in row block c)
        self.step: int | None = None  # the step whose keyframe pass filled the record
        self._on_device: dict[int, dict] = {}  # clip -> layer -> [ROWS, T, C] on the model's device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers.values())

    def begin(self, step: int) -> None:
        """A keyframe pass of `step` starts writing: copies of an older step on the device are stale."""
        self.step = step
        self._on_device.clear()

    def write(self, layer, value: torch.Tensor, branch_ids: list[int]) -> None:
        """value [1 + len(branch_ids), clips * T, C]: the source row, then one row per branch."""
        rows = value.view(value.shape[0], self.clips, -1, value.shape[-1])
        if layer not in self.layers:
            count = max(ROWS, 2 + max(branch_ids, default=0))
            self.layers[layer] = self._allocate((self.clips, count, rows.shape[2], rows.shape[3]), value.dtype, layer)
        target = self.layers[layer]
        if 1 + max(branch_ids, default=0) >= target.shape[1]:
            raise ValueError(f"branch ids {branch_ids} exceed the record's {target.shape[1] - 1} branch rows")
        for i, row in enumerate([0] + [1 + int(b) for b in branch_ids]):
            target[:, row].copy_(rows[i])

    def _allocate(self, shape: tuple[int, ...], dtype: torch.dtype, layer) -> torch.Tensor:
        if self.folder is None:
            return torch.empty(shape, dtype=dtype, pin_memory=self.pin)
        os.makedirs(self.folder, exist_ok=True)
        name = os.path.join(self.folder, f"record_{len(self.layers)}.bin")
        numpy_dtype = torch.empty((), dtype=dtype).numpy().dtype
        return torch.from_numpy(np.memmap(name, dtype=numpy_dtype, mode="w+", shape=shape))

    def writer(self, branch_ids: Iterable[int]) -> "RecordWriter":
        return RecordWriter(self, list(branch_ids))

    def for_clips(self, clips: list[int], branch_ids: list[int], device, source: bool = True) -> "ClipRecords":
        """The record of `clips` (ascending) and of the source (unless `source` is False) + `branch_ids` rows,
        on `device`."""
        for c in [c for c in self._on_device if c not in clips]:
            del self._on_device[c]
        for c in clips:
            if c not in self._on_device:
                self._on_device[c] = {layer: t[c].to(device, non_blocking=self.pin) for layer, t in self.layers.items()}
        return ClipRecords([self._on_device[c] for c in clips], record_rows(branch_ids, source, device))


def record_rows(branch_ids: list[int], source: bool, device) -> torch.Tensor:
    """The record's rows of the source (when `source`) and of the branches `branch_ids`, in that order."""
    return torch.tensor(([0] if source else []) + [1 + int(b) for b in branch_ids], device=device)


class RecordWriter:
    """What a keyframe pass's attention layers write to (layout.record[layer] = output)."""

    def __init__(self, records: KeyframeRecords, branch_ids: list[int]):
        self.records, self.branch_ids = records, branch_ids

    def __setitem__(self, layer, value: torch.Tensor) -> None:
        self.records.write(layer, value, self.branch_ids)


class ClipRecords:
    """layer -> [rows, len(clips) * T, C]: the records of a chunk's clips side by side, built when a layer asks
    (one layer's worth at a time on the device). Token t of the i-th clip is entry i * T + t."""

    def __init__(self, per_clip: list[dict], rows: torch.Tensor):
        self.per_clip, self.rows = per_clip, rows

    def with_rows(self, rows: torch.Tensor) -> "ClipRecords":
        """The same clips' records, other rows (no copy)."""
        return ClipRecords(self.per_clip, rows)

    def __getitem__(self, layer) -> torch.Tensor:
        return torch.cat([clip[layer].index_select(0, self.rows) for clip in self.per_clip], dim=1)
