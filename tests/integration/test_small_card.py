"""Every chunked path under small reported free memory (chunks of 1-3 frames) equals the unchunked run,
and Cancel pressed during the first chunk stops each long node before its next chunk.

Runs ComfyUI in-process on the CPU with small random-weight models of the real architectures (an SD2.x
UNet and an image VAE built here, no checkpoint needed). ComfyUI's free memory is patched to a small
float, as ComfyUI reports it; every chunk size the nodes compute is recorded and must be an int in 1..3.

Tolerance: chunking only changes the order of floating-point sums (batched convolutions and matmuls), so a
chunked fp32 run may differ from the unchunked fp32 run by float rounding only. Its size is measured, not
chosen: E = max |unchunked fp32 - the same run with the model in float64|. Both fp32 runs lie within about
E of the float64 one, so they must agree within 4 E (plus one float16 ulp where the output is stored as
float16). A chunk mixing up frames, steps or branches is off by O(1), thousands of times more.
"""
from inprocess import run_in_comfy

SCRIPT = r'''
import copy, os, tempfile
from inprocess import boot_cpu_comfy, import_pack, random_init_, small_sd2_model
boot_cpu_comfy()
import numpy as np
import torch
import comfy.model_management as mm
import comfy.model_patcher, comfy.sample, comfy.sd
from comfy.ldm.models.autoencoder import AutoencoderKL

import_pack(REPO)
import longedit_pack.nodes.comfy_glue as glue
import longedit_pack.nodes.adaflow_keyframes as keys_node
import longedit_pack.nodes.adaflow_invert as invert_node
import longedit_pack.nodes.adaflow_edit as edit_node
import longedit_pack.nodes.video_save as save_node
import longedit_pack.core.adaflow.keyframes as core_keyframes
import longedit_pack.core.adaflow.records as core_records
from longedit_pack.core.adaflow.edit import KeyframeEditor
from longedit_pack.core.adaflow.dift import dift_feature_chunks
from longedit_pack.core.adaflow.keyframes import AksParams, select_keyframes
from longedit_pack.core.video.sink import VideoWriter
from longedit_pack.core.video.source import open_long_video
from longedit_pack.nodes.adaflow_propagation import propagate_from_keyframes
from longedit_pack.nodes.video_encode import encode_long_video

torch.set_grad_enabled(False)  # as ComfyUI runs nodes
torch.manual_seed(0)
FRAMES, H, W = 19, 32, 56  # 19 frames (more than 16), latents 4x7 (odd width)
STEPS = 2
base32, model32 = small_sd2_model()  # random weights from the global generator seeded above
base64 = copy.deepcopy(base32)
base64.diffusion_model.double()
base64.diffusion_model.dtype = torch.float64
cpu = torch.device("cpu")
model64 = comfy.model_patcher.ModelPatcher(base64, load_device=cpu, offload_device=cpu)

dd = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
      "ch_mult": [1, 2, 4, 4], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
ae = AutoencoderKL(ddconfig=dd, embed_dim=4)
random_init_(ae)
vae32 = comfy.sd.VAE(sd=ae.state_dict(), config={"params": {"ddconfig": dd, "embed_dim": 4}})
vae64 = comfy.sd.VAE(sd=ae.state_dict(), config={"params": {"ddconfig": dd, "embed_dim": 4}})
vae64.first_stage_model.double()
vae64.vae_dtype = torch.float64

# The free memory every chunk size is computed from, as ComfyUI reports it (a float): each sizing call's free
# argument is replaced by what leaves room for `frames` frames and a half at that call's own per-frame cost.
# (ComfyUI's own attention keeps the machine's figure, or it would crawl on the CPU.)
free = {"frames": None}
sizes = []


def recording(fn):
    def sized(free_bytes, device_bytes_per_frame, *args, **kwargs):
        if free["frames"] is not None:
            free_bytes = (free["frames"] + 0.5) * float(device_bytes_per_frame) / (1 - kwargs.get("reserve", 0.25))
        n = fn(free_bytes, device_bytes_per_frame, *args, **kwargs)
        assert type(n) is int, f"chunk size {n!r} is a {type(n).__name__}"
        sizes.append(n)
        return n
    return sized


for module in (glue, keys_node, invert_node, edit_node):
    module.frames_per_chunk = recording(module.frames_per_chunk)
# Each sampling run keeps its states in a fresh folder, so that runs compared here never resume from each
# other (the resume section below uses one folder on purpose).
edit_node.resume_dir = lambda: tempfile.mkdtemp()
# Likewise the inversion and the keyframe plan are computed by every call here (the stage cache would load
# the first call's result; tests/integration/test_stage_cache.py tests it).
keys_node.cache_dir = invert_node.cache_dir = lambda: tempfile.mkdtemp()

SMALL = {"1 frame": 1, "3 frames": 3}


def run(frames, fn):
    """fn() with ComfyUI reporting room for `frames` frames per chunk; returns (result, chunk sizes used)."""
    free["frames"] = frames
    sizes.clear()
    try:
        return fn(), list(sizes)
    finally:
        free["frames"] = None


def check_small(label, used, frames):
    assert used and all(type(n) is int and n == frames for n in used), (label, used)
    print(f"{label}: chunk sizes {sorted(set(used))}")


def check_close(label, got, ref, truth, extra=0.0):
    got, ref, truth = (torch.as_tensor(np.asarray(t)).double() for t in (got, ref, truth))
    E = (ref - truth).abs().max().item()
    assert 0 < E < 1e-3 * max(1.0, ref.abs().max().item()), (label, "float error scale", E)
    diff = (got - ref).abs() - extra
    worst = diff.max().item()
    assert worst <= 4 * E, f"{label}: chunked differs from unchunked by {worst:.3g} > 4 E = {4 * E:.3g}"
    print(f"{label}: max diff {worst + (extra.max().item() if torch.is_tensor(extra) else extra):.3g}, E {E:.3g}")


# ---- a video file (FFV1, lossless) ----
tmp = tempfile.mkdtemp()
path = os.path.join(tmp, "clip.mkv")
rng = np.random.default_rng(0)
with VideoWriter(path, "mkv (FFV1 lossless)", 24, W, H) as writer:
    writer.write(rng.integers(0, 256, size=(FRAMES, H, W, 3), dtype=np.uint8))
video = open_long_video(path)
assert video.frame_count == FRAMES

# ---- encode ----
ref_latents = encode_long_video(video, vae32)
truth_latents = encode_long_video(video, vae64)
for label, frames in SMALL.items():
    got, used = run(frames, lambda: encode_long_video(video, vae32))
    check_small(f"encode {label}", used, frames)
    check_close(f"encode {label}", got, ref_latents, truth_latents)
latents = ref_latents

# ---- decode + save (the frames the writer receives) ----
written = []
save_node.write_video = lambda frames, total, w, h, **kw: written.append(np.concatenate(list(frames)))


def decode(vae):
    written.clear()
    save_node.DecodeSaveLongVideo.execute({"samples": latents}, vae, "x", "mkv (FFV1 lossless)", 19, 24.0)
    return written[0]


# uint8 output: compare the floats before rounding by decoding through vae.decode's chunks directly too
ref_frames, truth_frames = decode(vae32), decode(vae64)
for label, frames in SMALL.items():
    got, used = run(frames, lambda: decode(vae32))
    check_small(f"decode {label}", used, frames)
    assert got.shape == ref_frames.shape == (FRAMES, H, W, 3), got.shape
    # rounding to uint8 can move a value by one level where a float sits at .5; never more
    flips = np.abs(got.astype(int) - ref_frames.astype(int))
    assert flips.max() <= 1 and (flips > 0).mean() < 1e-3, (label, flips.max(), (flips > 0).mean())
    print(f"decode {label}: {int((flips > 0).sum())} of {flips.size} uint8 values differ by 1")

# ---- AKS: DIFT features (chunked by the node's memory sizing) and matching ----
empty = torch.zeros(1, 77, 64)
patcher32, featurize32 = keys_node.make_featurizer(model32, empty, 50)
patcher64, featurize64 = keys_node.make_featurizer(model64, empty, 50)
ens = 2


def features(featurize, chunk):
    return torch.cat(list(dift_feature_chunks(latents, featurize, ens, 0, chunk))).float()


ref_feat, truth_feat = features(featurize32, FRAMES), features(featurize64, FRAMES)
ulp16 = ref_feat.abs() * 2.0 ** -10  # features are returned as float16
for label, frames in SMALL.items():
    chunk, used = run(frames, lambda: keys_node.frames_per_chunk(
        mm.get_free_memory(cpu), patcher32.memory_required([ens, *latents.shape[1:]]), 1))
    check_small(f"DIFT {label}", used, frames)
    check_close(f"DIFT features {label}", features(featurize32, chunk), ref_feat, truth_feat, extra=ulp16)

# Matching: the same features streamed in chunks of 1-3 frames, matched 2 frames at a time, give the same plan.
params = AksParams(tau_mean=0.0, tau_region=0.0, max_clip_length=7, candidates_per_clip=3, seed=1)
feat16 = ref_feat.half()
ref_plan = select_keyframes([feat16], latents, params)
assert ref_plan.clip_count == 3, ref_plan.clip_starts
core_keyframes.MATCH_FRAMES = 2
for chunk in (1, 2, 3):
    plan = select_keyframes([feat16[i:i + chunk] for i in range(0, FRAMES, chunk)], latents, params)
    assert np.array_equal(plan.clip_starts, ref_plan.clip_starts) and np.array_equal(plan.candidates, ref_plan.candidates)
    for level, (a, b) in enumerate(zip(plan.matches, ref_plan.matches)):
        assert np.array_equal(a, b), (chunk, level, int((a != b).sum()))
    assert np.array_equal(plan.aas_scores, ref_plan.aas_scores)
core_keyframes.MATCH_FRAMES = 16
print("AKS matching: chunks of 1, 2, 3 frames (matched 2 at a time) give the identical plan")

# The node itself under small memory: its chunk sizes are ints in 1..3 and it builds the same clips.
def select(model):
    out = keys_node.AdaFlowKeyframeSelection.execute(model, 0.0, 0.0, 7, 50, ens, 3, 1, latent={"samples": latents})
    return out.args[0]


node_ref = select(model32)
for label, frames in SMALL.items():
    plan, used = run(frames, lambda: select(model32))
    check_small(f"keyframe selection {label}", used, frames)
    assert np.array_equal(plan.clip_starts, node_ref.clip_starts), (plan.clip_starts, node_ref.clip_starts)
    agree = np.mean([np.mean(a == b) for a, b in zip(plan.matches, node_ref.matches)])
    assert agree > 0.99, (label, agree)  # argmax ties may flip where features differ by a float16 ulp
    print(f"keyframe selection node {label}: same clips, {agree:.4f} of matches identical")

# ---- inversion ----
context = empty


def invert(model):
    out = invert_node.AdaFlowInvert.execute(model, {"samples": latents}, [[context, {}]], STEPS, "ddim_uniform",
                                           inversion_steps=STEPS)
    return out.args


(ref_start, ref_inv), (_, truth_inv) = invert(model32), invert(model64)
traj = np.asarray(ref_inv.trajectory, dtype=np.float64)
for label, frames in SMALL.items():
    (start, inv), used = run(frames, lambda: invert(model32))
    check_small(f"inversion {label}", used, frames)
    check_close(f"inversion trajectory {label}", inv.trajectory, traj, truth_inv.trajectory,
                extra=torch.from_numpy(np.abs(traj)) * 2.0 ** -10)

# ---- keyframe pass + propagation (sampling) ----
plan = node_ref
positive = [[torch.randn(1, 77, 64), {}]]
negative = [[context, {}]]
recorded_bytes = []
original_keyframe_pass = KeyframeEditor._keyframe_pass


def measuring_keyframe_pass(self, run_, x, sigma, ctx, call, local, step, branch_ids, out):
    original_keyframe_pass(self, run_, x, sigma, ctx, call, local, step, branch_ids, out)
    # the record propagation reads: every layer's output for the source and each branch, kept off the device
    itemsize = {t.element_size() for t in self.records.layers.values()}.pop()
    recorded_bytes.append((len(branch_ids), len(local), self.records.nbytes // itemsize))


KeyframeEditor._keyframe_pass = measuring_keyframe_pass


def sample(model):
    patched = propagate_from_keyframes(edit_node.patch_model(model, ref_inv, plan, 1.0, 1.0, 2), plan)
    start = model.model.process_latent_out(ref_inv.latents_at(0))
    return comfy.sample.sample(patched, torch.zeros_like(start), STEPS, 5.0, "ddim", "ddim_uniform", positive,
                               negative, start, denoise=1.0, disable_noise=True, seed=0)


ref_out, truth_out = sample(model32), sample(model64)
for label, frames in SMALL.items():
    got, used = run(frames, lambda: sample(model32))
    check_small(f"edit {label}", used, frames)
    check_close(f"keyframe pass + propagation {label}", got, ref_out, truth_out)

# Euler/DDIM steps pass by pass on one state tensor (what keeps RAM flat) against ComfyUI's own full-batch
# sample_euler on the same host tensors (euler with an explicit s_churn=0 option is the same sampler, but not
# one taken pass by pass): the same passes, the same per-element arithmetic, so the same bits.
import comfy.samplers
by_passes = []
original_by_passes = edit_node.sample_by_passes
edit_node.sample_by_passes = lambda *a, **k: by_passes.append(1) or original_by_passes(*a, **k)


def sample_with(model, sampler):
    patched = propagate_from_keyframes(edit_node.patch_model(model, ref_inv, plan, 1.0, 1.0, 2), plan)
    start = model.model.process_latent_out(ref_inv.latents_at(0))
    sigmas = comfy.samplers.calculate_sigmas(model.model.model_sampling, "ddim_uniform", STEPS)
    guider = comfy.samplers.CFGGuider(patched)
    guider.set_conds(positive, negative)
    guider.set_cfg(5.0)
    return guider.sample(torch.zeros_like(start), start, sampler, sigmas, seed=0)


for frames in SMALL.values():
    streamed, _ = run(frames, lambda: sample_with(model32, comfy.samplers.sampler_object("ddim")))
    assert len(by_passes) == 1, "ddim was not sampled pass by pass"
    full, _ = run(frames, lambda: sample_with(model32, comfy.samplers.ksampler("euler", {"s_churn": 0.0})))
    assert len(by_passes) == 1, "euler with options must run ComfyUI's own loop"
    by_passes.clear()
    assert torch.equal(streamed, full), (frames, (streamed - full).abs().max())
    print(f"chunks of {frames}: Euler pass by pass == ComfyUI's full-batch sample_euler, bit for bit")
edit_node.sample_by_passes = original_by_passes

# Keyframe records in files (as when RAM is short): the same edit, and the files are gone afterwards.
folders = []
original_records = core_records.KeyframeRecords.__init__


def recording_folder(self, clips, pin=False, folder=None):
    folders.append(folder)
    original_records(self, clips, pin=pin, folder=folder)


core_records.KeyframeRecords.__init__ = recording_folder
in_ram, _ = run(3, lambda: sample_with(model32, comfy.samplers.sampler_object("ddim")))
assert folders and all(f is None for f in folders), folders
edit_node.RECORD_RAM_SHARE, folders[:] = 0.0, []
in_files, _ = run(3, lambda: sample_with(model32, comfy.samplers.sampler_object("ddim")))
edit_node.RECORD_RAM_SHARE = 0.25
core_records.KeyframeRecords.__init__ = original_records
assert folders and all(f is not None and not os.path.exists(f) for f in folders), folders
assert torch.equal(in_ram, in_files)
print(f"keyframe records in files: the same edit, bit for bit; {len(set(folders))} record folder(s) removed")

# ---- Resume: Cancel after a step, run again: only the steps after the last saved one run, same bits ----
from comfy.model_management import InterruptProcessingException
resume_folder = tempfile.mkdtemp()
edit_node.resume_dir = lambda: resume_folder
steps_run = []
original_store_save = edit_node.StepStore.save


def saving(self, key, step, steps, state):
    steps_run.append(step)
    original_store_save(self, key, step, steps, state)
    if cancel_after.get("step") == step:
        mm.interrupt_current_processing(True)  # Cancel pressed while the next step starts


cancel_after = {}
edit_node.StepStore.save = saving
RESUME_STEPS = 4
ddim = comfy.samplers.sampler_object("ddim")


def sample_steps(model, steps=RESUME_STEPS, seed=0, prompt=None, cfg=5.0):
    inv = inv4 if steps == RESUME_STEPS else ref_inv
    patched = propagate_from_keyframes(edit_node.patch_model(model, inv, plan, 1.0, 1.0, 2), plan)
    start = model.model.process_latent_out(inv.start_latents())
    sigmas = comfy.samplers.calculate_sigmas(model.model.model_sampling, "ddim_uniform", steps)
    guider = comfy.samplers.CFGGuider(patched)
    guider.set_conds(prompt or positive, negative)
    guider.set_cfg(cfg)
    return guider.sample(torch.zeros_like(start), start, ddim, sigmas, seed=seed)


def invert_steps(model, steps):
    return invert_node.AdaFlowInvert.execute(model, {"samples": latents}, [[context, {}]], steps, "ddim_uniform",
                                             inversion_steps=steps).args


inv4 = invert_steps(model32, RESUME_STEPS)[1]
edit_node.resume_dir = lambda: tempfile.mkdtemp()
uninterrupted = sample_steps(model32)  # in a folder of its own
edit_node.resume_dir = lambda: resume_folder
steps_run.clear()
cancel_after["step"] = 1
try:
    sample_steps(model32)
except InterruptProcessingException:
    pass
else:
    raise AssertionError("Cancel did not stop the sampler")
finally:
    mm.interrupt_current_processing(False)
cancel_after.clear()
assert steps_run == [0, 1], steps_run  # stopped in step 2 (0-based), after saving step 1
steps_run.clear()
resumed = sample_steps(model32)
assert steps_run == [2, 3], steps_run  # the run again starts at step 2: no finished step is recomputed
assert torch.equal(resumed, uninterrupted), (resumed - uninterrupted).abs().max()
print("resume after Cancel: steps 2-3 run again, the result equals the uninterrupted run bit for bit")

# A run that completed: queued again it takes the saved result and runs no step.
steps_run.clear()
again = sample_steps(model32)
assert steps_run == [] and torch.equal(again, uninterrupted)

# Anything that changes the result starts afresh: seed, prompt, guidance, model weights, steps.
changed_model = copy.deepcopy(base32)
with torch.no_grad():
    next(changed_model.diffusion_model.output_blocks[-1].parameters()).add_(1e-3)
changed32 = comfy.model_patcher.ModelPatcher(changed_model, load_device=cpu, offload_device=cpu)
for label, call in (("seed", lambda: sample_steps(model32, seed=1)),
                    ("prompt", lambda: sample_steps(model32, prompt=[[positive[0][0] + 0.01, {}]])),
                    ("cfg", lambda: sample_steps(model32, cfg=4.0)),
                    ("model", lambda: sample_steps(changed32)), ("steps", lambda: sample_steps(model32, steps=STEPS))):
    steps_run.clear()
    call()
    assert steps_run == list(range(STEPS if label == "steps" else RESUME_STEPS)), (label, steps_run)

# A damaged state file is detected by its checksum and never used: the run starts afresh.
def damage_every_state(how):
    for name in os.listdir(resume_folder):
        path = os.path.join(resume_folder, name)
        data = bytearray(open(path, "rb").read())
        if how == "flip":
            data[-5] ^= 0xFF  # a bit flip inside the state tensor (the header is at the front)
        else:
            data = data[: len(data) // 2]  # truncated, as by a crash mid-write
        open(path, "wb").write(bytes(data))


for how in ("flip", "truncate"):
    damage_every_state(how)
    steps_run.clear()
    sample_steps(changed32)  # this run had completed: undamaged, it would run no step
    assert steps_run == list(range(RESUME_STEPS)), (how, steps_run)
edit_node.StepStore.save = original_store_save
edit_node.resume_dir = lambda: tempfile.mkdtemp()
print("resume: a changed seed, prompt, cfg or model starts afresh; damaged or truncated states are not used")

# The plan's kept keyframe outputs are what a keyframe pass records.
per_frame = edit_node.self_attention_bytes_per_frame(base32.diffusion_model, plan.levels, 1)  # elements
for branches, keyframes, elements in recorded_bytes:
    assert elements == 3 * keyframes * per_frame, (branches, keyframes, elements, per_frame)
print(f"recorded keyframe outputs match the plan in {len(recorded_bytes)} keyframe passes")
KeyframeEditor._keyframe_pass = original_keyframe_pass

# ---- Cancel: pressed while the first chunk runs, every long node stops before its next chunk ----
from comfy.model_management import InterruptProcessingException


def cancelled_after_first_chunk(label, call):
    updates = []
    update = glue.Progress.update

    def press_cancel(self, done):
        update(self, done)
        updates.append(done)
        mm.interrupt_current_processing(True)  # the user presses Cancel while this chunk ran

    glue.Progress.update = press_cancel
    try:
        run(1, call)
    except InterruptProcessingException:
        pass
    else:
        raise AssertionError(f"{label}: Cancel did not stop the node")
    finally:
        glue.Progress.update = update
        mm.interrupt_current_processing(False)
    assert len(updates) == 1, (label, updates)  # no second chunk was reported: it stopped within one
    print(f"Cancel in {label}: stopped after its first chunk ({updates[0]} units done)")


for label, call in (("keyframe selection", lambda: select(model32)), ("inversion", lambda: invert(model32)),
                    ("keyframe editing + propagation", lambda: sample(model32))):
    cancelled_after_first_chunk(label, call)
print("OK")
'''


def test_every_chunked_path_matches_the_unchunked_run_under_small_memory():
    run_in_comfy(SCRIPT, timeout=900)
