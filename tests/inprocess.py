"""ComfyUI in-process, for the integration tests that drive our node functions directly (chunking, caches,
Ray workers, attention policies): the test runs a script with ComfyUI's Python in its checkout, and the
script boots ComfyUI on the CPU, imports this pack and builds small random-weight models with the helpers
below (this file is importable there: `run_in_comfy` puts tests/ on the script's path)."""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A small SD2.x UNet (ComfyUI's SD20 config: linear transformers, 64-channel heads), for random weights.
SMALL_SD2_UNET = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True,
                      legacy=False, adm_in_channels=None, in_channels=4, model_channels=64,
                      num_res_blocks=[2, 2, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                      channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
                      transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], use_temporal_attention=False,
                      use_temporal_resblock=False, use_linear_in_transformer=True, context_dim=64)


# ------------------------------------------------------------------------------------ the test's side
def run_in_comfy(script: str, timeout: float = 900, env: dict | None = None, checkpoint: bool = False,
                 **constants) -> str:
    """Run `script` with ComfyUI's Python (COMFYUI_VENV, else this one) in the COMFYUI_PATH checkout, with REPO
    and `constants` defined (and CKPT, the random SD2.1 checkpoint written when missing, with `checkpoint`);
    it must print OK last. Skips without a checkout (CI turns such skips into failures). Returns its stdout."""
    import pytest
    from comfy_harness import CKPT, ensure_checkpoint

    root = os.environ.get("COMFYUI_PATH")
    if not root or not (Path(root) / "main.py").exists():
        pytest.skip("integration tier: COMFYUI_PATH is not set (a ComfyUI checkout; see README 'Tests')")
    venv = os.environ.get("COMFYUI_VENV")
    python = str(Path(venv) / "bin" / "python") if venv else sys.executable
    if checkpoint:
        ensure_checkpoint(Path(root), python)
        constants["CKPT"] = CKPT
    header = f"import sys\nsys.path.insert(0, {str(REPO / 'tests')!r})\nREPO = {str(REPO)!r}\n"
    header += "".join(f"{name} = {value!r}\n" for name, value in constants.items())
    result = subprocess.run([python, "-c", header + script], cwd=root, capture_output=True, text=True,
                            timeout=timeout, env=env)
    print(result.stdout)
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout[-3000:] + result.stderr[-6000:]
    return result.stdout


# ---------------------------------------------------------------------------------- the script's side
def boot_cpu_comfy() -> None:
    """ComfyUI's arguments parsed as `main.py --cpu` would, before anything imports comfy.model_management."""
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()


def import_pack(repo: str):
    """This pack as ComfyUI loads a custom node (a package from its folder), named `longedit_pack`."""
    spec = importlib.util.spec_from_file_location("longedit_pack", os.path.join(repo, "__init__.py"))
    pack = importlib.util.module_from_spec(spec)
    sys.modules["longedit_pack"] = pack
    spec.loader.exec_module(pack)
    return pack


def random_init_(module, generator=None) -> None:
    """Weights N(0, 1/fan_in), biases N(0, 0.02), norm scales 1: activations keep their scale through depth."""
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.numel() == 0:
                continue
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p[0].numel()))
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
            else:
                p.fill_(1.0)


def small_sd2_model(seed: int | None = None):
    """(BaseModel, ModelPatcher on the CPU) of SMALL_SD2_UNET in float32 with random weights; `seed` gives
    its own generator (else torch's global one)."""
    import comfy.model_patcher
    import comfy.supported_models as sm
    import torch

    config = sm.SD20(dict(SMALL_SD2_UNET, dtype=torch.float32))
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({})
    random_init_(base.diffusion_model, None if seed is None else torch.Generator().manual_seed(seed))
    cpu = torch.device("cpu")
    return base, comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)
