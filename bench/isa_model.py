"""Benchmark: one forward of a random-weight Wan2.1-1.3B at the 65,520-token in-context layout, dense vs ISA.

The model is ComfyUI's own Wan (loaded by ComfyUI's loader from a random-weight file with the real
architecture, bf16); the input is 42 latent frames of 60x104 (two 81-frame 480p videos side by side in time:
[generated | source]), so self-attention sees 65,520 tokens with the source as the second half. Timings are
the median of several forwards after a warm-up; the attention speedup shows end to end.

Run:  python bench/isa_model.py --comfy /tmp/comfyui      (makes the random Wan file if it is missing)
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfy", default=os.environ.get("COMFYUI_PATH", "/tmp/comfyui"))
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    wan = os.path.join(args.comfy, "models", "diffusion_models", "random_wan21_1.3B.safetensors")
    if not os.path.exists(wan):
        subprocess.run([sys.executable, os.path.join(REPO, "tests", "tools", "make_random_wan.py"), "--comfy", args.comfy],
                       check=True)
    sys.path.insert(0, args.comfy)
    sys.argv = [sys.argv[0]]
    import comfy.options

    comfy.options.enable_args_parsing()
    import torch

    import comfy.model_management as mm
    import comfy.sd

    spec = importlib.util.spec_from_file_location("longedit", os.path.join(REPO, "__init__.py"))
    pack = importlib.util.module_from_spec(spec)
    sys.modules["longedit"] = pack
    spec.loader.exec_module(pack)
    from longedit.core.isa.policy import IsaSettings
    from longedit.nodes.isa_attention import patch_model

    model = comfy.sd.load_diffusion_model(wan, model_options={"dtype": torch.bfloat16})
    x = torch.randn(1, 16, 42, 60, 104, device="cuda")
    sigma = torch.tensor([0.8], device="cuda")
    context = torch.randn(1, 512, 4096, device="cuda") * 0.1

    def forward_seconds(m) -> float:
        mm.load_models_gpu([m])
        options = m.model_options["transformer_options"].copy()
        times = []
        with torch.no_grad():
            for _ in range(args.repeats + 1):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                m.model.apply_model(x, sigma, c_crossattn=context, transformer_options=options)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        return sorted(times[1:])[len(times[1:]) // 2]

    dense = forward_seconds(model)
    isa_model = patch_model(model, IsaSettings(context="second half"))
    sparse = forward_seconds(isa_model)
    counts = isa_model.model_options["transformer_options"]["optimized_attention_override"].isa.counts
    print(f"self-attention calls through ISA: {counts}")
    print(f"\nWan2.1-1.3B (random weights, bf16), 65,520 tokens (42 latent frames 60x104, source = 2nd half), "
          f"one forward, median of {args.repeats}, {torch.cuda.get_device_name()}")
    print("attention | seconds per forward | speedup")
    print("--- | --- | ---")
    print(f"dense (ComfyUI's attention) | {dense:.3f} | 1.00x")
    print(f"ISA (alpha_s 0.125, alpha_f 0.5, alpha_ns 0.0625) | {sparse:.3f} | {dense / sparse:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
