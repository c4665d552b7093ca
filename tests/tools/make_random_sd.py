"""Write a RANDOM-WEIGHT Stable Diffusion 1.5 or 2.1 checkpoint in the original LDM layout.

ComfyUI's CheckpointLoaderSimple detects the family from key names and tensor shapes, so this file carries
exactly the tensors of a pruned LDM checkpoint (UNet `model.diffusion_model.*`, VAE `first_stage_model.*`,
text encoder `cond_stage_model.*`: CLIP ViT-L/14 for SD1.5, OpenCLIP ViT-H/14 for SD2.1); only the values are
random: conv/linear weights normal(0, 1/sqrt(fan_in)), embeddings normal(0, 0.02), norm scales one, biases
zero. Zero norm biases make ComfyUI read SD2.1 as the epsilon-prediction 2.1-base (512 px). Memory, speed
and every code path behave as with trained weights; pictures are noise.

The layout is written out here from the LDM configurations (no ComfyUI import). Tensors are generated and
written one at a time straight into the safetensors file, so the peak memory is one tensor (~200 MB)
whatever the checkpoint's size (2.0 GiB for SD1.5, 2.4 GiB for SD2.1 in fp16).

    python tests/tools/make_random_sd.py --arch sd21 --out ComfyUI/models/checkpoints/random_sd21.safetensors
    python tests/tools/make_random_sd.py --arch sd15 --out ComfyUI/models/checkpoints/random_sd15.safetensors
"""
from __future__ import annotations

import argparse
import json
import math
import os
import struct
import time
from typing import Iterator

import torch

Layout = Iterator[tuple[str, tuple[int, ...]]]  # (key, shape) in file order

ARCHS = {
    # UNet: cross-attention width and whether SpatialTransformer projects with linear layers (2.x) or
    # 1x1 convolutions (1.x). Text encoder: which one.
    "sd15": dict(context_dim=768, linear_proj=False, text="clip_l"),
    "sd21": dict(context_dim=1024, linear_proj=True, text="open_clip_h"),
}
UNET_CHANNELS, UNET_MULT, UNET_RES_BLOCKS, UNET_ATTN_LEVELS = 320, (1, 2, 4, 4), 2, (0, 1, 2)
VAE_CHANNELS, VAE_MULT, VAE_RES_BLOCKS, LATENT_CHANNELS = 128, (1, 2, 4, 4), 2, 4
VOCAB, CONTEXT_LENGTH = 49408, 77
DTYPES = {"fp16": (torch.float16, "F16"), "fp32": (torch.float32, "F32")}


# --- the layout -----------------------------------------------------------------------------------------
def norm(prefix: str, channels: int) -> Layout:
    yield f"{prefix}.weight", (channels,)
    yield f"{prefix}.bias", (channels,)


def conv(prefix: str, c_out: int, c_in: int, k: int = 3) -> Layout:
    yield f"{prefix}.weight", (c_out, c_in, k, k)
    yield f"{prefix}.bias", (c_out,)


def linear(prefix: str, c_out: int, c_in: int, bias: bool = True) -> Layout:
    yield f"{prefix}.weight", (c_out, c_in)
    if bias:
        yield f"{prefix}.bias", (c_out,)


def unet_resblock(p: str, c_in: int, c_out: int, emb: int) -> Layout:
    yield from norm(f"{p}.in_layers.0", c_in)
    yield from conv(f"{p}.in_layers.2", c_out, c_in)
    yield from linear(f"{p}.emb_layers.1", c_out, emb)
    yield from norm(f"{p}.out_layers.0", c_out)
    yield from conv(f"{p}.out_layers.3", c_out, c_out)
    if c_in != c_out:
        yield from conv(f"{p}.skip_connection", c_out, c_in, 1)


def spatial_transformer(p: str, c: int, context_dim: int, linear_proj: bool) -> Layout:
    project = (lambda q: linear(q, c, c)) if linear_proj else (lambda q: conv(q, c, c, 1))
    yield from norm(f"{p}.norm", c)
    yield from project(f"{p}.proj_in")
    block = f"{p}.transformer_blocks.0"
    for attn, kv_dim in (("attn1", c), ("attn2", context_dim)):
        yield from linear(f"{block}.{attn}.to_q", c, c, bias=False)
        yield from linear(f"{block}.{attn}.to_k", c, kv_dim, bias=False)
        yield from linear(f"{block}.{attn}.to_v", c, kv_dim, bias=False)
        yield from linear(f"{block}.{attn}.to_out.0", c, c)
    yield from linear(f"{block}.ff.net.0.proj", 8 * c, c)  # GEGLU: value and gate of the 4c hidden layer
    yield from linear(f"{block}.ff.net.2", c, 4 * c)
    for i in (1, 2, 3):
        yield from norm(f"{block}.norm{i}", c)
    yield from project(f"{p}.proj_out")


