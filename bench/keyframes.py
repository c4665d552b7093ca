"""Benchmark: AdaFlow keyframe selection (DIFT features + clip segmentation + correspondences + AAS scores).

Runs the pack's own path (the node's featurizer on ComfyUI's SD2.1 UNet, random weights, fp16; core AKS)
for each frame count in a fresh process, and prints seconds, peak GPU memory, peak host RAM and the bytes
stored, beside the bytes the reference code's all-pairs int64 matching would store for the same clips.

Latents are synthetic (no VAE pass): scenes of smooth random latent textures, panning one latent pixel
every 8 frames, with a cut every 250 frames, so that segmentation has real work. Speed and memory do not
depend on the weights' values.

Run (ComfyUI checkout at --comfy with models/checkpoints/random_sd21.safetensors):
    python bench/keyframes.py --comfy /tmp/comfyui --frames 1000,10000
    python bench/keyframes.py --comfy /tmp/comfyui --frames 24 --height 64 --width 112   # CPU smoke test
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = "random_sd21.safetensors"
SCENE_FRAMES = 250
PAN_EVERY = 8


def import_comfy(comfy_dir: str):
    sys.path.insert(0, comfy_dir)
    sys.argv = [sys.argv[0]] + ([] if _cuda() else ["--cpu"])
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.sd  # noqa: F401


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def import_pack():
    spec = importlib.util.spec_from_file_location("longedit", os.path.join(REPO, "__init__.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["longedit"] = module
    spec.loader.exec_module(module)


def synthetic_latents(frames: int, h: int, w: int):
    import torch
    import torch.nn.functional as F

    out = torch.empty(frames, 4, h, w)
    pan = SCENE_FRAMES // PAN_EVERY + 1
    for start in range(0, frames, SCENE_FRAMES):
        g = torch.Generator().manual_seed(start)
        coarse = torch.randn(1, 4, h // 4 + 1, (w + pan) // 4 + 1, generator=g)
        texture = F.interpolate(coarse, size=(h, w + pan), mode="bicubic", align_corners=False)[0]
        for f in range(start, min(start + SCENE_FRAMES, frames)):
            x = (f - start) // PAN_EVERY
            out[f] = texture[:, :, x:x + w]
    return out


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def child(args) -> None:
    import torch

    import_comfy(args.comfy)
    import comfy.model_management as mm
    import comfy.sd

    import_pack()
    from longedit.core.adaflow.dift import dift_feature_chunks
    from longedit.core.adaflow.keyframes import AksParams, reference_all_pairs_bytes, select_keyframes
    from longedit.core.memory import frames_per_chunk
    from longedit.nodes.adaflow_keyframes import make_featurizer

    model = comfy.sd.load_checkpoint_guess_config(os.path.join(args.comfy, "models", "checkpoints", CKPT),
                                                  output_vae=False, output_clip=False)[0]
    frames = args.child
    latents = synthetic_latents(frames, args.height // 8, args.width // 8)
    dim = model.model.model_config.unet_config["context_dim"]
    patcher, featurize = make_featurizer(model, torch.zeros(1, 77, dim), args.timestep)
    per_frame = patcher.memory_required([args.ensemble, *latents.shape[1:]])
    mm.load_models_gpu([patcher], memory_required=per_frame)
    device = mm.get_torch_device()
    chunk = frames_per_chunk(mm.get_free_memory(device), per_frame, 1)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    feature_seconds = [0.0]

    def timed_features():
        stream = dift_feature_chunks(latents, featurize, args.ensemble, 0, chunk)
        while True:
            t0 = time.perf_counter()
            part = next(stream, None)
            feature_seconds[0] += time.perf_counter() - t0
            if part is None:
                return
            yield part

    with tempfile.TemporaryDirectory(dir=args.workdir) as folder:
        t0 = time.perf_counter()
        plan = select_keyframes(timed_features(), latents, AksParams(), folder=folder, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        lengths = (plan.clip_starts[1:] - plan.clip_starts[:-1]).tolist()
        disk = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        result = dict(
            frames=frames, clips=plan.clip_count, chunk=chunk, seconds=seconds, feature_seconds=feature_seconds[0],
            gpu_peak=torch.cuda.max_memory_allocated() if device.type == "cuda" else 0, rss_peak=peak_rss(),
            matches_bytes=sum(m.nbytes for m in plan.matches), aas_bytes=plan.aas_scores.nbytes, disk_bytes=disk,
            reference_bytes=reference_all_pairs_bytes(lengths, plan.levels), device=str(device),
            gpu=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    print("RESULT " + json.dumps(result), flush=True)


def kernel_table() -> str:
    """The matching kernel alone at the level-0 shape (48 frame-candidate pairs of 4,032 tokens, 640 channels,
    fp16): Triton's fused arg-max beside torch's bmm + max, which materialises the score matrix."""
    import torch
    import triton.testing

    import_pack()
    from longedit.kernels.nearest import nearest_triton

    q = torch.nn.functional.normalize(torch.randn(48, 4032, 640, device="cuda"), dim=-1).half()
    k = torch.nn.functional.normalize(torch.randn(48, 4032, 640, device="cuda"), dim=-1).half()
    flops = 2 * 48 * 4032 * 4032 * 640
    rows = []
    for name, fn in (("triton fused arg-max", lambda: nearest_triton(q, k)),
                     ("torch bmm + max", lambda: torch.bmm(q, k.transpose(1, 2)).max(dim=2))):
        ms = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
        rows.append(f"{name} | {ms:.2f} | {flops / ms / 1e9:.0f}")
    return "\n".join(["kernel | ms | TFLOP/s", "--- | --- | ---", *rows])


def run(args, frames: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", str(frames), "--comfy", args.comfy,
           "--height", str(args.height), "--width", str(args.width), "--ensemble", str(args.ensemble),
           "--timestep", str(args.timestep), "--workdir", args.workdir]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"child for {frames} frames failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def table(rows: list[dict]) -> str:
    head = ("frames", "clips", "seconds", "features s", "s/frame", "GPU peak GiB", "host peak GiB",
            "stored GiB (matches+AAS)", "on disk GiB", "reference all-pairs GiB", "reference / ours")
    lines = [" | ".join(head), " | ".join("-" * len(h) for h in head)]
    for r in rows:
        stored = r["matches_bytes"] + r["aas_bytes"]
        lines.append(" | ".join([
            f"{r['frames']:,}", str(r["clips"]), f"{r['seconds']:.1f}", f"{r['feature_seconds']:.1f}",
            f"{r['seconds'] / r['frames'] * 1000:.2f} ms", gib(r["gpu_peak"]), gib(r["rss_peak"]),
            f"{gib(stored)} ({gib(r['matches_bytes'])}+{gib(r['aas_bytes'])})", gib(r["disk_bytes"]),
            gib(r["reference_bytes"]), f"{r['reference_bytes'] / max(r['matches_bytes'], 1):.0f}x"]))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfy", default=os.environ.get("COMFYUI_PATH", "/tmp/comfyui"))
    ap.add_argument("--frames", default="1000,10000")
    ap.add_argument("--height", type=int, default=384)
    ap.add_argument("--width", type=int, default=672)
    ap.add_argument("--ensemble", type=int, default=4)
    ap.add_argument("--timestep", type=int, default=50)
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0
    kernels = kernel_table() if _cuda() else "(kernel timing needs CUDA)"
    rows = []
    for frames in [int(x) for x in args.frames.split(",")]:
        print(f"run: {frames} frames ...", flush=True)
        rows.append(run(args, frames))
        print(f"  {rows[-1]}", flush=True)
    print("\nmatching kernel, 48 x 4032 x 4032 x 640 fp16:")
    print(kernels)
    print(f"\nAKS at {args.width}x{args.height}, SD2.1 UNet (random weights, fp16 on CUDA), ensemble "
          f"{args.ensemble}, t={args.timestep}, 3 candidates per clip, max clip 400, device {rows[0]['gpu']}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
