"""Benchmark: one denoising step of AdaFlow's keyframe pass, with AAS (budget 20) and with full extended
attention, for 20-200+ keyframes at 384x672 on ComfyUI's SD2.1 UNet (random weights, fp16); and the AAS
attention kernel alone against gather + cuDNN SDPA and against a per-frame, per-head loop like the reference.

The step is a real sampler step (comfy.sample, ddim, cfg 7.5): the patched MODEL runs the source branch
beside uncond and cond. Inputs are synthetic (a random trajectory and random DIFT scores): speed and
memory do not depend on values. Sizes that run out of memory are reported as such.

Run:  python bench/keyframe_edit.py --comfy /tmp/comfyui
      python bench/keyframe_edit.py --comfy /tmp/comfyui --keyframes 2,3 --height 64 --width 112 --no-kernel   # CPU
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = "random_sd21.safetensors"
STEPS = 50


def setup(comfy_dir: str):
    import torch

    sys.path.insert(0, comfy_dir)
    sys.argv = [sys.argv[0]] + ([] if torch.cuda.is_available() else ["--cpu"])
    import comfy.options

    comfy.options.enable_args_parsing()
    spec = importlib.util.spec_from_file_location("longedit", os.path.join(REPO, "__init__.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["longedit"] = module
    spec.loader.exec_module(module)


def synthetic_plan(k: int, latent_hw: tuple[int, int]):
    """K one-frame clips (every frame a keyframe) with random AAS scores."""
    import torch

    from longedit.core.adaflow.keyframes import AksParams, KeyframePlan, attention_levels

    levels = attention_levels(*latent_hw)
    h1, w1 = levels[1]
    rng = np.random.default_rng(0)
    return KeyframePlan(
        frame_count=k, latent_size=latent_hw, levels=levels, clip_starts=np.arange(k + 1),
        candidates=np.arange(k)[:, None], matches=[np.zeros((k, 1, h * w), np.int32) for h, w in levels],
        aas_scores=rng.random((k, k, h1 * w1), dtype=np.float32).astype(np.float16),
        fingerprint=np.zeros((k, 4), np.float32), params=AksParams(candidates_per_clip=1))


def one_step(model, k: int, hw: tuple[int, int], use_aas: bool, budget: int) -> dict:
    import torch

    import comfy.model_management as mm
    import comfy.sample
    import comfy.samplers
    from longedit.core.adaflow.inversion import Inversion
    from longedit.nodes.adaflow_edit import patch_model
    import longedit.nodes.adaflow_edit as edit_node
    import tempfile

    edit_node.resume_dir = lambda: tempfile.mkdtemp()  # timed runs compute: no resume

    sigmas = comfy.samplers.calculate_sigmas(model.model.model_sampling, "ddim_uniform", STEPS).double().numpy()
    trajectory = np.random.default_rng(1).standard_normal((2, k, 4, *hw), dtype=np.float32).astype(np.float16)
    trajectory = np.broadcast_to(trajectory[:1], (STEPS + 1, k, 4, *hw))  # only step 0 is read
    context = torch.randn(1, 77, 1024)
    inversion = Inversion(sigmas=sigmas, trajectory=trajectory, source_context=context)
    plan = synthetic_plan(k, hw) if use_aas else None
    patched = patch_model(model, inversion, plan, 0.8, 0.8, budget)
    calls = [0]

    def count(executor, *args, **kwargs):
        calls[0] += 1
        return executor(*args, **kwargs)

    import comfy.patcher_extension as pe

    patched.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "bench_count", count)
    positive = [[torch.randn(1, 77, 1024), {}]]
    negative = [[torch.randn(1, 77, 1024), {}]]
    start = model.model.process_latent_out(torch.from_numpy(np.asarray(trajectory[0], dtype=np.float32)))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    comfy.sample.sample(patched, torch.zeros_like(start), STEPS, 7.5, "ddim", "ddim_uniform", positive, negative,
                        start, denoise=1.0, disable_noise=True, start_step=0, last_step=1, seed=0)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    del patched
    mm.soft_empty_cache()
    return dict(seconds=seconds, peak=peak, calls=calls[0])


def step_rows(model, keyframes: list[int], hw, budget: int) -> list[str]:
    import torch

    rows = []
    one_step(model, min(keyframes), hw, True, budget)  # warm-up: model load, kernel compilation
    for k in keyframes:
        cells = [f"{k}"]
        for use_aas in (True, False):
            try:
                r = one_step(model, k, hw, use_aas, budget)
                cells += [f"{r['seconds']:.2f}", f"{r['peak'] / 2**30:.1f}", str(r["calls"])]
            except torch.cuda.OutOfMemoryError:
                cells += ["OOM", "-", "-"]
                torch.cuda.empty_cache()
            print("  " + " | ".join(cells), flush=True)
        rows.append(" | ".join(cells))
    return rows


def kernel_rows(k: int, budget: int) -> list[str]:
    """Level-0 attention of one edited branch (SD2.1, 384x672: 4,032 tokens, 5 heads x 64), fp16."""
    import torch
    import torch.nn.functional as F
    import triton.testing

    from longedit.kernels.aas import subset_attention_triton

    tokens, heads, d = 4032, 5, 64
    q = torch.randn(k, tokens, heads * d, device="cuda", dtype=torch.float16)
    kv = torch.randn(2, k * tokens, heads * d, device="cuda", dtype=torch.float16)
    sel = torch.stack([torch.randperm(k * tokens, device="cuda")[:budget * tokens] for _ in range(k)]).sort(1).values
    sel = sel.int()

    def gather_sdpa(chunk=8):
        out = torch.empty_like(q)
        for i in range(0, k, chunk):
            s = sel[i:i + chunk].long()
            n = s.shape[0]
            ks = kv[0][s].view(n, -1, heads, d).transpose(1, 2)
            vs = kv[1][s].view(n, -1, heads, d).transpose(1, 2)
            qs = q[i:i + n].view(n, tokens, heads, d).transpose(1, 2)
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
                out[i:i + n] = F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2).reshape(n, tokens, -1)
        return out

    def per_head_loop():  # the reference code: per frame, per head, gather then SDPA
        out = torch.empty_like(q)
        for i in range(k):
            s = sel[i].long()
            for h in range(heads):
                cols = slice(h * d, (h + 1) * d)
                out[i, :, cols] = F.scaled_dot_product_attention(
                    q[i, None, :, cols], kv[0][s][None, :, cols], kv[1][s][None, :, cols])[0]
        return out

    ref = gather_sdpa()
    flops = 4 * k * tokens * budget * tokens * heads * d
    rows = []
    for name, fn in (("triton subset attention (gather in kernel)", lambda: subset_attention_triton(q, kv[0], kv[1], sel, heads)),
                     ("gather + cuDNN SDPA (8 frames a chunk)", gather_sdpa),
                     ("per-frame, per-head gather + SDPA (reference)", per_head_loop)):
        out = fn()
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
        rows.append(f"{name} | {ms:.2f} | {flops / ms / 1e9:.0f} | {err:.1e}")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfy", default=os.environ.get("COMFYUI_PATH", "/tmp/comfyui"))
    ap.add_argument("--keyframes", default="20,50,100,200")
    ap.add_argument("--budget", type=int, default=20)
    ap.add_argument("--height", type=int, default=384)
    ap.add_argument("--width", type=int, default=672)
    ap.add_argument("--kernel-keyframes", type=int, default=100)
    ap.add_argument("--no-kernel", action="store_true")
    args = ap.parse_args()
    setup(args.comfy)
    import torch

    import comfy.sd

    model = comfy.sd.load_checkpoint_guess_config(os.path.join(args.comfy, "models", "checkpoints", CKPT),
                                                  output_vae=False, output_clip=False)[0]
    hw = (args.height // 8, args.width // 8)
    keyframes = [int(x) for x in args.keyframes.split(",")]
    print("one keyframe step (3 branches: source, uncond, cond):", flush=True)
    steps = step_rows(model, keyframes, hw, args.budget)
    kernels = [] if args.no_kernel or not torch.cuda.is_available() else kernel_rows(args.kernel_keyframes, args.budget)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    if kernels:
        print(f"\nlevel-0 attention of one branch, {args.kernel_keyframes} keyframes, budget {args.budget} "
              f"frames (80,640 keys per query frame), fp16, {device}:")
        print("kernel | ms | TFLOP/s | rel. error vs gather+SDPA")
        print("--- | --- | --- | ---")
        print("\n".join(kernels))
    print(f"\nkeyframe pass, one denoising step, {args.width}x{args.height}, SD2.1 UNet fp16 (random weights), "
          f"AAS budget {args.budget}, {device}:")
    print("keyframes | AAS s | AAS peak GiB | AAS model calls | full s | full peak GiB | full model calls")
    print("--- | --- | --- | --- | --- | --- | ---")
    print("\n".join(steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