def unet(context_dim: int, linear_proj: bool, p: str = "model.diffusion_model") -> Layout:
    base, emb = UNET_CHANNELS, 4 * UNET_CHANNELS
    attention = lambda q, c: spatial_transformer(q, c, context_dim, linear_proj)  # noqa: E731
    yield from linear(f"{p}.time_embed.0", emb, base)
    yield from linear(f"{p}.time_embed.2", emb, emb)
    yield from conv(f"{p}.input_blocks.0.0", base, 4)
    skips, ch, index = [base], base, 1
    for level, mult in enumerate(UNET_MULT):
        for _ in range(UNET_RES_BLOCKS):
            yield from unet_resblock(f"{p}.input_blocks.{index}.0", ch, mult * base, emb)
            ch = mult * base
            if level in UNET_ATTN_LEVELS:
                yield from attention(f"{p}.input_blocks.{index}.1", ch)
            skips.append(ch)
            index += 1
        if level != len(UNET_MULT) - 1:
            yield from conv(f"{p}.input_blocks.{index}.0.op", ch, ch)  # stride-2 downsampling
            skips.append(ch)
            index += 1
    yield from unet_resblock(f"{p}.middle_block.0", ch, ch, emb)
    yield from attention(f"{p}.middle_block.1", ch)
    yield from unet_resblock(f"{p}.middle_block.2", ch, ch, emb)
    index = 0
    for level, mult in reversed(list(enumerate(UNET_MULT))):
        for i in range(UNET_RES_BLOCKS + 1):
            yield from unet_resblock(f"{p}.output_blocks.{index}.0", ch + skips.pop(), mult * base, emb)
            ch, layer = mult * base, 1
            if level in UNET_ATTN_LEVELS:
                yield from attention(f"{p}.output_blocks.{index}.1", ch)
                layer = 2
            if level and i == UNET_RES_BLOCKS:
                yield from conv(f"{p}.output_blocks.{index}.{layer}.conv", ch, ch)  # upsampling
            index += 1
    yield from norm(f"{p}.out.0", ch)
    yield from conv(f"{p}.out.2", 4, ch)


def vae_resblock(p: str, c_in: int, c_out: int) -> Layout:
    yield from norm(f"{p}.norm1", c_in)
    yield from conv(f"{p}.conv1", c_out, c_in)
    yield from norm(f"{p}.norm2", c_out)
    yield from conv(f"{p}.conv2", c_out, c_out)
    if c_in != c_out:
        yield from conv(f"{p}.nin_shortcut", c_out, c_in, 1)


def vae_middle(p: str, c: int) -> Layout:
    yield from vae_resblock(f"{p}.block_1", c, c)
    yield from norm(f"{p}.attn_1.norm", c)
    for name in ("q", "k", "v", "proj_out"):
        yield from conv(f"{p}.attn_1.{name}", c, c, 1)
    yield from vae_resblock(f"{p}.block_2", c, c)


def vae(p: str = "first_stage_model") -> Layout:
    widths = [VAE_CHANNELS * m for m in VAE_MULT]
    yield from conv(f"{p}.encoder.conv_in", VAE_CHANNELS, 3)
    ch = VAE_CHANNELS
    for level, width in enumerate(widths):
        for j in range(VAE_RES_BLOCKS):
            yield from vae_resblock(f"{p}.encoder.down.{level}.block.{j}", ch, width)
            ch = width
        if level != len(widths) - 1:
            yield from conv(f"{p}.encoder.down.{level}.downsample.conv", ch, ch)
    yield from vae_middle(f"{p}.encoder.mid", ch)
    yield from norm(f"{p}.encoder.norm_out", ch)
    yield from conv(f"{p}.encoder.conv_out", 2 * LATENT_CHANNELS, ch)  # mean and log-variance
    yield from conv(f"{p}.quant_conv", 2 * LATENT_CHANNELS, 2 * LATENT_CHANNELS, 1)
    yield from conv(f"{p}.post_quant_conv", LATENT_CHANNELS, LATENT_CHANNELS, 1)
    ch = widths[-1]
    yield from conv(f"{p}.decoder.conv_in", ch, LATENT_CHANNELS)
    yield from vae_middle(f"{p}.decoder.mid", ch)
    for level in reversed(range(len(widths))):
        for j in range(VAE_RES_BLOCKS + 1):
            yield from vae_resblock(f"{p}.decoder.up.{level}.block.{j}", ch, widths[level])
            ch = widths[level]
        if level:
            yield from conv(f"{p}.decoder.up.{level}.upsample.conv", ch, ch)
    yield from norm(f"{p}.decoder.norm_out", ch)
    yield from conv(f"{p}.decoder.conv_out", 3, ch)


