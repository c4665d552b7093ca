"""Write a RANDOM-WEIGHT Wan 2.1 diffusion model (real architecture) that ComfyUI's own loader accepts.

ComfyUI detects Wan from key names and shapes, so the file carries the real module layout; only values are
random (normal(0, 0.02) for weights, ones for norm scales, zeros for biases). Built with ComfyUI's own Wan
module class, used as a library from a ComfyUI checkout. Speed and memory do not depend on values.

    python tests/tools/make_random_wan.py --comfy /tmp/comfyui            # 1.3B -> models/diffusion_models/
    python tests/tools/make_random_wan.py --comfy /tmp/comfyui --size 14B
"""
from __future__ import annotations

import argparse
import os
import sys
import time

SIZES = {  # Wan 2.1 text-to-video configurations
    "1.3B": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "14B": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--comfy", default=os.environ.get("COMFYUI_PATH", "/tmp/comfyui"))
    ap.add_argument("--size", choices=sorted(SIZES), default="1.3B")
    ap.add_argument("--out", default=None)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out = a.out or os.path.join(a.comfy, "models", "diffusion_models", f"random_wan21_{a.size}.safetensors")
    if os.path.exists(out):
        print(f"exists: {out}")
        return 0
    sys.path.insert(0, os.path.abspath(a.comfy))
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import torch
    from safetensors.torch import save_file

    import comfy.ldm.wan.model as wan
    import comfy.ops

    t0 = time.time()
    torch.manual_seed(a.seed)
    model = wan.WanModel(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, freq_dim=256,
                         text_dim=4096, out_dim=16, window_size=(-1, -1), qk_norm=True, cross_attn_norm=True,
                         eps=1e-6, device="cpu", dtype=torch.float16, operations=comfy.ops.disable_weight_init,
                         **SIZES[a.size])
    state = {}
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("bias"):
                value = torch.zeros_like(tensor, dtype=torch.float32)
            elif tensor.ndim == 1 or "norm" in name:
                value = torch.ones_like(tensor, dtype=torch.float32)
            else:
                value = torch.randn(tensor.shape) * 0.02
            state[name] = value.to(torch.float16).contiguous()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    save_file(state, out + ".partial")
    os.replace(out + ".partial", out)
    params = sum(t.numel() for t in state.values())
    print(f"wrote {out}: {len(state)} tensors, {params / 1e9:.2f}B params, {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
