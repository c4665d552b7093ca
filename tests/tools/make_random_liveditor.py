"""Write a RANDOM-WEIGHT LIVEditor checkpoint in the authors' key layout (their WanModel's state_dict).

The layout is Wan's (what ComfyUI's loader detects as a Wan 2.1/2.2 T2V model) plus LIVEditor's additions:
`source_video_embedding_more_memory.{weight,bias}` (the source video's patch embedding) and, in every
attention module, `alpha_1.weight` and `alpha_2.weight` [1, dim] (the authors' attention class also gives them
to cross-attention; only self-attention's alpha_1 is used). Names and shapes are listed here from the
authors' model definition, independently of ComfyUI, so ComfyUI loading the file checks that the layouts agree.
Only values are random: normal(0, 1/fan-in) matrices (so attention, positions and gates visibly change the
output, as in a trained model), ones for norm scales, normal(0, 0.02) biases, gate rows normal(0, 2/sqrt(dim))
so the gates are far from 0. No ComfyUI needed.

    python tests/tools/make_random_liveditor.py --out /tmp/liveditor_tiny.safetensors            # reduced
    python tests/tools/make_random_liveditor.py --size 14B --out ...                              # 57 GB fp32
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

SIZES = {
    # head dim must stay 128: ComfyUI reads the head count as dim // 128
    "tiny": dict(dim=256, ffn_dim=384, num_layers=3),
    "14B": dict(dim=5120, ffn_dim=13824, num_layers=40),  # Wan2.2-T2V-A14B, LIVEditor-14B's base
}
IN_DIM, OUT_DIM, TEXT_DIM, FREQ_DIM, PATCH = 16, 16, 4096, 256, (1, 2, 2)


def key_shapes(dim: int, ffn_dim: int, num_layers: int) -> dict[str, tuple]:
    """Every tensor of LIVEditor's WanModel (t2v) with its shape."""
    shapes = {
        "patch_embedding.weight": (dim, IN_DIM, *PATCH), "patch_embedding.bias": (dim,),
        "source_video_embedding_more_memory.weight": (dim, IN_DIM, *PATCH),
        "source_video_embedding_more_memory.bias": (dim,),
        "text_embedding.0.weight": (dim, TEXT_DIM), "text_embedding.0.bias": (dim,),
        "text_embedding.2.weight": (dim, dim), "text_embedding.2.bias": (dim,),
        "time_embedding.0.weight": (dim, FREQ_DIM), "time_embedding.0.bias": (dim,),
        "time_embedding.2.weight": (dim, dim), "time_embedding.2.bias": (dim,),
        "time_projection.1.weight": (6 * dim, dim), "time_projection.1.bias": (6 * dim,),
        "head.head.weight": (OUT_DIM * 4, dim), "head.head.bias": (OUT_DIM * 4,), "head.modulation": (1, 2, dim),
    }
    for i in range(num_layers):
        b = f"blocks.{i}."
        for attn in ("self_attn", "cross_attn"):
            for lin in "qkvo":
                shapes[f"{b}{attn}.{lin}.weight"] = (dim, dim)
                shapes[f"{b}{attn}.{lin}.bias"] = (dim,)
            shapes[f"{b}{attn}.norm_q.weight"] = (dim,)
            shapes[f"{b}{attn}.norm_k.weight"] = (dim,)
            shapes[f"{b}{attn}.alpha_1.weight"] = (1, dim)
            shapes[f"{b}{attn}.alpha_2.weight"] = (1, dim)
        shapes.update({f"{b}norm3.weight": (dim,), f"{b}norm3.bias": (dim,),
                       f"{b}ffn.0.weight": (ffn_dim, dim), f"{b}ffn.0.bias": (ffn_dim,),
                       f"{b}ffn.2.weight": (dim, ffn_dim), f"{b}ffn.2.bias": (dim,),
                       f"{b}modulation": (1, 6, dim)})
    return shapes


def random_value(name: str, shape: tuple, dim: int, generator: torch.Generator, device="cpu",
                 dtype=torch.float32) -> torch.Tensor:
    if "norm" in name and name.endswith("weight"):
        return torch.ones(shape, dtype=dtype, device=device)
    if ".alpha_" in name:
        std = 2.0 / dim ** 0.5
    elif name.endswith("modulation"):
        std = dim ** -0.5  # as the authors initialise it
    elif len(shape) >= 2:  # matrices and convolutions: 1/sqrt(fan-in) keeps activations O(1) through the blocks
        std = 1.0 / math.prod(shape[1:]) ** 0.5
    else:
        std = 0.02
    return (torch.randn(shape, generator=generator, device=device) * std).to(dtype)


def random_state(size: str = "tiny", seed: int = 0, device="cpu", dtype=torch.float32) -> dict[str, torch.Tensor]:
    config = SIZES[size]
    generator = torch.Generator(device=device).manual_seed(seed)
    return {name: random_value(name, shape, config["dim"], generator, device, dtype)
            for name, shape in key_shapes(**config).items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    from safetensors.torch import save_file

    state = random_state(a.size, a.seed)
    save_file(state, a.out)
    print(f"wrote {a.out}: {len(state)} tensors, {sum(t.numel() for t in state.values()) / 1e6:.1f}M params")
    return 0


if __name__ == "__main__":
    sys.exit(main())
