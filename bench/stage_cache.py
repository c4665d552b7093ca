"""Benchmark: what keeping the inversion across runs costs -- writing its trajectory (float16, [steps + 1,
frames, 4, h/8, w/8], memory-mapped as AdaFlow Invert leaves it) to the stage cache (safetensors, streamed,
a checksum per tensor, temporary name + rename), and loading it back (checksums verified, memory-mapped).

Host-bound (no GPU involved). The inversion it saves: ~20 minutes at 10,000 frames and 50 steps on an H200
(issue 16), i.e. ~0.12 s per frame.

Run:  python bench/stage_cache.py --frames 100,1000 --folder /tmp/stage_cache_bench
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from keyframes import import_pack  # noqa: E402

INVERSION_S_PER_FRAME = 20 * 60 / 10_000  # issue 16: ~20 min at 10,000 frames, 50 steps (H200)


def measure(frames: int, folder: str, steps: int, height: int, width: int) -> dict:
    from longedit.core.stage_cache import StageCache

    os.makedirs(folder, exist_ok=True)
    shape = (steps + 1, frames, 4, height // 8, width // 8)
    trajectory = np.lib.format.open_memmap(os.path.join(folder, "trajectory.npy"), mode="w+", dtype=np.float16,
                                           shape=shape)
    rng = np.random.default_rng(0)
    for step in range(shape[0]):  # filled step by step: never a second full copy in RAM
        trajectory[step] = rng.standard_normal(shape[1:], dtype=np.float32).astype(np.float16)
    trajectory.flush()
    cache = StageCache(os.path.join(folder, "cache"), limit_bytes=2**40)
    t0 = time.perf_counter()
    path = cache.save("inversion", "bench" * 13, {"trajectory": trajectory, "sigmas": np.linspace(14.6, 0, steps + 1)},
                      {"steps": steps})
    save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    loaded = cache.load("inversion", "bench" * 13)
    load_s = time.perf_counter() - t0
    assert isinstance(loaded.arrays["trajectory"], np.memmap)
    assert np.array_equal(loaded.arrays["trajectory"][steps // 2], trajectory[steps // 2])
    size = os.path.getsize(path)
    shutil.rmtree(folder, ignore_errors=True)
    return dict(frames=frames, bytes=size, save_s=save_s, load_s=load_s, inversion_s=frames * INVERSION_S_PER_FRAME)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", default="100,1000")
    ap.add_argument("--folder", default="/tmp/longedit_stage_cache_bench")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--height", type=int, default=384)
    ap.add_argument("--width", type=int, default=672)
    args = ap.parse_args()
    import_pack()
    rows = [measure(int(f), args.folder, args.steps, args.height, args.width) for f in args.frames.split(",")]
    print(f"\ninversion trajectory in the stage cache, {args.steps} steps, {args.width}x{args.height}, this machine's disk")
    print("frames | entry on disk | save (s) | load + verify (s) | inversion it replaces (s, H200) | GB/s save, load")
    print("--- | --- | --- | --- | --- | ---")
    for r in rows:
        gb = r["bytes"] / 1e9
        print(f"{r['frames']:,} | {r['bytes'] / 2**30:.2f} GiB | {r['save_s']:.2f} | {r['load_s']:.2f} | "
              f"{r['inversion_s']:.0f} | {gb / r['save_s']:.2f}, {gb / r['load_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
