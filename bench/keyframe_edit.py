"""Benchmark: one denoising step of AdaFlow's keyframe pass, with AAS (budget 20) and with full extended
attention, for 20-200+ keyframes at 384x672 on ComfyUI's SD2.1 UNet (random weights, fp16); the AAS
attention kernel alone against gather + cuDNN SDPA and against a per-frame, per-head loop like the reference;
and the three slimming policies of the keyframe pass (AdaFlow Attention Slimming: full, aas, isa) side by
side: time and relative error against full extended attention, per SD2.1 attention level (attention alone,
no ComfyUI needed: --policies-only) and for one whole sampler step (with ComfyUI).

The step is a real sampler step (comfy.sample, ddim, cfg 7.5): the patched MODEL runs the source branch
beside uncond and cond. Inputs are synthetic (a random trajectory and random DIFT scores): speed and
memory do not depend on values. Sizes that run out of memory are reported as such.

Run:  python bench/keyframe_edit.py --comfy /tmp/comfyui
      python bench/keyframe_edit.py --comfy /tmp/comfyui --keyframes 2,3 --height 64 --width 112 --no-kernel   # CPU
      python bench/keyframe_edit.py --policies-only --policy-keyframes 8,16,24            # GPU, no ComfyUI
      python bench/keyframe_edit.py --policies-only --policy-keyframes 3,5 --height 64 --width 112   # CPU
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


def synthetic_plan(k: int, latent_hw: tuple[int, int], latents):
    """K one-frame clips (every frame a keyframe) with random AAS scores, built from `latents` (the clean
    latents Keyframe Editing checks the plan against)."""
    import torch

    from longedit.core.adaflow.keyframes import AksParams, KeyframePlan, attention_levels, latent_fingerprint

    levels = attention_levels(*latent_hw)
    h1, w1 = levels[1]
    rng = np.random.default_rng(0)
    return KeyframePlan(
        frame_count=k, latent_size=latent_hw, levels=levels, clip_starts=np.arange(k + 1),
        candidates=np.arange(k)[:, None], matches=[np.zeros((k, 1, h * w), np.int32) for h, w in levels],
        aas_scores=rng.random((k, k, h1 * w1), dtype=np.float32).astype(np.float16),
        fingerprint=latent_fingerprint(latents), params=AksParams(candidates_per_clip=1))


def one_step(model, k: int, hw: tuple[int, int], use_aas: bool, budget: int, slimming=None,
             keep_output: bool = False) -> dict:
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
    seeded = torch.Generator().manual_seed(0)  # the same inputs for every policy compared
    context = torch.randn(1, 77, 1024, generator=seeded)
    inversion = Inversion(sigmas=sigmas, trajectory=trajectory, source_context=context)
    clean = model.model.process_latent_out(torch.from_numpy(np.asarray(trajectory[-1], dtype=np.float32)))
    plan = synthetic_plan(k, hw, clean) if use_aas else None
    patched = patch_model(model, inversion, plan, 0.8, 0.8, budget)
    if slimming is not None:  # the AdaFlow Attention Slimming node after Keyframe Editing
        from longedit.nodes.adaflow_attention import slim_keyframe_attention

        patched = slim_keyframe_attention(patched, slimming)
    calls = [0]

    def count(executor, *args, **kwargs):
        calls[0] += 1
        return executor(*args, **kwargs)

    import comfy.patcher_extension as pe

    patched.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "bench_count", count)
    positive = [[torch.randn(1, 77, 1024, generator=seeded), {}]]
    negative = [[torch.randn(1, 77, 1024, generator=seeded), {}]]
    start = model.model.process_latent_out(torch.from_numpy(np.asarray(trajectory[0], dtype=np.float32)))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = comfy.sample.sample(patched, torch.zeros_like(start), STEPS, 7.5, "ddim", "ddim_uniform", positive,
                              negative, start, denoise=1.0, disable_noise=True, start_step=0, last_step=1, seed=0)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    del patched
    mm.soft_empty_cache()
    return dict(seconds=seconds, peak=peak, calls=calls[0], out=out.float().cpu() if keep_output else None)


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


# ---- slimming policies of the keyframe pass: full vs AAS vs ISA -------------------------------------------

SD21_LEVEL_WIDTHS = (320, 640, 1280, 1280)  # channels of SD2.1's self-attention per level (heads of 64)


def matched_budget(k: int, alpha_s: float) -> int:
    """AAS budget (keyframes) keeping about as many K/V tokens per keyframe as ISA's pre-selection:
    its own frame plus alpha_s of the others."""
    return max(1, round(1 + alpha_s * (k - 1)))


def keyframe_qkv(k: int, tokens: int, width: int, generator: str, device, dtype, seed: int = 0):
    """q, k, v [K, T, C] of one edited branch at one level. 'gaussian': independent N(0, 1). 'scene': the
    keyframes of one moving scene: shared content (tokens shifted by a few positions per keyframe) plus
    per-keyframe noise, projected by one random matrix for q and k (tokens attend to their own content in
    every keyframe, as extended attention does on a video) and another for v."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    if generator == "gaussian":
        return [torch.randn(k, tokens, width, generator=g, device=device).to(dtype) for _ in range(3)]
    base = torch.randn(tokens + 4 * k, width, generator=g, device=device)
    x = torch.stack([base[4 * f:4 * f + tokens] for f in range(k)])
    x = x + 0.5 * torch.randn(x.shape, generator=g, device=device)
    w_qk = torch.randn(width, width, generator=g, device=device) / width ** 0.5
    w_v = torch.randn(width, width, generator=g, device=device) / width ** 0.5
    q = x @ w_qk
    return q.to(dtype), (0.5 * q).to(dtype), (x @ w_v).to(dtype)


