"""AdaFlow Invert and AdaFlow Keyframe Selection keep their results on disk: queued again (in a new process,
after a crash or a restart) with the same inputs they load them and never call the model, giving the same
bits; a changed latent, model, weight patch, prompt or setting computes afresh; a damaged entry is detected
and recomputed, never used.

Runs ComfyUI in-process on the CPU with a small random-weight SD2.x UNet (ComfyUI's SD20 config), 19 frames
(more than 16) of 4x7 latents (odd width), clips of at most 7 frames with 3 candidates (so several clips,
levels and candidate slots). The model's calls are counted with a forward hook on the UNet."""
from inprocess import run_in_comfy

SCRIPT = r'''
import logging, os, tempfile
from inprocess import boot_cpu_comfy, import_pack, small_sd2_model
boot_cpu_comfy()
import numpy as np
import torch
import comfy.model_management as mm

import_pack(REPO)
import longedit_pack.nodes.adaflow_keyframes as keys_node
import longedit_pack.nodes.adaflow_invert as invert_node
import longedit_pack.core.adaflow.inversion as core_inversion
import longedit_pack.core.adaflow.keyframes as core_keyframes
import longedit_pack.core.stage_cache as core_stage_cache
from longedit_pack.core.resume import Fingerprint
from longedit_pack.nodes.comfy_glue import add_model_identity

torch.set_grad_enabled(False)
FRAMES, STEPS = 19, 3
messages = []


class Collect(logging.Handler):
    def emit(self, record):
        messages.append(record.getMessage())


logging.getLogger().addHandler(Collect())
logging.getLogger().setLevel(logging.INFO)


base, model = small_sd2_model(seed=0)
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
changed_base, changed = small_sd2_model(seed=0)
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
    run_in_comfy(SCRIPT, timeout=900)
