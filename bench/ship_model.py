"""How long Spread Edit's Ray actors take to get the model, and what it costs them in memory: the model pickled
whole (how the pack sent it before core/scale/shipping; the actor code reads both) against its tensors' bytes
out of band, in the same run, through the pack's own WorkerPool and ChunkWorker.

    python bench/ship_model.py --comfy ComfyUI --actors 2 [--ways "plain pickle,out of band"] [--out rows.jsonl]

The model is a checkpoint from ComfyUI's models/checkpoints (random weights: tests/tools/make_random_sd.py),
loaded as the sampling process has it (on its GPU where there is one). Per way: the host's pack and put, the
time until every actor has built it (process start, ComfyUI import and unpacking included), and each actor's
peak host memory (VmHWM) and GPU memory once built. Prints a table last."""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from keyframes import CKPT, import_comfy, import_pack, peak_rss  # noqa: E402

WAYS = ("plain pickle", "out of band")


class BuiltModel:
    """What each actor builds: the host's ModelPatcher, its weights moved to the actor's device (as the pack's
    stage models do), and a report of when and at what cost."""

    def __init__(self, patcher):
        import torch

        patcher.model.to(patcher.load_device)
        self.patcher = patcher
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.built_at = time.time()
        self.gpu = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0

    def report(self) -> dict:
        return {"built_at": self.built_at, "peak_rss": peak_rss(), "gpu": self.gpu, "pid": os.getpid()}


def plain_pack(obj, cloudpickle=None):
    """The baseline: the whole model in one pickle stream (what WorkerPool put before shipping.pack)."""
    return cloudpickle.dumps(obj), []


def one_way(way: str, patcher, actors: int) -> dict:
    import ray

    from longedit.core.scale import shipping
    from longedit.core.scale.pool import ScaleOptions, WorkerPool, connect
    from longedit.nodes.scale import comfy_prelude

    options = ScaleOptions(workers=actors)
    connect(options)
    original = shipping.pack
    timed = {}

    def pack_timed(obj, cloudpickle=None):
        start = time.time()
        packed = (plain_pack if way == "plain pickle" else original)(obj, cloudpickle)
        timed["pack"] = time.time() - start
        timed["stream"] = len(packed[0])
        timed["buffers"] = sum(b.nbytes for b in packed[1])
        return packed

    shipping.pack = pack_timed
    start = time.time()
    try:
        pool = WorkerPool(options, functools.partial(BuiltModel, patcher), comfy_prelude())
    finally:
        shipping.pack = original
    ready = time.time() - start
    reports = ray.get([a.call.remote("report") for a in pool.actors])
    pool.close()
    return {"way": way, "actors": actors, "pack_s": timed["pack"], "stream_bytes": timed["stream"],
            "buffer_bytes": timed["buffers"], "ready_s": ready,
            "built_s": [r["built_at"] - start for r in reports],
            "actor_peak_rss": [r["peak_rss"] for r in reports], "actor_gpu": [r["gpu"] for r in reports],
            "host_peak_rss": peak_rss()}


def load_model(comfy_dir: str):
    import comfy.model_management as mm
    import comfy.sd

    path = os.path.join(comfy_dir, "models", "checkpoints", CKPT)
    model = comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=False)[0]
    mm.load_models_gpu([model])  # the weights where the sampling process holds them
    return model


def table(rows: list[dict]) -> str:
    g = 2 ** 30
    lines = ["| way | actors | model GiB | host pack s | in the stream MiB | every actor ready s | each actor built s "
             "| each actor peak RSS GiB | each actor GPU GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        model = (r["stream_bytes"] + r["buffer_bytes"]) / g
        lines.append(f"| {r['way']} | {r['actors']} | {model:.2f} | {r['pack_s']:.1f} | {r['stream_bytes'] / 2**20:.1f} "
                     f"| {r['ready_s']:.1f} | {', '.join(f'{s:.1f}' for s in r['built_s'])} "
                     f"| {', '.join(f'{b / g:.2f}' for b in r['actor_peak_rss'])} "
                     f"| {', '.join(f'{b / g:.2f}' for b in r['actor_gpu'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfy", required=True, help="a ComfyUI folder with models/checkpoints/" + CKPT)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--ways", default=",".join(WAYS), help="comma-separated, run in this order")
    parser.add_argument("--out", default="", help="append each way's row as JSON here")
    args = parser.parse_args()
    import_comfy(args.comfy)
    import_pack()
    patcher = load_model(args.comfy)
    rows = []
    for way in [w.strip() for w in args.ways.split(",") if w.strip()]:
        if way not in WAYS:
            parser.error(f"unknown way {way!r}; use: {', '.join(WAYS)}")
        rows.append(one_way(way, patcher, args.actors))
        print(json.dumps(rows[-1]), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
