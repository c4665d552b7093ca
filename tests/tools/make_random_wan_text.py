"""Write a RANDOM-WEIGHT umt5-xxl text encoder (fp8) and Wan 2.1 VAE that ComfyUI's own loaders accept.

Wan's text encoder is umt5-xxl (5.68B parameters): 11.4 GB in bf16, 5.7 GB in float8_e4m3fn, which
ComfyUI's CLIPLoader (type "wan") accepts as is (it detects the encoder from key names and shapes, and takes
the weight dtype from the file). Values are random: normal(0, 0.05) for weights, ones for norm scales.
The tokenizer, which ComfyUI reads from the file's `spiece_model` tensor, is a small SentencePiece model
trained here on generated text (no download); its ids are a subset of umt5's 256,384-row embedding.

The 5.7 GB are written tensor by tensor into the safetensors file from one shared pool of random fp8 bytes
(each tensor starts at another offset of it), so the writer needs little RAM and runs at disk speed.

The Wan 2.1 VAE is built with ComfyUI's own module class (random init, float16, 0.25 GB).

    python tests/tools/make_random_wan_text.py --comfy /tmp/comfyui
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import tempfile
import time

TEXT_ENCODER = "random_umt5_xxl_fp8_e4m3fn.safetensors"
VAE = "random_wan21_vae.safetensors"
UMT5 = dict(d_model=4096, d_ff=10240, heads=64, layers=24, vocab=256384, buckets=32)
POOL_BYTES = 64 * 2**20
WEIGHT_STD = 0.05


def umt5_tensors() -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) of a standalone umt5-xxl encoder file, as ComfyUI's Wan text encoder loads it."""
    c = UMT5
    out = [("shared.weight", (c["vocab"], c["d_model"]), "weight")]
    for i in range(c["layers"]):
        attn = f"encoder.block.{i}.layer.0."
        out += [(attn + f"SelfAttention.{p}.weight", (c["d_model"], c["d_model"]), "weight") for p in "qkvo"]
        # umt5 keeps a relative position bias in every block (T5 only in the first)
        out += [(attn + "SelfAttention.relative_attention_bias.weight", (c["buckets"], c["heads"]), "weight"),
                (attn + "layer_norm.weight", (c["d_model"],), "norm")]
        ff = f"encoder.block.{i}.layer.1."
        out += [(ff + "DenseReluDense.wi_0.weight", (c["d_ff"], c["d_model"]), "weight"),
                (ff + "DenseReluDense.wi_1.weight", (c["d_ff"], c["d_model"]), "weight"),
                (ff + "DenseReluDense.wo.weight", (c["d_model"], c["d_ff"]), "weight"),
                (ff + "layer_norm.weight", (c["d_model"],), "norm")]
    out.append(("encoder.final_layer_norm.weight", (c["d_model"],), "norm"))
    return out


def train_tokenizer() -> bytes:
    """A small real SentencePiece model (pad 0, eos 1, unk 2, as umt5) trained on generated sentences."""
    import random

    import sentencepiece as spm

    words = ("a the video of cat dog car city street night day rain snow painting watercolor oil style "
             "person walking running red blue green light dark camera moving slowly fast tree river sky "
             "mountain house road bird flying sea beach sunset winter summer bright colorful cinematic").split()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        with open(corpus, "w") as f:
            for _ in range(4000):
                f.write(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + "\n")
        prefix = os.path.join(tmp, "spm")
        spm.SentencePieceTrainer.train(input=corpus, model_prefix=prefix, vocab_size=256, model_type="unigram",
                                       pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
                                       minloglevel=2)
        with open(prefix + ".model", "rb") as f:
            return f.read()


def random_pool(seed: int):
    """POOL_BYTES of float8_e4m3fn values drawn from normal(0, WEIGHT_STD), as raw bytes."""
    import torch

    g = torch.Generator().manual_seed(seed)
    values = torch.randn(POOL_BYTES, generator=g) * WEIGHT_STD
    return values.to(torch.float8_e4m3fn).view(torch.uint8).numpy().tobytes()


def write_text_encoder(path: str, seed: int) -> None:
    import numpy as np
    import torch

    spiece = train_tokenizer()
    tensors = umt5_tensors()
    header, offset = {}, 0
    for name, shape, _ in tensors:
        size = int(np.prod(shape))
        header[name] = {"dtype": "F8_E4M3", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["spiece_model"] = {"dtype": "U8", "shape": [len(spiece)], "data_offsets": [offset, offset + len(spiece)]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
    pool = random_pool(seed)
    one = torch.ones(1).to(torch.float8_e4m3fn).view(torch.uint8).item()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        start = 0
        for name, shape, kind in tensors:
            size = int(np.prod(shape))
            if kind == "norm":
                f.write(bytes([one]) * size)
                continue
            while size:  # the pool, read from a rotating start, tiles each tensor
                part = min(size, POOL_BYTES - start)
                f.write(pool[start:start + part])
                size -= part
                start = (start + part) % POOL_BYTES
            start = (start + 7919 * 4099) % POOL_BYTES  # the next tensor begins elsewhere in the pool
        f.write(spiece)


def write_vae(path: str, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    import comfy.ldm.wan.vae as wan_vae

    torch.manual_seed(seed)
    # Wan 2.1's configuration, as ComfyUI's VAE loader builds it for these keys
    model = wan_vae.WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                           temperal_downsample=[False, True, True], dropout=0.0)
    state = {}
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("bias"):
                value = torch.zeros_like(tensor)
            elif "gamma" in name or tensor.ndim == 1:
                value = torch.ones_like(tensor)
            else:
                value = torch.randn(tensor.shape) * 0.02
            state[name] = value.to(torch.float16).contiguous()
    save_file(state, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfy", default=os.environ.get("COMFYUI_PATH", "/tmp/comfyui"))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    sys.path.insert(0, os.path.abspath(a.comfy))
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    targets = [(os.path.join(a.comfy, "models", "text_encoders", TEXT_ENCODER), write_text_encoder),
               (os.path.join(a.comfy, "models", "vae", VAE), write_vae)]
    for path, write in targets:
        if os.path.exists(path):
            print(f"exists: {path}")
            continue
        t0 = time.time()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write(path + ".partial", a.seed)
        os.replace(path + ".partial", path)
        print(f"wrote {path}: {os.path.getsize(path) / 1e9:.2f} GB in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
