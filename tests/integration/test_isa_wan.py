"""ISA Sparse Attention on a random-weight Wan2.1-1.3B loaded by ComfyUI's own loader (in-process)."""
import os
import subprocess
from pathlib import Path

import pytest

from comfy_harness import REPO, _comfy_python

SCRIPT = r'''
import importlib.util, os, sys
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import torch, comfy.sd, comfy.sample

spec = importlib.util.spec_from_file_location("longedit_pack", os.path.join(REPO, "__init__.py"))
pack = importlib.util.module_from_spec(spec); sys.modules["longedit_pack"] = pack; spec.loader.exec_module(pack)
from longedit_pack.nodes.isa_attention import patch_model
from longedit_pack.core.isa.policy import IsaSettings
from longedit_pack.core.errors import LongEditError

model = comfy.sd.load_diffusion_model(WAN)  # ComfyUI's own loader detects Wan from the keys
assert type(model.model.model_config).__name__ == "WAN21_T2V", type(model.model.model_config).__name__
before = repr(model.model_options)
layers = len(model.model.diffusion_model.blocks)

g = torch.Generator().manual_seed(0)
latent = torch.randn(1, 16, 4, 16, 16, generator=g)  # 4 latent frames of 8x8 tokens: 256 tokens
text = [[0.1 * torch.randn(1, 512, 4096, generator=g), {}]]
empty = [[0.1 * torch.randn(1, 512, 4096, generator=g), {}]]

# 1. A short sampling run with ISA (context = second half, as in [generated | source] layouts).
settings = IsaSettings(context="second half", block_size=16, backend="torch", exact_blocks=2)
patched = patch_model(model, settings)
isa = patched.model_options["transformer_options"]["optimized_attention_override"].isa
out = comfy.sample.sample(patched, torch.randn(latent.shape, generator=g), 2, 5.0, "euler", "simple", text, empty,
                          latent, denoise=1.0, seed=0)
assert out.shape == latent.shape and torch.isfinite(out).all()
forwards = (isa.counts["isa"] + isa.counts["exact_self"]) // layers
assert forwards >= 2 and isa.counts["exact_self"] == 2 * forwards, isa.counts   # exact_blocks=2 per forward
assert isa.counts["cross"] == layers * forwards, isa.counts  # every cross-attention passed through untouched
assert repr(model.model_options) == before and "optimized_attention_override" not in before

# 2. With alpha_f = alpha_s = 1 ISA is exact attention: the patched model's prediction equals the original's.
exact = patch_model(model, IsaSettings(context="second half", block_size=16, backend="torch", alpha_f=1.0, alpha_s=1.0))
x = torch.randn(latent.shape, generator=g)
sigma = torch.tensor([0.7])
ctx = text[0][0]
import comfy.model_management as mm
def predict(m):
    mm.load_models_gpu([m])
    opts = m.model_options["transformer_options"].copy()
    return m.model.apply_model(x, sigma, c_crossattn=ctx, transformer_options=opts).float()
reference, approx = predict(model), predict(exact)
err = ((approx - reference).norm() / reference.norm()).item()
assert err < 1e-3, err

# 3. Another pack's attention override keeps running for what ISA does not take (cross-attention).
seen = []
def other_override(func, *args, **kwargs):
    seen.append(args[1].shape[1])
    return func(*args, **kwargs)
other = model.clone()
other.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = other_override
chained = patch_model(other, settings)
predict(chained)
# per forward: every cross-attention (512 text tokens) and the 2 exact self-attention layers (256 tokens)
assert seen.count(512) == layers and seen.count(256) == settings.exact_blocks and len(seen) == layers + 2, seen

# 4. Other families: a clear error, or pass-through by explicit choice.
import types, comfy.supported_models
sd = types.SimpleNamespace(model=types.SimpleNamespace(model_config=comfy.supported_models.SD20({})))
try:
    patch_model(sd, settings)
    raise AssertionError("an SD2 model was accepted")
except LongEditError as e:
    assert "Wan family" in str(e), e
assert patch_model(sd, settings, "pass through unchanged") is sd
print("OK", isa.counts, "exact-mode rel err", err)
'''


def test_isa_patches_wan_and_sampling_completes():
    root = os.environ.get("COMFYUI_PATH")
    if not root or not (Path(root) / "main.py").exists():
        pytest.skip("integration tier: COMFYUI_PATH is not set (a ComfyUI checkout; see README 'Tests')")
    python = _comfy_python(Path(root))
    wan = Path(root) / "models" / "diffusion_models" / "random_wan21_1.3B.safetensors"
    if not wan.exists():
        subprocess.run([python, str(REPO / "tests" / "tools" / "make_random_wan.py"), "--comfy", root], check=True)
    code = f"REPO = {str(REPO)!r}\nWAN = {str(wan)!r}\n" + SCRIPT
    result = subprocess.run([python, "-c", code], cwd=root, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout[-3000:] + result.stderr[-6000:]
