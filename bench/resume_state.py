"""Benchmark: what resuming costs per sampling step -- writing the state of every frame (float32 latents,
safetensors, checksummed, written to a temporary name and renamed), and reading it back at a resume.

Host-bound (no GPU involved): the state leaves the sampler in RAM. Beside each row, the step it protects:
a step at the measured 8.42 ms per frame on a simulated 8 GB card (bench/long_edit.py, 10,000 frames).

Run:  python bench/resume_state.py --frames 1000,10000 --folder /tmp/resume_bench
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from keyframes import import_pack  # noqa: E402

STEP_MS_PER_FRAME = 8.42  # bench/long_edit.py: 10,000 frames on a simulated 8 GB card, H200


def measure(frames: int, folder: str, height: int, width: int) -> dict:
    from longedit.core.resume import StepStore

    store = StepStore(folder, limit_bytes=2**40)
    state = torch.randn(frames, 4, height // 8, width // 8)
    times = []
    for step in range(3):
        t0 = time.perf_counter()
        store.save("bench", step, 50, state)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    saved = store.load("bench", state)
    load_s = time.perf_counter() - t0
    assert saved is not None and torch.equal(saved.state, state)
    return dict(frames=frames, save_s=min(times), load_s=load_s, bytes=os.path.getsize(store.path("bench")),
                step_s=frames * STEP_MS_PER_FRAME / 1000)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", default="1000,10000")
    ap.add_argument("--folder", default="/tmp/longedit_resume_bench")
    ap.add_argument("--height", type=int, default=384)
    ap.add_argument("--width", type=int, default=672)
    args = ap.parse_args()
    import_pack()
    rows = []
    try:
        for frames in [int(f) for f in args.frames.split(",")]:
            rows.append(measure(frames, args.folder, args.height, args.width))
    finally:
        shutil.rmtree(args.folder, ignore_errors=True)
    print(f"\nsampling state per step, {args.width}x{args.height} (latents 4x{args.height // 8}x{args.width // 8}, "
          f"float32), this machine's disk")
    print("frames | state on disk | save per step (s) | load at resume (s) | step it protects (s) | save / step")
    print("--- | --- | --- | --- | --- | ---")
    for r in rows:
        print(f"{r['frames']:,} | {r['bytes'] / 2**20:.0f} MiB | {r['save_s']:.2f} | {r['load_s']:.2f} | "
              f"{r['step_s']:.1f} | {r['save_s'] / r['step_s']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
