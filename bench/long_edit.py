"""Benchmark: the whole AdaFlow long-video edit (keyframe selection, inversion, 2 denoising steps with
keyframe editing + AAS + latent propagation) at 384x672 on ComfyUI's SD2.1 UNet (random weights, fp16).

For each frame count, in a fresh process each, side by side in the same run:
  floor      a plain batched UNet forward of the same frames, three branches per step (source, uncond, cond);
  adaflow    AdaFlow as this pack runs it (clips up to 400 frames, AAS budget 20, propagation);
  tokenflow  TokenFlow-style: a keyframe every 8 frames and full extended attention over all of them
             (no AAS), with the same propagation, up to the largest size it fits.
Columns: seconds per frame per denoising step (sampling only), the ratio to the floor, peak GPU memory
(the whole run and the sampling part), peak host RAM, and disk (trajectory and correspondences).
Latents are synthetic (scenes of 250 frames with slow pans; see bench/keyframes.py).

Run:  python bench/long_edit.py --comfy /tmp/comfyui --frames 1000,2000,5000,10000
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from keyframes import CKPT, import_comfy, import_pack, peak_rss, synthetic_latents  # noqa: E402

STEPS = 2
MODES = ("floor", "adaflow", "tokenflow")


def gpu(op: str) -> int:
    """CUDA bookkeeping that is a no-op on the CPU (so the script can be smoke-tested anywhere)."""
    import torch

    if not torch.cuda.is_available():
        return 0
    if op == "sync":
        torch.cuda.synchronize()
    elif op == "reset":
        torch.cuda.reset_peak_memory_stats()
    return torch.cuda.max_memory_allocated()


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def child(args) -> None:
    import torch

    import_comfy(args.comfy)
    import comfy.model_management as mm
    import comfy.sample
    import comfy.samplers
    import comfy.sd

    import_pack()
    from longedit.core.dift import dift_feature_chunks
    from longedit.core.inversion import ddim_invert
    from longedit.core.keyframes import AksParams, select_keyframes
    from longedit.core.memory import frames_per_chunk
    from longedit.nodes.adaflow_edit import patch_model
    from longedit.nodes.adaflow_invert import make_eps
    from longedit.nodes.adaflow_keyframes import make_featurizer
    from longedit.nodes.adaflow_propagation import propagate_from_keyframes

    frames, mode = args.child, args.mode
    model = comfy.sd.load_checkpoint_guess_config(os.path.join(args.comfy, "models", "checkpoints", CKPT),
                                                  output_vae=False, output_clip=False)[0]
    latents = synthetic_latents(frames, args.height // 8, args.width // 8)
    device = mm.get_torch_device()
    context = torch.zeros(1, 77, 1024)
    mm.load_models_gpu([model])
    gpu("reset")
    result = dict(frames=frames, mode=mode)
    if mode == "floor":
        x = model.model.process_latent_in(latents)
        batch = 32
        gpu("sync")
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(STEPS):
                for i in range(0, frames, batch):
                    xb = x[i:i + batch].to(device).repeat(3, 1, 1, 1)
                    s = torch.full((xb.shape[0],), 1.0, device=device)
                    model.model.apply_model(xb, s, c_crossattn=context.to(device).expand(xb.shape[0], -1, -1))
        gpu("sync")
        result.update(sample_s=time.perf_counter() - t0, gpu_peak=gpu("peak"),
                      sample_gpu_peak=gpu("peak"), rss_peak=peak_rss(), disk=0, keyframes=0)
        print("RESULT " + json.dumps(result), flush=True)
        return
    params = AksParams(max_clip_length=8 if mode == "tokenflow" else 400)
    budget = 10**9 if mode == "tokenflow" else 20
    with tempfile.TemporaryDirectory(dir=args.workdir) as folder:
        t0 = time.perf_counter()
        patcher, featurize = make_featurizer(model, context, 50)
        chunk = frames_per_chunk(mm.get_free_memory(device), patcher.memory_required([4, *latents.shape[1:]]), 1)
        mm.load_models_gpu([patcher])
        plan = select_keyframes(dift_feature_chunks(latents, featurize, 4, 0, chunk), latents, params,
                                folder=os.path.join(folder, "plan"), device=device)
        t1 = time.perf_counter()
        sigmas = comfy.samplers.calculate_sigmas(model.model.model_sampling, "ddim_uniform", STEPS).double().numpy()
        mm.load_models_gpu([model])
        inversion = ddim_invert(model.model.process_latent_in(latents), sigmas, make_eps(model, context), 64,
                                folder=os.path.join(folder, "inversion"), source_context=context, device=device)
        t2 = time.perf_counter()
        patched = propagate_from_keyframes(patch_model(model, inversion, plan, 0.8, 0.8, budget), plan)
        start = model.model.process_latent_out(inversion.latents_at(0))
        positive = [[torch.randn(1, 77, 1024) * 0.1, {}]]
        negative = [[context, {}]]
        peak_before = gpu("peak")
        gpu("reset")
        gpu("sync")
        t3 = time.perf_counter()
        out = comfy.sample.sample(patched, torch.zeros_like(start), STEPS, 7.5, "ddim", "ddim_uniform", positive,
                                  negative, start, denoise=1.0, disable_noise=True, seed=0)
        gpu("sync")
        t4 = time.perf_counter()
        assert out.shape == latents.shape and torch.isfinite(out).all()
        sample_peak = gpu("peak")
        result.update(aks_s=t1 - t0, invert_s=t2 - t1, sample_s=t4 - t3, keyframes=plan.clip_count,
                      gpu_peak=max(peak_before, sample_peak), sample_gpu_peak=sample_peak, rss_peak=peak_rss(),
                      disk=folder_bytes(folder))
    print("RESULT " + json.dumps(result), flush=True)


def run(args, frames: int, mode: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", str(frames), "--mode", mode, "--comfy", args.comfy,
           "--height", str(args.height), "--width", str(args.width), "--workdir", args.workdir]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stdout[-1500:] + proc.stderr[-2500:])
    reason = "OOM" if "OutOfMemory" in tail else "failed"
    print(f"  {mode} at {frames}: {reason}\n{tail if reason == 'failed' else ''}", flush=True)
    return dict(frames=frames, mode=mode, error=reason)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfy", default=os.environ.get("COMFYUI_PATH", "/tmp/comfyui"))
    ap.add_argument("--frames", default="1000,2000,5000,10000")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--height", type=int, default=384)
    ap.add_argument("--width", type=int, default=672)
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="adaflow", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0
    rows = []
    gone = set()  # modes that ran out of memory stop growing
    for frames in [int(x) for x in args.frames.split(",")]:
        floor = None
        for mode in args.modes.split(","):
            if mode in gone:
                continue
            print(f"run: {mode} {frames} frames ...", flush=True)
            r = run(args, frames, mode)
            if "error" in r:
                gone.add(mode) if r["error"] == "OOM" else None
                rows.append(f"{frames:,} | {mode} | {r['error']} | - | - | - | - | - | -")
                continue
            per = r["sample_s"] / (frames * STEPS)
            floor = per if mode == "floor" else floor
            ratio = f"{per / floor:.2f}x" if floor else "-"
            rows.append(f"{frames:,} | {mode} | {per * 1000:.2f} | {ratio} | {r['keyframes']} | "
                        f"{r['gpu_peak'] / 2**30:.1f} | {r['sample_gpu_peak'] / 2**30:.1f} | "
                        f"{r['rss_peak'] / 2**30:.1f} | {r['disk'] / 2**30:.2f}")
            print("  " + rows[-1] + f"  (aks {r.get('aks_s', 0):.1f}s, invert {r.get('invert_s', 0):.1f}s)", flush=True)
    print(f"\nlong edit, {STEPS} denoising steps, {args.width}x{args.height}, SD2.1 fp16 random weights")
    print("frames | mode | ms per frame per step | vs floor | keyframes | GPU peak GiB (run) | GPU peak GiB (sampling) "
          "| host peak GiB | disk GiB")
    print("--- | --- | --- | --- | --- | --- | --- | --- | ---")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
