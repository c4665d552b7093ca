"""Where a Ray actor's GPU memory goes (bench/long_edit.py --gpus, with LONGEDIT_BENCH_SNAPSHOTS=folder): the
actors' model records CUDA allocations with their stacks and, when a chunk runs out of memory, writes torch's
memory snapshot there; `python bench/actor_memory.py FILE` prints the live allocations by allocating line."""
from __future__ import annotations

import collections
import os
import pickle
import sys

import torch

try:
    from longedit.nodes.scale import ChunkModel
except ImportError:  # reading a snapshot (report) needs no pack
    ChunkModel = object

SNAPSHOTS = "LONGEDIT_BENCH_SNAPSHOTS"


class SnapshotChunkModel(ChunkModel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.memory._record_memory_history(max_entries=100000)

    def denoise(self, group, current, sigma):
        try:
            return super().denoise(group, current, sigma)
        except torch.OutOfMemoryError:
            with open(os.path.join(os.environ[SNAPSHOTS], f"oom_{os.getpid()}.pickle"), "wb") as f:
                pickle.dump(torch.cuda.memory._snapshot(), f)
            raise


def where(frames: list[dict]) -> str:
    """The innermost frames of ComfyUI's or the pack's code (not torch's)."""
    ours = [f for f in frames if ("comfy" in f["filename"] or "longedit" in f["filename"] or "/work/" in
                                  f["filename"]) and "site-packages" not in f["filename"]]
    return " < ".join(f"{f['filename'].split('/')[-1]}:{f['line']} {f['name']}" for f in ours[:3]) or "?"


def report(path: str) -> None:
    snapshot = pickle.load(open(path, "rb"))
    live = collections.Counter()
    count = collections.Counter()
    for segment in snapshot["segments"]:
        for block in segment["blocks"]:
            if block["state"] == "active_allocated":
                key = where(block.get("frames", []))
                live[key] += block["size"]
                count[key] += 1
    print(f"{path}: {sum(live.values()) / 2**30:.2f} GiB live")
    for key, size in live.most_common(15):
        print(f"  {size / 2**30:7.2f} GiB in {count[key]:5d} blocks  {key}")


if __name__ == "__main__":
    for name in sys.argv[1:]:
        report(name)