def aas_scores_from_keys(keys):
    """Stand-in for DIFT similarity: scores[a, b, j] = best cosine of keyframe b's token j in keyframe a."""
    import torch

    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    k = unit.shape[0]
    return torch.stack([torch.stack([(unit[a] @ unit[b].T).max(0).values for b in range(k)]) for a in range(k)])


def timed(fn, cuda: bool) -> float:
    """Median milliseconds (do_bench on CUDA; a few perf_counter runs elsewhere)."""
    if cuda:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def policy_attention_rows(keyframes: list[int], hw: tuple[int, int], isa, budget: int, generators: list[str]):
    """Extended attention of one edited branch at every SD2.1 level: full, AAS, ISA; time and error vs full
    (error against float32 full attention; full itself runs in the benchmark dtype)."""
    import torch

    from longedit.core.adaflow.attention import aas_selection, extended_attention
    from longedit.core.adaflow.keyframe_isa import keyframe_isa_attention
    from longedit.core.adaflow.keyframes import attention_levels
    from longedit.kernels import subset_attention

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    rows = []
    for generator in generators:
        for k in keyframes:
            kv_budget = budget or matched_budget(k, isa.alpha_s)
            for level, ((h, w), width) in enumerate(zip(attention_levels(*hw), SD21_LEVEL_WIDTHS)):
                heads, tokens = width // 64, h * w
                q, kk, v = keyframe_qkv(k, tokens, width, generator, device, dtype, seed=level)
                reference = extended_attention(q.float(), kk.float(), v.float(), heads)
                selection = aas_selection(aas_scores_from_keys(kk), [(h, w)], 0, kv_budget)[tokens]
                runs = {
                    "full": lambda: extended_attention(q, kk, v, heads),
                    "aas": lambda: subset_attention(q, kk.reshape(-1, width), v.reshape(-1, width), selection, heads),
                    "isa": lambda: keyframe_isa_attention(q, kk, v, heads, isa),
                }
                cells = [generator, str(k), f"{h}x{w}", str(kv_budget)]
                for name, fn in runs.items():
                    try:
                        out = fn()
                        error = ((out.float() - reference).norm() / reference.norm()).item()
                        cells += [f"{timed(fn, cuda):.2f}", f"{error:.2e}"]
                    except torch.cuda.OutOfMemoryError:
                        cells += ["OOM", "-"]
                        torch.cuda.empty_cache()
                print("  " + " | ".join(cells), flush=True)
                rows.append(" | ".join(cells))
                del q, kk, v, reference
    return rows


