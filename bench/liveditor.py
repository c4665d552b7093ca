"""Benchmark: one LIVEditor-14B model call at 81 frames 960x544, dense vs ISA, on ComfyUI's own Wan.

The full 14B architecture (Wan2.2-T2V-A14B expert + LIVEditor's source embedding and gates, the authors' key
layout from tests/tools/make_random_liveditor.py) is built with RANDOM bf16 weights directly on the GPU (no
file is carried), loaded by ComfyUI's loader and patched by the LIVEditor node's function. Input: target and
source latents of 21 x 68 x 120 (81 frames at 960x544), i.e. [target | source] = 1 x 40 heads x 85,680 tokens.
Rows: dense (ComfyUI's attention: SDPA/cuDNN/Flash on CUDA) + gate, and ISA (before LIVEditor) + gate at a
few alpha_f. Seconds are the median of `--repeats` calls after a warm-up; a sampling step with CFG is two
calls (cond + uncond; the authors run 32 steps). Peak is torch's max allocated GPU memory during the calls
(weights included). "rel. err" is ||out - dense|| / ||dense|| of the model output on the same input (random
weights: it shows the approximation, not picture quality). The gate's own cost (pooled attention, all 40
layers) is timed separately.

Run:  python bench/liveditor.py --comfy /tmp/comfy      (needs one GPU with ~60 GB free, ~4 min)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMES, HEIGHT, WIDTH = 21, 68, 120  # latent grid of 81 frames at 960x544 (Wan VAE: 4x time, 8x space)


def load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfy", default=os.environ.get("COMFYUI_PATH", "/tmp/comfy"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--alpha-f", type=float, nargs="*", default=[0.5, 0.25])
    ap.add_argument("--size", default="14B", help="14B (the bench) or tiny (a smoke run of this script)")
    ap.add_argument("--frames", type=int, default=FRAMES)
    ap.add_argument("--height", type=int, default=HEIGHT)
    ap.add_argument("--width", type=int, default=WIDTH)
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only for a smoke run with --size tiny")
    args = ap.parse_args()
    sys.path.insert(0, args.comfy)
    sys.argv = [sys.argv[0]] + (["--cpu"] if args.device == "cpu" else [])
    import comfy.options

    comfy.options.enable_args_parsing()
    import torch

    import comfy.model_management as mm
    import comfy.sd

    load("longedit", os.path.join(REPO, "__init__.py"))
    from longedit.core.isa.liveditor import liveditor_keys, pooled_attention, weights_from_tensors
    from longedit.core.isa.policy import IsaSettings
    from longedit.nodes.isa_attention import patch_model as patch_isa
    from longedit.nodes.liveditor import patch_liveditor
    tool = load("make_random_liveditor", os.path.join(REPO, "tests", "tools", "make_random_liveditor.py"))

    device = torch.device(args.device)
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()
    t0 = time.perf_counter()
    state = tool.random_state(args.size, seed=0, device=device, dtype=torch.bfloat16)
    sync()
    built = time.perf_counter() - t0
    weights = weights_from_tensors({n: state[k] for n, k in liveditor_keys(state).items()}, "random LIVEditor")
    weights = type(weights)(*(t.cpu() for t in (weights.source_weight, weights.source_bias, weights.gates)))
    t0 = time.perf_counter()
    model = comfy.sd.load_diffusion_model_state_dict(state, model_options={"dtype": torch.bfloat16})
    del state
    if cuda:
        torch.cuda.empty_cache()
    loaded = time.perf_counter() - t0
    params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    print(f"random {args.size} weights built on {device} in {built:.1f} s, ComfyUI model in {loaded:.1f} s: "
          f"{params / 1e9:.2f}B params + {(weights.gates.numel() + weights.source_weight.numel()) / 1e6:.1f}M "
          f"LIVEditor extras", flush=True)

    g = torch.Generator(device=device).manual_seed(0)
    shape = (1, 16, args.frames, args.height, args.width)
    x = torch.randn(shape, generator=g, device=device)
    source = torch.randn(shape, generator=g, device=device)
    sigma = torch.tensor([0.8], device=device)
    context = torch.randn(1, 512, 4096, generator=g, device=device) * 0.1
    tokens = 2 * args.frames * (args.height // 2) * (args.width // 2)
    heads = model.model.diffusion_model.num_heads

    def run(m, repeats):
        mm.load_models_gpu([m])
        options = m.model_options["transformer_options"].copy()
        options["wrappers"] = m.wrappers  # as ComfyUI's sampler passes them
        times, out = [], None
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            for _ in range(repeats + 1):  # the first call warms up (Triton compile, cuDNN plans)
                sync()
                start = time.perf_counter()
                out = m.model.apply_model(x, sigma, c_crossattn=context, time_dim_concat=source,
                                          transformer_options=options)
                sync()
                times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        return sorted(times[1:])[len(times[1:]) // 2], peak, out.float()

    rows = []
    clip = args.frames  # one clip: the whole 81-frame video
    dense_model = patch_liveditor(model, weights, clip_frames=clip, overlap=0)
    seconds, peak, dense_out = run(dense_model, args.repeats)
    rows.append({"attention": "dense (SDPA) + gate", "seconds": seconds, "peak_gib": peak, "rel_err": 0.0})
    print(json.dumps(rows[-1]), flush=True)
    for alpha_f in args.alpha_f:
        settings = IsaSettings(context="second half", alpha_f=alpha_f)
        isa_model = patch_liveditor(patch_isa(model, settings), weights, clip_frames=clip, overlap=0)
        seconds, peak, out = run(isa_model, args.repeats)
        err = ((out - dense_out).norm() / dense_out.norm()).item()
        rows.append({"attention": f"ISA a_s={settings.alpha_s} a_f={alpha_f} a_ns={settings.alpha_ns} + gate",
                     "seconds": seconds, "peak_gib": peak, "rel_err": err})
        print(json.dumps(rows[-1]), flush=True)

    # the gate's pooled attention alone, at one layer's q, k, v shape, times the layer count
    layers = len(model.model.diffusion_model.blocks)
    q, k, v = (torch.randn(1, heads, tokens, 128, generator=g, device=device, dtype=torch.bfloat16) for _ in range(3))
    for _ in range(2):
        sync()
        start = time.perf_counter()
        pooled_attention(q, k, v)
        sync()
        gate_seconds = (time.perf_counter() - start) * layers

    print(f"\nLIVEditor-{args.size}, one model call, 1 x {heads} heads x {tokens:,} tokens "
          f"([target | source], {args.frames} latent frames of {args.height // 2}x{args.width // 2} tokens), bf16, "
          f"{torch.cuda.get_device_name() if cuda else 'CPU'}")
    print("| self-attention | s / call | s / CFG step | speedup | GPU peak GiB | rel. err vs dense |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['attention']} | {row['seconds']:.2f} | {2 * row['seconds']:.2f} | "
              f"{rows[0]['seconds'] / row['seconds']:.2f}x | {row['peak_gib']:.1f} | {row['rel_err']:.4f} |")
    print(f"gate term (block-pooled attention, torch, {layers} layers): {gate_seconds:.3f} s per call")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "gate_seconds": gate_seconds, "tokens": tokens}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
