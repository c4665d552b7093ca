"""LIVEditor nodes: the ISA paper's in-context video editor on ComfyUI's own Wan model.

ComfyUI's Load Diffusion Model loads a LIVEditor-14B file as a Wan 14B model and leaves out the weights it does
not know (the source patch embedding and the per-block gates). `LIVEditor` reads those from the same file and
patches a clone of the MODEL through the ModelPatcher API only:
* the source latent rides in the conditioning as `time_dim_concat` (ComfyUI's Wan appends it after the target
  frames and returns only the target frames), for the positive and the negative prompt alike;
* a DIFFUSION_MODEL wrapper splits long latents into overlapping clips (see core/isa/liveditor.py) and puts the
  call's [target | source] facts (source tokens, RoPE with both halves from 0) into transformer_options;
* a `dit` double_block replace per block swaps in those positions, re-embeds the source tokens with the source
  patch embedding (block 0) and computes the block's gate from its modulated input;
* an attention override adds gate x pooled attention to the self-attention of whatever runs inside: exact
  attention, or ISA when ISA Sparse Attention was applied BEFORE this node.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

import comfy.ldm.common_dit
import comfy.model_management
import comfy.patcher_extension
import comfy.utils
import folder_paths
import node_helpers
from comfy_api.latest import io

from ..core.errors import LongEditError
from ..core.isa.liveditor import (TRAINED_CLIP_LATENT_FRAMES, LiveditorWeights, add_gated_pooled,
                                  check_matches_model, check_source, denoise_in_windows, gate_values, liveditor_keys,
                                  modulated_input, pad_frames, sequence_position_ids, wan_frame_count,
                                  weights_from_tensors)
from .comfy_glue import LongVideoType

WRAPPER_KEY = "longedit_liveditor"
STATE_KEY = "longedit_liveditor"


def read_liveditor_weights(path: str) -> LiveditorWeights:
    """Only the LIVEditor tensors of a checkpoint (safetensors are read lazily: the 28 GB file is not loaded)."""
    what = f"'{os.path.basename(path)}'"
    if path.lower().endswith((".safetensors", ".sft")):
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            names = liveditor_keys(f.keys())
            tensors = {name: f.get_tensor(key) for name, key in names.items()}
    else:
        state = comfy.utils.load_torch_file(path, safe_load=True)
        for wrapper in ("state_dict", "module", "weights"):  # the authors' .bin files may nest the weights
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
        tensors = {name: state[key] for name, key in liveditor_keys(state.keys()).items()}
    return weights_from_tensors(tensors, what)


@dataclass
class CallState:
    """What one model call (one clip of one sampling step) needs inside the blocks; lives in its
    transformer_options, so nothing is shared between calls."""
    target_tokens: int
    source_tokens: torch.Tensor  # [B, N_source, dim], embedded with the source patch embedding
    freqs: torch.Tensor  # RoPE of the [target | source] sequence, each half from position 0
    gate: torch.Tensor | None = None  # [B, N] of the block now running, until its self-attention takes it


class LiveditorPatch:
    """The callables installed on one clone; `weights` stay on the CPU, a copy per device/dtype is cached."""

    def __init__(self, weights: LiveditorWeights, clip_frames: int, overlap: int, previous_override=None,
                 previous_blocks: dict | None = None):
        self.weights, self.clip_frames, self.overlap = weights, clip_frames, overlap
        self.previous_override = previous_override
        self.previous_blocks = previous_blocks or {}
        self._cast: dict = {}
        self.counts = {"calls": 0, "gated": 0}  # for tests and debugging

    def weights_on(self, device, dtype) -> LiveditorWeights:
        key = (str(device), dtype)
        if key not in self._cast:
            self._cast = {key: self.weights.to(device, dtype)}
        return self._cast[key]

    # -- DIFFUSION_MODEL wrapper: clips of a long latent, and the per-call state
    def diffusion_model(self, executor, x, timestep, context, clip_fea=None, time_dim_concat=None,
                        transformer_options=None, **kwargs):
        check_source(tuple(x.shape), None if time_dim_concat is None else tuple(time_dim_concat.shape))
        model = executor.class_obj

        def predict(start: int, end: int) -> torch.Tensor:
            target, source = x[:, :, start:end], time_dim_concat[:, :, start:end].to(x)
            options = dict(transformer_options or {})
            options[STATE_KEY] = self.call_state(model, target, source)
            self.counts["calls"] += 1
            return executor(target, timestep, context, clip_fea, source, options, **kwargs)

        return denoise_in_windows(predict, tuple(x.shape), self.clip_frames, self.overlap, dtype=x.dtype)

    def call_state(self, model, target: torch.Tensor, source: torch.Tensor) -> CallState:
        patch = model.patch_size
        padded = comfy.ldm.common_dit.pad_to_patch_size(source, patch)
        weights = self.weights_on(target.device, torch.float32)
        # the same float32 convolution ComfyUI's Wan runs for the target's patch embedding
        tokens = torch.nn.functional.conv3d(padded.float(), weights.source_weight, weights.source_bias, stride=patch)
        grid = tuple(tokens.shape[2:])
        tokens = tokens.flatten(2).transpose(1, 2).to(target.dtype)
        ids = sequence_position_ids(grid, grid).to(device=target.device, dtype=target.dtype)[None]
        freqs = model.rope_embedder(ids).movedim(1, 2)  # what WanModel.rope_encode does for one grid
        return CallState(target_tokens=tokens.shape[1], source_tokens=tokens, freqs=freqs)

    # -- dit double_block replace: positions, source embedding, the block's gate
    def block(self, index: int, model):
        def replace(args: dict, extra: dict) -> dict:
            state: CallState | None = args["transformer_options"].get(STATE_KEY)
            if state is None:  # a call that did not go through our wrapper: leave it alone
                return self._inner(index, args, extra)
            x = args["img"]
            if index == 0:  # ComfyUI embedded the source frames with the target embedding: use the source one
                x = torch.cat([x[:, :state.target_tokens], state.source_tokens.to(x)], dim=1)
            block = model.blocks[index]
            attention_input = modulated_input(x, block.norm1, block.modulation, args["vec"])
            gate_row = self.weights_on(x.device, torch.float32).gates[index]
            state.gate = gate_values(attention_input, gate_row)
            out = self._inner(index, {**args, "img": x, "pe": state.freqs}, extra)
            if state.gate is not None:
                state.gate = None
                raise LongEditError(
                    "LIVEditor's attention gate was not applied: another attention patch took the "
                    "self-attention after LIVEditor (e.g. ISA Sparse Attention placed after it).",
                    "put ISA Sparse Attention (or any attention patch) BEFORE the LIVEditor node.")
            return out

        return replace

    def _inner(self, index: int, args: dict, extra: dict) -> dict:
        previous = self.previous_blocks.get(("double_block", index))
        return previous(args, extra) if previous is not None else extra["original_block"](args)

    # -- attention override: gate x pooled attention on top of the self-attention
    def passthrough(self, func, *args, **kwargs):
        if self.previous_override is not None:
            return self.previous_override(func, *args, **kwargs)
        return func(*args, **kwargs)

    def attention(self, func, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        state: CallState | None = options.get(STATE_KEY)
        q, k, v = args[:3]
        skip_reshape = kwargs.get("skip_reshape", False)
        n_q, n_k = (q.shape[2], k.shape[2]) if skip_reshape else (q.shape[1], k.shape[1])
        if state is None or state.gate is None or n_q != n_k or state.gate.shape[1] != n_q:
            return self.passthrough(func, *args, **kwargs)
        gate, state.gate = state.gate, None
        out = self.passthrough(func, *args, **kwargs)
        heads = kwargs.get("heads", args[3] if len(args) > 3 else None)
        if not skip_reshape:  # [B, N, H*d] -> [B, H, N, d]
            b, n, width = q.shape
            q, k, v = (t.view(b, n, heads, width // heads).transpose(1, 2) for t in (q, k, v))
        if kwargs.get("skip_output_reshape", False):
            self.counts["gated"] += 1
            return add_gated_pooled(out, q, k, v, gate)
        b, n, width = out.shape
        gated = add_gated_pooled(out.view(b, n, heads, width // heads).transpose(1, 2), q, k, v, gate)
        self.counts["gated"] += 1
        return gated.transpose(1, 2).reshape(b, n, width)


def is_wan(model) -> bool:
    return type(model.model.model_config).__name__.upper().startswith("WAN")


def patch_liveditor(model, weights: LiveditorWeights, clip_frames: int = TRAINED_CLIP_LATENT_FRAMES,
                    overlap: int = 5):
    """A clone of a Wan MODEL that runs LIVEditor; the input MODEL is unchanged."""
    if not is_wan(model):
        raise LongEditError(f"LIVEditor runs on a Wan 14B model; this MODEL is "
                            f"'{type(model.model.model_config).__name__}'.",
                            "load the LIVEditor-14B file with ComfyUI's Load Diffusion Model node.")
    diffusion = model.model.diffusion_model
    check_matches_model(weights, diffusion.dim, len(diffusion.blocks), tuple(diffusion.patch_embedding.weight.shape))
    patched = model.clone()
    options = patched.model_options.setdefault("transformer_options", {})
    patch = LiveditorPatch(weights, clip_frames, overlap, previous_override=options.get("optimized_attention_override"),
                           previous_blocks=dict(options.get("patches_replace", {}).get("dit", {})))

    def override(func, *args, **kwargs):  # a function: clones deep-copy model_options, functions stay shared
        return patch.attention(func, *args, **kwargs)

    override.liveditor = patch  # for inspection (tests, debugging)
    options["optimized_attention_override"] = override
    for index in range(len(diffusion.blocks)):
        patched.set_model_patch_replace(patch.block(index, diffusion), "dit", "double_block", index)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY,
                                 patch.diffusion_model)
    return patched


def with_source(conditioning, source: torch.Tensor):
    """The conditioning with the source latent attached (ComfyUI's Wan appends it after the target frames)."""
    return node_helpers.conditioning_set_values(conditioning, {"time_dim_concat": source})


class Liveditor(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LongEditLiveditor",
            display_name="LIVEditor (in-context video edit)",
            category="LongEdit/liveditor",
            description=(
                "LIVEditor-14B, the ISA paper's in-context video editor: the model sees [edited video | source "
                "video] as one sequence and writes the edit the prompt asks for. Connect its MODEL, positive, "
                "negative and latent to a KSampler (authors: 32 steps, cfg 2.5, uni_pc, shift 6 through "
                "ModelSamplingSD3). Put ISA Sparse Attention (context 'second half') before it to speed it up."),
            inputs=[
                io.Model.Input("model", tooltip="The LIVEditor-14B file loaded by ComfyUI's Load Diffusion Model "
                                                "(ComfyUI sees a Wan 14B model)."),
                io.Conditioning.Input("positive", tooltip="The edit prompt (umt5-xxl through CLIP Text Encode)."),
                io.Conditioning.Input("negative", tooltip="The negative prompt; it also sees the source video."),
                io.Latent.Input("source", tooltip="The source video encoded by the Wan VAE (VAE Encode on Load "
                                                  "Video's frames; pad them to 4k+1 first)."),
                io.Combo.Input("liveditor_name", options=folder_paths.get_filename_list("diffusion_models"),
                               tooltip="The same LIVEditor file as in Load Diffusion Model: its source embedding "
                                       "and attention gates are read from here."),
                io.Int.Input("clip_frames", default=TRAINED_CLIP_LATENT_FRAMES, min=1, max=1000,
                             tooltip="Latent frames per model call (21 = 81 video frames, what LIVEditor was "
                                     "trained on). Longer videos are edited as overlapping clips."),
                io.Int.Input("overlap", default=5, min=0, max=999,
                             tooltip="Latent frames shared by neighbouring clips; their predictions are blended "
                                     "with linear ramps at every step so seams do not show."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The patched clone; the input MODEL is unchanged."),
                io.Conditioning.Output(display_name="positive", tooltip="The prompt with the source attached."),
                io.Conditioning.Output(display_name="negative", tooltip="The negative prompt with the source."),
                io.Latent.Output(display_name="latent", tooltip="An empty target latent shaped like the source."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, source, liveditor_name, clip_frames, overlap) -> io.NodeOutput:
        weights = read_liveditor_weights(folder_paths.get_full_path_or_raise("diffusion_models", liveditor_name))
        samples = source["samples"]
        if samples.ndim != 5:
            raise LongEditError(f"The source LATENT has shape {tuple(samples.shape)}, not a video latent "
                                f"[batch, channels, frames, height, width].",
                                "encode the source frames with the Wan VAE (VAE Encode + Load VAE wan_2.1_vae).")
        patched = patch_liveditor(model, weights, clip_frames, overlap)
        empty = torch.zeros_like(samples, device=comfy.model_management.intermediate_device())
        return io.NodeOutput(patched, with_source(positive, samples), with_source(negative, samples),
                             {"samples": empty})


class PadFramesForWan(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LongEditPadFramesForWan",
            display_name="Pad Frames for Wan VAE",
            category="LongEdit/liveditor",
            description="The Wan VAE keeps 4k+1 frames and drops the rest: this repeats the last frame up to the "
                        "next 4k+1. Trim Frames to Video cuts the decoded frames back to the source's count.",
            inputs=[io.Image.Input("images", tooltip="The video frames (e.g. Load Video's images).")],
            outputs=[io.Image.Output(display_name="images", tooltip="The frames, padded to 4k+1.")],
        )

    @classmethod
    def execute(cls, images) -> io.NodeOutput:
        return io.NodeOutput(pad_frames(images, wan_frame_count(images.shape[0])))


class TrimFramesToVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LongEditTrimFramesToVideo",
            display_name="Trim Frames to Video",
            category="LongEdit/liveditor",
            description="Keeps the first frames, as many as the source video selection has (undoes Pad Frames "
                        "for Wan VAE after VAE Decode), so Save Video gets the source's frame count and audio.",
            inputs=[io.Image.Input("images", tooltip="Decoded frames (at least as many as the video's)."),
                    LongVideoType.Input("video", tooltip="The source handle from Load Video (LongEdit).")],
            outputs=[io.Image.Output(display_name="images", tooltip="The first frames, in order.")],
        )

    @classmethod
    def execute(cls, images, video) -> io.NodeOutput:
        return io.NodeOutput(trim_frames(images, video.frame_count))


def trim_frames(images: torch.Tensor, frame_count: int) -> torch.Tensor:
    if images.shape[0] < frame_count:
        raise LongEditError(f"Only {images.shape[0]} frames arrived, fewer than the video's {frame_count}.",
                            "decode the latent made from Pad Frames for Wan VAE's output of the same video.")
    return images[:frame_count]
