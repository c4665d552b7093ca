"""Spread Edit over GPUs in ComfyUI: an AdaFlow edit with propagation sampled by a local Ray cluster of 2 CPU
workers, each holding the patched model (unpickled once), gives the one-process output bit for bit: the
workers run the very chunks the one process runs, on the same device and dtype; AdaFlow Invert on a MODEL
with the spread option inverts its chunks on the workers, bit for bit the one-process inversion, and Keyframe
Selection's DIFT features come from the workers, giving the one-process plan. The stages run in the same
workers, kept warm between them without the last stage's model. Also with a worker killed in the middle of a
step (its chunks rerun on the other; that pool is then stopped, not kept), and Cancel stops every worker.
(Every worker lost: tests/unit/test_scale_ray.py.)

Runs ComfyUI in-process (COMFYUI_VENV's Python, with Ray) on the CPU with a small random-weight SD2.x UNet
of the real architecture, 19 frames in 3 clips, non-keyframes in chunks of 2 frames (the one process and the
workers get the same chunks: batched convolutions and matmuls of other batch sizes round differently)."""
import os

from inprocess import run_in_comfy

SCRIPT = r'''
import os, signal, tempfile
from inprocess import boot_cpu_comfy, import_pack, small_sd2_model
boot_cpu_comfy()
import torch
import ray
import comfy.model_management as mm
import comfy.samplers

import_pack(REPO)
import longedit_pack.nodes.adaflow_keyframes as keys_node
import longedit_pack.nodes.adaflow_invert as invert_node
import longedit_pack.nodes.adaflow_edit as edit_node
import longedit_pack.nodes.scale as scale_node
from longedit_pack.nodes.adaflow_propagation import propagate_from_keyframes

torch.set_grad_enabled(False)
torch.manual_seed(0)
FRAMES, STEPS, CHUNK = 19, 2, 2
base, model = small_sd2_model()
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

# AdaFlow Invert on a MODEL with the spread option: chunks of frames walk the inversion grid on 2 workers, each
# holding the model; the one-process inversion's trajectory and start latents, bit for bit (same 2-frame chunks)
invert_node.frames_per_chunk = lambda *a: CHUNK
used, acquire = [], scale_node.acquire_pool
scale_node.acquire_pool = lambda *a, **k: used.append(acquire(*a, **k)) or used[-1]  # every stage's pool
warm = scale_node.WARM_POOLS


def kept_without_model(pool):  # kept warm after its stage: actors up, each having dropped its model
    return any(p is pool for p, _ in warm.kept.values()) and len(pool.actors) == 2 and \
        ray.get([a.unload.remote() for a in pool.actors]) == [False, False]


spread_model = scale_node.SpreadOverGpus.execute(model, 2, "").args[0]
spread_start, spread_inv = invert_node.AdaFlowInvert.execute(
    spread_model, {"samples": latents}, [[empty, {}]], STEPS, "ddim_uniform", inversion_steps=STEPS).args
one_start, one_inv = invert_node.AdaFlowInvert.execute(model, {"samples": latents}, [[empty, {}]], STEPS,
                                                       "ddim_uniform", inversion_steps=STEPS).args
assert len(used) == 1 and len(set(used[0].pids)) == 2 and kept_without_model(used[0])
assert torch.equal(spread_start["samples"], one_start["samples"])
assert (spread_inv.trajectory == one_inv.trajectory).all() and spread_inv.trajectory.shape[1] == FRAMES
print("the inversion on 2 workers == 1 process, bit for bit")

# AdaFlow Keyframe Selection on that MODEL: the DIFT features of chunks of frames come from the workers, in frame
# order; the same plan (clips, candidates, correspondences, AAS scores) as in one process
keys_node.frames_per_chunk = lambda *a: CHUNK
spread_plan = keys_node.AdaFlowKeyframeSelection.execute(spread_model, 0.0, 0.0, 7, 50, 1, 3, 1,
                                                         latent={"samples": latents}).args[0]
one_plan = keys_node.AdaFlowKeyframeSelection.execute(model, 0.0, 0.0, 7, 50, 1, 3, 1,
                                                      latent={"samples": latents}).args[0]
assert len(used) == 2 and used[1] is used[0] and kept_without_model(used[0])  # the inversion's warm workers
assert (spread_plan.clip_starts == one_plan.clip_starts).all() and (spread_plan.candidates == one_plan.candidates).all()
assert all((a == b).all() for a, b in zip(spread_plan.matches, one_plan.matches))
assert (spread_plan.aas_scores == one_plan.aas_scores).all() and spread_plan.clip_count == 3
print("keyframe selection's features on 2 workers: the one-process plan, in the inversion's workers, kept warm")

pools, hooks, receipts = [], {}, []
start_pool = edit_node.start_pool


def started_pool(*a, **k):  # every sampling pool
    pools.append(start_pool(*a, **k))
    return pools[-1]


finish_pool = edit_node.finish_pool


def finished_pool(pool, completed):  # how its workers got each step's record
    receipts.extend(pool.record_receipts())
    finish_pool(pool, completed)


edit_node.start_pool, edit_node.finish_pool = started_pool, finished_pool
payload = edit_node.records_payload


def per_step(editor):  # called as each step's chunks are spread, after its keyframe pass
    if "do" in hooks and editor.records.step == 1:  # the second (last) step
        hooks.pop("do")(pools[-1])
    return payload(editor)


edit_node.records_payload = per_step


def sample(gpus, records_via="auto"):
    patched = propagate_from_keyframes(edit_node.patch_model(model, inv, plan, 1.0, 1.0, 2), plan)
    if gpus:
        patched = scale_node.SpreadOverGpus.execute(patched, gpus, "", records_via).args[0]
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
assert pool is used[0], "sampling did not use the warm workers of the stages before"
assert pool.actors == [] and not warm.kept, "workers that lost one were kept"
assert "do" not in hooks and pool.lost == [0], pool.lost
assert torch.equal(two, one), (two - one).abs().max()
print(f"2 workers == 1 process, bit for bit ({FRAMES} frames, {STEPS} steps, |x| max {one.abs().max():.3g}), with "
      "a worker killed as step 2's chunks went out (its chunks rerun on the other)")
assert [r["via"] for r in receipts] == ["object store"] * 3, receipts  # CPU workers: auto keeps to it

# the record broadcast among the workers over torch.distributed (gloo: CPU workers) gives the same output
receipts.clear()
three = sample(2, "torch.distributed")
assert len(pools) == 2 and pools[-1] is not pool and kept_without_model(pools[-1]) and not pools[-1].lost
assert sorted((r["step"], r["via"]) for r in receipts) == [(0, "gloo"), (0, "gloo"), (1, "gloo"), (1, "gloo")]
assert torch.equal(three, one), (three - one).abs().max()
print("2 workers, records broadcast over gloo == 1 process, bit for bit")


def press_cancel(pool):
    hooks["actors"] = list(pool.actors)
    mm.interrupt_current_processing(True)


hooks["do"] = press_cancel  # as the workers start the record broadcast
try:
    sample(2, "torch.distributed")
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
assert len(pools) == 3 and pools[-1] is pools[-2] and not warm.kept  # the gloo pool, warm, then stopped
print("Cancel: every worker stopped")

print("OK")
'''


def test_two_ray_workers_sample_the_one_process_edit_even_when_one_dies_and_stop_on_cancel():
    run_in_comfy(SCRIPT, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1", RAY_DEDUP_LOGS="0"))
