"""AdaFlow's patch composes with other packs' patches and leaves the input MODEL untouched (in-process)."""
from inprocess import run_in_comfy

SCRIPT = r'''
from inprocess import boot_cpu_comfy, import_pack
boot_cpu_comfy()
import torch, comfy.sd, comfy.sample, comfy.samplers, folder_paths

import_pack(REPO)
from longedit_pack.nodes.adaflow_edit import patch_model
import tempfile
import longedit_pack.nodes.adaflow_edit as edit_node_module
edit_node_module.resume_dir = lambda: tempfile.mkdtemp()  # every run afresh: the runs compared must all compute
from longedit_pack.nodes.adaflow_invert import make_eps
from longedit_pack.core.adaflow.inversion import ddim_invert

model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(folder_paths.get_full_path_or_raise("checkpoints", CKPT))
calls = {"attn1_patch": 0, "other_replace": 0}

def counting_patch(n, context, value, extra_options):  # "another pack": runs on every self-attention input
    calls["attn1_patch"] += 1
    return n, context, value

def other_replace(q, k, v, extra_options):  # "another pack": its own attention on input block 1
    calls["other_replace"] += 1
    from comfy.ldm.modules.attention import optimized_attention
    return optimized_attention(q, k, v, extra_options["n_heads"])

other = model.clone()
other.set_model_attn1_patch(counting_patch)
other.set_model_attn1_replace(other_replace, "input", 1, 0)
before = (repr(other.model_options), dict(other.object_patches), dict(other.wrappers))

steps = 2
empty = clip.encode_from_tokens_scheduled(clip.tokenize(""))
prompt = clip.encode_from_tokens_scheduled(clip.tokenize("a painting"))
latents = torch.randn(3, 4, 8, 14)
sigmas = comfy.samplers.calculate_sigmas(model.model.model_sampling, "ddim_uniform", steps).double().numpy()
context = empty[0][0][:1].float()
inversion = ddim_invert(model.model.process_latent_in(latents), sigmas, make_eps(model, context), 3,
                        source_context=context)
patched = patch_model(other, inversion, None, 1.0, 1.0, 20)
start = model.model.process_latent_out(inversion.latents_at(0))
out = comfy.sample.sample(patched, torch.zeros_like(start), steps, 5.0, "ddim", "ddim_uniform", prompt, empty,
                          start, denoise=1.0, disable_noise=True, seed=0)
assert torch.isfinite(out).all() and out.shape == latents.shape, out.shape
after = (repr(other.model_options), dict(other.object_patches), dict(other.wrappers))
assert before == after, "the input MODEL was mutated"
assert calls["attn1_patch"] > 0 and calls["other_replace"] > 0, calls
assert patched.object_patches and not model.object_patches

# The keyframe plan must come from the same frames in the same order as the inversion.
from longedit_pack.core.adaflow.keyframes import select_keyframes
from longedit_pack.core.errors import LongEditError
plan = select_keyframes([torch.randn(3, 8, 8, 14)], latents)
patch_model(model, inversion, plan, 1.0, 1.0, 20)  # the same frames: accepted
swapped = select_keyframes([torch.randn(3, 8, 8, 14)], latents[[1, 0, 2]])
try:
    patch_model(model, inversion, swapped, 1.0, 1.0, 20)
    raise AssertionError("a reordered keyframe plan was accepted")
except LongEditError as e:
    assert "first at frame 0" in str(e), e

# Keyframe Editing and Latent Propagation give the same model in either order.
from longedit_pack.nodes.adaflow_propagation import propagate_from_keyframes
plan = select_keyframes([torch.randn(3, 8, 8, 14)], latents, __import__("longedit_pack.core.adaflow.keyframes",
                        fromlist=["AksParams"]).AksParams(max_clip_length=1, candidates_per_clip=1))
a = propagate_from_keyframes(patch_model(model, inversion, plan, 1.0, 1.0, 20), plan)
b = patch_model(propagate_from_keyframes(model, plan), inversion, plan, 1.0, 1.0, 20)
outs = [comfy.sample.sample(m, torch.zeros_like(start), steps, 5.0, "ddim", "ddim_uniform", prompt, empty, start,
                            denoise=1.0, disable_noise=True, seed=0) for m in (a, b)]
assert torch.equal(outs[0], outs[1]), (outs[0] - outs[1]).abs().max()

# Cancel during a step stops after the current chunk: the keyframe pass runs, the other frames do not.
import comfy.model_management as mm
import longedit_pack.nodes.adaflow_edit as edit_node
from longedit_pack.core.adaflow.edit import KeyframeEditor
plan = select_keyframes([torch.randn(1, 8, 8, 14).expand(3, -1, -1, -1).contiguous()], latents)  # one scene
assert plan.clip_count == 1, plan.clip_count
passes = []
original_pass = KeyframeEditor._pass
KeyframeEditor._pass = lambda self, *a, **k: (passes.append(a[5].tolist()), original_pass(self, *a, **k))[1]
edit_node.frames_per_chunk = lambda *a: 1  # one frame per chunk
cancellable = propagate_from_keyframes(patch_model(model, inversion, plan, 1.0, 1.0, 20), plan)
comfy.sample.sample(cancellable, torch.zeros_like(start), steps, 5.0, "ddim", "ddim_uniform", prompt, empty, start,
                    denoise=1.0, disable_noise=True, seed=0)
assert len(passes) == steps * 4, passes  # per step: the keyframe (once per CFG branch), then two chunks of one frame
passes.clear()
mm.interrupt_current_processing(True)
try:
    comfy.sample.sample(cancellable, torch.zeros_like(start), steps, 5.0, "ddim", "ddim_uniform", prompt, empty,
                        start, denoise=1.0, disable_noise=True, seed=0)
    raise AssertionError("Cancel was ignored")
except mm.InterruptProcessingException:
    pass
assert len(passes) == 2, passes  # stopped right after the keyframe pass (both branches) of the first step
KeyframeEditor._pass = original_pass

# Other model families are refused with a message naming what is supported.
import types, comfy.supported_models
sdxl = types.SimpleNamespace(model=types.SimpleNamespace(model_config=comfy.supported_models.SDXL({})))
try:
    patch_model(sdxl, inversion, None, 1.0, 1.0, 20)
    raise AssertionError("an SDXL model was accepted")
except LongEditError as e:
    assert "SDXL" in str(e) and "SD1.5 or SD2.1" in str(e), e
print("OK", calls)
'''


def test_adaflow_composes_with_other_patches_and_keeps_the_input_model():
    run_in_comfy(SCRIPT, checkpoint=True)