def clip_l(p: str = "cond_stage_model.transformer.text_model") -> Layout:
    """OpenAI CLIP ViT-L/14 text model, Hugging Face names (SD1.x checkpoints)."""
    width, layers = 768, 12
    yield f"{p}.embeddings.token_embedding.weight", (VOCAB, width)
    yield f"{p}.embeddings.position_embedding.weight", (CONTEXT_LENGTH, width)
    for i in range(layers):
        layer = f"{p}.encoder.layers.{i}"
        for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
            yield from linear(f"{layer}.self_attn.{name}", width, width)
        yield from norm(f"{layer}.layer_norm1", width)
        yield from linear(f"{layer}.mlp.fc1", 4 * width, width)
        yield from linear(f"{layer}.mlp.fc2", width, 4 * width)
        yield from norm(f"{layer}.layer_norm2", width)
    yield from norm(f"{p}.final_layer_norm", width)


def open_clip_h(p: str = "cond_stage_model.model") -> Layout:
    """OpenCLIP ViT-H/14 text tower, open_clip names (SD2.x checkpoints)."""
    width, layers = 1024, 24
    yield f"{p}.positional_embedding", (CONTEXT_LENGTH, width)
    yield f"{p}.text_projection", (width, width)
    yield f"{p}.logit_scale", ()
    yield f"{p}.token_embedding.weight", (VOCAB, width)
    for i in range(layers):
        block = f"{p}.transformer.resblocks.{i}"
        yield from norm(f"{block}.ln_1", width)
        yield f"{block}.attn.in_proj_weight", (3 * width, width)  # q, k, v stacked
        yield f"{block}.attn.in_proj_bias", (3 * width,)
        yield from linear(f"{block}.attn.out_proj", width, width)
        yield from norm(f"{block}.ln_2", width)
        yield from linear(f"{block}.mlp.c_fc", 4 * width, width)
        yield from linear(f"{block}.mlp.c_proj", width, 4 * width)
    yield from norm(f"{p}.ln_final", width)


def layout(arch: str) -> list[tuple[str, tuple[int, ...]]]:
    spec = ARCHS[arch]
    text = clip_l() if spec["text"] == "clip_l" else open_clip_h()
    return [*unet(spec["context_dim"], spec["linear_proj"]), *vae(), *text]


# --- the values and the file ---------------------------------------------------------------------------
def random_tensor(key: str, shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    leaf = key.rsplit(".", 1)[-1]
    if len(shape) == 0 or leaf == "bias" or leaf.endswith("_bias"):
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1:  # norm scales
        return torch.ones(shape, dtype=dtype)
    if "embedding" in key:
        std = 0.02
    else:
        std = 1.0 / math.sqrt(math.prod(shape[1:]))  # fan-in of a linear or convolution weight
    return torch.randn(shape, generator=generator, dtype=torch.float32).mul_(std).to(dtype)


def write_safetensors(path: str, entries: list[tuple[str, tuple[int, ...]]], make, dtype_name: str,
                      itemsize: int, metadata: dict[str, str]) -> None:
    """The safetensors format written tensor by tensor: 8-byte header length, JSON header, raw data."""
    header, offset = {"__metadata__": metadata}, 0
    for key, shape in entries:
        size = math.prod(shape) * itemsize
        header[key] = {"dtype": dtype_name, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    partial = f"{path}.partial"
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for key, shape in entries:
            f.write(make(key, shape).reshape(-1).view(torch.uint8).numpy().tobytes())
    os.replace(partial, path)  # never leave a truncated checkpoint under the final name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHS), required=True)
    parser.add_argument("--out", required=True, help="the .safetensors file to write (its folder is created)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rewrite the file when it exists")
    args = parser.parse_args()
    if os.path.exists(args.out) and not args.force:
        print(f"exists: {args.out}")
        return 0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    start = time.time()
    dtype, dtype_name = DTYPES[args.dtype]
    generator = torch.Generator().manual_seed(args.seed)
    entries = layout(args.arch)
    write_safetensors(args.out, entries, lambda key, shape: random_tensor(key, shape, generator, dtype),
                      dtype_name, torch.tensor([], dtype=dtype).element_size(),
                      {"note": f"random weights, {args.arch} LDM layout, seed {args.seed}; not a trained model"})
    params = sum(math.prod(shape) for _, shape in entries)
    print(f"wrote {args.out}: {len(entries)} tensors, {params / 1e6:.0f}M parameters, "
          f"{os.path.getsize(args.out) / 2**30:.2f} GiB, {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
