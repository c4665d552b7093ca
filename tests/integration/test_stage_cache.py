"""AdaFlow Invert and AdaFlow Keyframe Selection keep their results on disk: queued again (in a new process,
after a crash or a restart) with the same inputs they load them and never call the model, giving the same
bits; a changed latent, model, weight patch, prompt or setting computes afresh; a damaged entry is detected
and recomputed, never used.

Runs ComfyUI in-process on the CPU with a small random-weight SD2.x UNet (ComfyUI's SD20 config), 19 frames
(more than 16) of 4x7 latents (odd width), clips of at most 7 frames with 3 candidates (so several clips,
levels and candidate slots). The model's calls are counted with a forward hook on the UNet."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import copy, importlib.util, logging, math, os, sys, tempfile
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import numpy as np
import torch
import comfy.model_management as mm
import comfy.model_patcher, comfy.supported_models as sm

spec = importlib.util.spec_from_file_location("longedit_pack", os.path.join(REPO, "__init__.py"))
pack = importlib.util.module_from_spec(spec); sys.modules["longedit_pack"] = pack; spec.loader.exec_module(pack)
import longedit_pack.nodes.adaflow_keyframes as keys_node
import longedit_pack.nodes.adaflow_invert as invert_node
import longedit_pack.core.adaflow.inversion as core_inversion
import longedit_pack.core.adaflow.keyframes as core_keyframes
import longedit_pack.core.stage_cache as core_stage_cache
from longedit_pack.core.resume import Fingerprint
from longedit_pack.core.stage_cache import StageCache
from longedit_pack.nodes.comfy_glue import add_model_identity

torch.set_grad_enabled(False)
FRAMES, STEPS = 19, 3
messages = []


class Collect(logging.Handler):
    def emit(self, record):
        messages.append(record.getMessage())


logging.getLogger().addHandler(Collect())
logging.getLogger().setLevel(logging.INFO)


def init_(module, seed):
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.numel() == 0:
            continue
        if p.ndim >= 2:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
        elif name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        else:
            p.fill_(1.0)


unet = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
            adm_in_channels=None, dtype=torch.float32, in_channels=4, model_channels=64, num_res_blocks=[2, 2, 2, 2],
            transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
            transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], use_temporal_attention=False,
            use_temporal_resblock=False, use_linear_in_transformer=True, context_dim=64)
cpu = torch.device("cpu")


def build(seed):
    config = sm.SD20(unet)
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({})
    init_(base.diffusion_model, seed)
    return base, comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)


base, model = build(0)
calls = []
base.diffusion_model.register_forward_pre_hook(lambda module, args: calls.append(1))
latents = torch.randn(FRAMES, 4, 4, 7, generator=torch.Generator().manual_seed(1)) * 5
prompt = [[torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(2)), {}]]
cache_folder = tempfile.mkdtemp()
invert_node.cache_dir = keys_node.cache_dir = lambda: cache_folder
INVERT = dict(steps=STEPS, scheduler="ddim_uniform", inversion_steps=5)
SELECT = dict(tau_mean=0.0, tau_region=0.0, max_clip_length=7, feature_timestep=50, ensemble=2,
              candidates_per_clip=3, seed=1)


def invert(model=model, latents=latents, prompt=prompt, **changes):
    settings = {**INVERT, **changes}
    out = invert_node.AdaFlowInvert.execute(model, {"samples": latents}, prompt, settings["steps"],
                                            settings["scheduler"], inversion_steps=settings["inversion_steps"])
    return out.args


def select(model=model, latents=latents, prompt=prompt, **changes):
    s = {**SELECT, **changes}
    out = keys_node.AdaFlowKeyframeSelection.execute(model, s["tau_mean"], s["tau_region"], s["max_clip_length"],
                                                     s["feature_timestep"], s["ensemble"], s["candidates_per_clip"],
                                                     s["seed"], latent={"samples": latents}, empty_prompt=prompt)
    return out.args


def counted(fn):
    calls.clear()
    messages.clear()
    result = fn()
    return result, len(calls), list(messages)


INV_MSG = "LongEdit: AdaFlow Invert: using the inversion saved by an earlier run"
KEY_MSG = "LongEdit: AdaFlow Keyframe Selection: using the keyframe plan saved by an earlier run"


def same_inversion(a, b):
    (start_a, inv_a), (start_b, inv_b) = a, b
    assert torch.equal(start_a["samples"], start_b["samples"])
    for name in ("sigmas", "grid", "trajectory", "start"):
        x, y = getattr(inv_a, name), getattr(inv_b, name)
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), name
    assert torch.equal(inv_a.source_context, inv_b.source_context)


def same_plan(a, b):
    plan_a, plan_b = a[0], b[0]
    assert (plan_a.frame_count, plan_a.latent_size, plan_a.levels, plan_a.params) == \
           (plan_b.frame_count, plan_b.latent_size, plan_b.levels, plan_b.params)
    for name in ("clip_starts", "candidates", "aas_scores", "fingerprint"):
        x, y = getattr(plan_a, name), getattr(plan_b, name)
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), name
    assert len(plan_a.matches) == len(plan_b.matches) == 4
    for level, (x, y) in enumerate(zip(plan_a.matches, plan_b.matches)):
        assert x.dtype == y.dtype == np.int32 and np.array_equal(x, y), level
    assert [plan_a.keyframes(s).tolist() for s in range(4)] == [plan_b.keyframes(s).tolist() for s in range(4)]
    assert torch.equal(a[1], b[1]) and a[2] == b[2]  # preview and summary


# ---- first run computes, the second loads and never calls the model ----
first_inv, n, log = counted(invert)
assert n > 0 and INV_MSG not in log, (n, log)
first_plan, n, log = counted(select)
assert n > 0 and KEY_MSG not in log, (n, log)
assert first_plan[0].clip_count == 3 and first_plan[0].per_clip == 3, first_plan[0].clip_starts
assert sorted(f.split("-")[0] for f in os.listdir(cache_folder)) == ["inversion", "keyframes"]
again_inv, n, log = counted(invert)
assert n == 0 and INV_MSG in log, (n, log)
same_inversion(first_inv, again_inv)
again_plan, n, log = counted(select)
assert n == 0 and KEY_MSG in log, (n, log)
same_plan(first_plan, again_plan)
print("second run: inversion and keyframe plan loaded from the cache, no model call, identical results")

# ---- large results: computed into memory-mapped files, then read from the cache file, scratch removed ----
core_inversion.ON_DISK_BYTES = core_keyframes.ON_DISK_BYTES = core_stage_cache.IN_RAM_BYTES = 0
cache_folder = tempfile.mkdtemp()
scratch = invert_node.scratch_dir()
before = set(os.listdir(scratch))
mapped_inv, n, _ = counted(invert)
mapped_plan, m, _ = counted(select)
assert n > 0 and m > 0
assert isinstance(mapped_inv[1].trajectory, np.memmap) and mapped_inv[1].path.startswith(cache_folder)
assert all(isinstance(x, np.memmap) for x in mapped_plan[0].matches)
assert set(os.listdir(scratch)) == before, set(os.listdir(scratch)) - before  # no scratch copy left
same_inversion(first_inv, mapped_inv)
same_plan(first_plan, mapped_plan)
loaded_inv, n, log = counted(invert)
loaded_plan, m, _ = counted(select)
assert n == m == 0 and INV_MSG in log
same_inversion(first_inv, loaded_inv)
same_plan(first_plan, loaded_plan)
core_inversion.ON_DISK_BYTES = core_keyframes.ON_DISK_BYTES = 256 * 2**20
core_stage_cache.IN_RAM_BYTES = 2**20
print("memory-mapped results: the same bits, read from the cache file, no scratch copy kept")

# ---- anything that determines the result computes afresh ----
changed_base, changed = build(0)
with torch.no_grad():
    next(changed_base.diffusion_model.output_blocks[-1].parameters()).add_(1e-3)  # one weight tensor moved
changed_base.diffusion_model.register_forward_pre_hook(lambda module, args: calls.append(1))
lora = model.clone()
key = [k for k in base.state_dict() if k.startswith("diffusion_model.output_blocks") and "attn1.to_q.weight" in k][0]
weight = base.state_dict()[key]
lora.add_patches({key: (1e-3 * torch.randn(weight.shape[0], 1) @ torch.randn(1, weight.shape[1]),)}, 1.0)
moved = latents.clone()
moved[11, 2, 3, 5] += 1e-3  # one element of one frame
other_prompt = [[prompt[0][0] + 1e-3, {}]]
for label, call in (("latent", lambda: invert(latents=moved)), ("model", lambda: invert(model=changed)),
                    ("weight patch", lambda: invert(model=lora)), ("prompt", lambda: invert(prompt=other_prompt)),
                    ("steps", lambda: invert(steps=STEPS + 1)), ("scheduler", lambda: invert(scheduler="normal")),
                    ("inversion_steps", lambda: invert(inversion_steps=6))):
    _, n, log = counted(call)
    assert n > 0 and INV_MSG not in log, ("invert", label, n)
for label, call in (("latent", lambda: select(latents=moved)), ("model", lambda: select(model=changed)),
                    ("weight patch", lambda: select(model=lora)), ("prompt", lambda: select(prompt=other_prompt)),
                    ("no prompt", lambda: select(prompt=None)), *[
                    (name, (lambda name=name, value=value: select(**{name: value}))) for name, value in
                    (("tau_mean", 0.1), ("tau_region", 0.1), ("max_clip_length", 6), ("feature_timestep", 51),
                     ("ensemble", 1), ("candidates_per_clip", 2), ("seed", 2))]):
    _, n, log = counted(call)
    assert n > 0 and KEY_MSG not in log, ("keyframes", label, n)
print("a changed latent, model, weight patch, prompt or any setting computes afresh")

# A patched model's key is the same whether ComfyUI has its patches applied in place right now or not.
def identity(m):
    fp = Fingerprint()
    add_model_identity(fp, m)
    return fp.hex()


unloaded = identity(lora)
mm.load_models_gpu([lora])  # on the CPU too, the LoRA is patched into the shared weights in place
assert key in lora.backup and not torch.equal(base.state_dict()[key], weight)
assert identity(lora) == unloaded and identity(model) != unloaded
mm.unload_all_models()
assert torch.equal(base.state_dict()[key], weight)
print("a weight patch changes the key; applying it in place does not")

# ---- a damaged entry is detected and recomputed, never used ----
cache_folder = tempfile.mkdtemp()  # one entry per stage
invert(), select()
for how in ("flip", "truncate"):
    for stage, call, same in (("inversion", invert, same_inversion), ("keyframes", select, same_plan)):
        [name] = [f for f in os.listdir(cache_folder) if f.startswith(stage + "-") and not f.startswith(".")]
        path = os.path.join(cache_folder, name)
        data = bytearray(open(path, "rb").read())
        if how == "flip":
            data[-7] ^= 0x20  # inside the last tensor (the header is at the front)
        else:
            data = data[: len(data) - len(data) // 3]
        open(path, "wb").write(bytes(data))
        got, n, log = counted(call)
        assert n > 0 and not any("using the" in m for m in log), (how, stage, n)
        assert any("damaged or stale" in m for m in log), log
        same((first_inv if stage == "inversion" else first_plan), got)
        _, n, _ = counted(call)  # rewritten whole: the next run loads it
        assert n == 0, (how, stage)
print("damaged and truncated entries: detected, recomputed (same result), rewritten")
print("OK")
'''


def test_invert_and_keyframe_selection_are_loaded_from_the_stage_cache():
    root = os.environ.get("COMFYUI_PATH")
    if not root or not (Path(root) / "main.py").exists():
        pytest.skip("integration tier: COMFYUI_PATH is not set (a ComfyUI checkout; see README 'Tests')")
    python = os.path.join(os.environ["COMFYUI_VENV"], "bin", "python") if os.environ.get("COMFYUI_VENV") else sys.executable
    code = f"REPO = {str(REPO)!r}\n" + SCRIPT
    result = subprocess.run([python, "-c", code], cwd=root, capture_output=True, text=True, timeout=900)
    print(result.stdout)
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout[-3000:] + result.stderr[-5000:]