def policy_step_rows(model, keyframes: list[int], hw, isa, budget: int) -> list[str]:
    """One sampler step of the keyframe pass (ComfyUI's SD2.1 UNet) under each policy: seconds, peak memory,
    and the step's output against the full policy's."""
    import dataclasses

    import torch

    rows = []
    one_step(model, min(keyframes), hw, True, 20)  # warm-up
    for k in keyframes:
        kv_budget = budget or matched_budget(k, isa.alpha_s)
        policies = {"full": dataclasses.replace(isa, policy="full"),
                    "aas": dataclasses.replace(isa, policy="aas", kv_budget=kv_budget), "isa": isa}
        cells, full = [str(k), str(kv_budget)], None
        for name, slimming in policies.items():
            try:
                r = one_step(model, k, hw, True, kv_budget, slimming=slimming, keep_output=True)
                full = r["out"] if name == "full" else full
                error = ((r["out"] - full).norm() / full.norm()).item() if full is not None else float("nan")
                cells += [f"{r['seconds']:.2f}", f"{r['peak'] / 2**30:.1f}", f"{error:.2e}"]
            except torch.cuda.OutOfMemoryError:
                cells += ["OOM", "-", "-"]
                torch.cuda.empty_cache()
        print("  " + " | ".join(cells), flush=True)
        rows.append(" | ".join(cells))
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
    ap.add_argument("--policies-only", action="store_true",
                    help="only the full / AAS / ISA attention comparison (needs no ComfyUI)")
    ap.add_argument("--no-policies", action="store_true", help="skip the full / AAS / ISA comparison")
    ap.add_argument("--policy-keyframes", default="8,16,24")
    ap.add_argument("--policy-budget", type=int, default=0,
                    help="AAS budget in the policy comparison; 0: matched to ISA's kept share (1 + alpha_s (K-1))")
    ap.add_argument("--generators", default="scene,gaussian")
    ap.add_argument("--alpha-s", type=float, default=0.125)
    ap.add_argument("--alpha-f", type=float, default=0.5)
    ap.add_argument("--alpha-ns", type=float, default=0.0625)
    ap.add_argument("--isa-block", type=int, default=64)
    args = ap.parse_args()
    hw = (args.height // 8, args.width // 8)
    if args.policies_only:
        spec = importlib.util.spec_from_file_location("longedit", os.path.join(REPO, "__init__.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["longedit"] = module
        spec.loader.exec_module(module)
    else:
        setup(args.comfy)
    import torch

    from longedit.core.adaflow.slimming import KeyframeSlimming

    isa = KeyframeSlimming(policy="isa", alpha_s=args.alpha_s, alpha_f=args.alpha_f, alpha_ns=args.alpha_ns,
                           block_size=args.isa_block).validate()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    policy_keyframes = [int(x) for x in args.policy_keyframes.split(",")]
    budget_text = str(args.policy_budget) if args.policy_budget else "matched to ISA's kept share"
    if not args.no_policies:
        print("extended attention of one edited branch, per level (generator | K | level | AAS budget | "
              "full ms | full err | AAS ms | AAS err | ISA ms | ISA err):", flush=True)
        attention = policy_attention_rows(policy_keyframes, hw, isa, args.policy_budget, args.generators.split(","))
    if args.policies_only:
        print_policy_attention(attention, args, hw, device, budget_text)
        return 0

    import comfy.sd

    model = comfy.sd.load_checkpoint_guess_config(os.path.join(args.comfy, "models", "checkpoints", CKPT),
                                                  output_vae=False, output_clip=False)[0]
    keyframes = [int(x) for x in args.keyframes.split(",")]
    if not args.no_policies:
        print("one keyframe step per policy (K | AAS budget | full s | GiB | err | AAS s | GiB | err | ISA s | GiB | "
              "err):", flush=True)
        policy_steps = policy_step_rows(model, policy_keyframes, hw, isa, args.policy_budget)
    print("one keyframe step (3 branches: source, uncond, cond):", flush=True)
    steps = step_rows(model, keyframes, hw, args.budget)
    kernels = [] if args.no_kernel or not torch.cuda.is_available() else kernel_rows(args.kernel_keyframes, args.budget)
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
    if not args.no_policies:
        print_policy_attention(attention, args, hw, device, budget_text)
        print(f"\nkeyframe pass, one denoising step per slimming policy, {args.width}x{args.height}, SD2.1 UNet "
              f"(random weights), AAS budget {budget_text}, ISA alpha_s {args.alpha_s} alpha_f {args.alpha_f} "
              f"alpha_ns {args.alpha_ns} block {args.isa_block}, {device}; err: the step's output vs full's:")
        print("keyframes | AAS budget | full s | full GiB | full err | AAS s | AAS GiB | AAS err | ISA s | ISA GiB | "
              "ISA err")
        print("--- | --- | --- | --- | --- | --- | --- | --- | --- | --- | ---")
        print("\n".join(policy_steps))
    return 0


def print_policy_attention(rows: list[str], args, hw, device: str, budget_text: str) -> None:
    import torch

    dtype = "fp16" if torch.cuda.is_available() else "fp32"
    print(f"\nkeyframe pass, extended attention of one edited branch per SD2.1 level, latent {hw[0]}x{hw[1]}, "
          f"{dtype}, {device}; AAS budget {budget_text}; ISA alpha_s {args.alpha_s} alpha_f {args.alpha_f} "
          f"alpha_ns {args.alpha_ns} block {args.isa_block}; err: relative L2 vs float32 full attention:")
    print("generator | keyframes | level | AAS budget | full ms | full err | AAS ms | AAS err | ISA ms | ISA err")
    print("--- | --- | --- | --- | --- | --- | --- | --- | --- | ---")
    print("\n".join(rows))


if __name__ == "__main__":
    sys.exit(main())
