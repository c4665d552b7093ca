"""Spread Edit over GPUs in ComfyUI: an AdaFlow edit with propagation sampled by a local Ray cluster of 2 CPU
workers, each holding the patched model (unpickled once), gives the one-process output bit for bit: the
workers run the very chunks the one process runs, on the same device and dtype. Also with a worker killed in
the middle of a step (its chunks rerun on the other), and Cancel stops every worker. (Every worker lost:
tests/unit/test_scale_ray.py.)

Runs ComfyUI in-process (COMFYUI_VENV's Python, with Ray) on the CPU with a small random-weight SD2.x UNet
of the real architecture, 19 frames in 3 clips, non-keyframes in chunks of 2 frames (the one process and the
workers get the same chunks: batched convolutions and matmuls of other batch sizes round differently)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import importlib.util, math, os, signal, sys, tempfile
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import numpy as np
import torch
import ray
import comfy.model_management as mm
import comfy.model_patcher, comfy.samplers, comfy.supported_models as sm

spec = importlib.util.spec_from_file_location("longedit_pack", os.path.join(REPO, "__init__.py"))
pack = importlib.util.module_from_spec(spec); sys.modules["longedit_pack"] = pack; spec.loader.exec_module(pack)
import longedit_pack.nodes.adaflow_keyframes as keys_node
import longedit_pack.nodes.adaflow_invert as invert_node
import longedit_pack.nodes.adaflow_edit as edit_node
import longedit_pack.nodes.scale as scale_node
from longedit_pack.core.errors import LongEditError
from longedit_pack.nodes.adaflow_propagation import propagate_from_keyframes

torch.set_grad_enabled(False)
torch.manual_seed(0)
FRAMES, STEPS, CHUNK = 19, 2, 2
unet = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
            adm_in_channels=None, dtype=torch.float32, in_channels=4, model_channels=64, num_res_blocks=[2, 2, 2, 2],
            transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
            transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], use_temporal_attention=False,
            use_temporal_resblock=False, use_linear_in_transformer=True, context_dim=64)
config = sm.SD20(unet)
config.set_inference_dtype(torch.float32, None)
base = config.get_model({})
with torch.no_grad():
    for name, p in base.diffusion_model.named_parameters():
        if p.numel() == 0:
            continue
        if p.ndim >= 2:
            p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
        else:
            p.normal_(0.0, 0.02) if name.endswith("bias") else p.fill_(1.0)
cpu = torch.device("cpu")
model = comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)
edit_node.resume_dir = lambda: tempfile.mkdtemp()  # compared runs never resume from each other
keys_node.cache_dir = invert_node.cache_dir = lambda: tempfile.mkdtemp()
edit_node.chunk_size = lambda *a: CHUNK  # several chunks per step to spread (the workers size their own)

latents = torch.randn(FRAMES, 4, 4, 7) * torch.linspace(0.5, 1.5, FRAMES)[:, None, None, None]
empty = torch.zeros(1, 77, 64)
plan = keys_node.AdaFlowKeyframeSelection.execute(model, 0.0, 0.0, 7, 50, 1, 3, 1, latent={"samples": latents}).args[0]
assert plan.clip_count == 3, plan.clip_starts
start, inv = invert_node.AdaFlowInvert.execute(model, {"samples": latents}, [[empty, {}]], STEPS, "ddim_uniform",
                                               inversion_steps=STEPS).args
positive = [[torch.randn(1, 77, 64), {}]]

pools, hooks = [], {}
start_pool = edit_node.start_pool
edit_node.start_pool = lambda *a: pools.append(start_pool(*a)) or pools[-1]
payload = edit_node.records_payload


def per_step(editor):  # called as each step's chunks are spread, after its keyframe pass
    if "do" in hooks and editor.records.step == 1:  # the second (last) step
        hooks.pop("do")(pools[-1])
    return payload(editor)


edit_node.records_payload = per_step


def sample(gpus):
    patched = propagate_from_keyframes(edit_node.patch_model(model, inv, plan, 1.0, 1.0, 2), plan)
    if gpus:
        patched = scale_node.SpreadOverGpus.execute(patched, gpus, "").args[0]
    guider = comfy.samplers.CFGGuider(patched)
    guider.set_conds(positive, [[empty, {}]])
    guider.set_cfg(5.0)
    sigmas = comfy.samplers.calculate_sigmas(model.model.model_sampling, "ddim_uniform", STEPS)
    return guider.sample(torch.zeros_like(start["samples"]), start["samples"], comfy.samplers.sampler_object("ddim"),
                         sigmas, seed=0)


one = sample(0)
assert not pools
hooks["do"] = lambda pool: os.kill(pool.pids[0], signal.SIGKILL)  # a worker dies as step 2's chunks go out
two = sample(2)
pool = pools[-1]
assert len(pools) == 1 and len(set(pool.pids)) == 2 and os.getpid() not in pool.pids
assert pool.actors == [], "the workers outlived the run"
assert "do" not in hooks and pool.lost == [0], pool.lost
assert torch.equal(two, one), (two - one).abs().max()
print(f"2 workers == 1 process, bit for bit ({FRAMES} frames, {STEPS} steps, |x| max {one.abs().max():.3g}), with "
      "a worker killed as step 2's chunks went out (its chunks rerun on the other)")


def press_cancel(pool):
    hooks["actors"] = list(pool.actors)
    mm.interrupt_current_processing(True)


hooks["do"] = press_cancel
try:
    sample(2)
except mm.InterruptProcessingException:
    pass
else:
    raise AssertionError("Cancel did not stop the spread sampling")
finally:
    mm.interrupt_current_processing(False)
for actor in hooks["actors"]:
    try:
        ray.get(actor.ready.remote(), timeout=30)
    except ray.exceptions.RayActorError:
        continue
    raise AssertionError("a worker still runs after Cancel")
print("Cancel: every worker stopped")

print("OK")
'''


def test_two_ray_workers_sample_the_one_process_edit_even_when_one_dies_and_stop_on_cancel():
    root = os.environ.get("COMFYUI_PATH")
    if not root or not (Path(root) / "main.py").exists():
        pytest.skip("integration tier: COMFYUI_PATH is not set (a ComfyUI checkout; see README 'Tests')")
    python = os.path.join(os.environ["COMFYUI_VENV"], "bin", "python") if os.environ.get("COMFYUI_VENV") else sys.executable
    code = f"REPO = {str(REPO)!r}\n" + SCRIPT
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_DEDUP_LOGS="0")
    result = subprocess.run([python, "-c", code], cwd=root, capture_output=True, text=True, timeout=600, env=env)
    print(result.stdout)
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout[-3000:] + result.stderr[-6000:]
