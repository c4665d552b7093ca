"""ISA Sparse Attention: MODEL -> MODEL patch replacing a Wan model's self-attention with ISA."""
from __future__ import annotations

import math

import comfy.patcher_extension
from comfy_api.latest import io

from ..core.errors import LongEditError
from ..core.isa.policy import BACKENDS, CONTEXT_LAYOUTS, IsaAttention, IsaSettings

WRAPPER_KEY = "longedit_isa"
OTHER_MODELS = ("error", "pass through unchanged")


def is_wan(model) -> bool:
    return type(model.model.model_config).__name__.upper().startswith("WAN")


def patch_model(model, settings: IsaSettings, other_models: str = "error"):
    """A clone whose self-attention runs ISA, chained to any attention override already installed."""
    settings.validate()
    if not is_wan(model):
        if other_models == OTHER_MODELS[1]:
            return model
        raise LongEditError(
            f"ISA Sparse Attention supports the Wan family (Wan 2.1 / 2.2, 1.3B / 5B / 14B); this MODEL is "
            f"'{type(model.model.model_config).__name__}'.",
            "connect a Wan diffusion model, or set other_models to 'pass through unchanged'.")
    patched = model.clone()
    options = patched.model_options.setdefault("transformer_options", {})
    attention = IsaAttention(settings, previous=options.get("optimized_attention_override"))
    patch = getattr(patched.model.diffusion_model, "patch_size", (1, 2, 2))

    def diffusion_model_wrapper(executor, x, *args, **kwargs):
        # x [B, C, T, H, W]: one latent frame is (H / ph) * (W / pw) tokens
        attention.begin_forward(math.ceil(x.shape[-2] / patch[1]) * math.ceil(x.shape[-1] / patch[2]))
        return executor(x, *args, **kwargs)

    def override(func, *args, **kwargs):  # a function: clones deep-copy model_options, functions stay shared
        return attention(func, *args, **kwargs)

    override.isa = attention  # for inspection (tests, debugging)
    options["optimized_attention_override"] = override
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY,
                                 diffusion_model_wrapper)
    return patched


class IsaSparseAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LongEditIsaSparseAttention",
            display_name="ISA Sparse Attention",
            category="LongEdit/attention",
            description=(
                "In-context Sparse Attention (ISA) for Wan video models: self-attention prunes the context "
                "(source video) tokens, sends the sharpest query blocks to exact attention and the rest to a "
                "block-mean (0-th order Taylor) approximation. Cross-attention is untouched. Drop it between "
                "the model loader and the sampler."),
            inputs=[
                io.Model.Input("model", tooltip="A Wan 2.1 / 2.2 diffusion model (1.3B, 5B or 14B)."),
                io.Combo.Input("context", options=list(CONTEXT_LAYOUTS), default="second half",
                               tooltip="Which tokens are in-context (source) tokens: none, the second half of the "
                                       "sequence ([generated | source] layouts), or the last N latent frames."),
                io.Int.Input("context_frames", default=0, min=0, max=1000,
                             tooltip="N for 'last N latent frames' (latent frames, after the VAE's 4x time "
                                     "compression)."),
                io.Float.Input("alpha_s", default=0.15, min=0.0, max=1.0, step=0.005,
                               tooltip="Share of context KV blocks kept, ranked by how much the generated tokens "
                                       "attend to them."),
                io.Float.Input("alpha_f", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of query blocks (the sharpest) that take exact attention; 1 is exact. "
                                       "The main speed/accuracy knob: lower is faster and less exact."),
                io.Float.Input("alpha_ns", default=0.0625, min=0.0, max=1.0, step=0.005,
                               tooltip="For the other query blocks, share of kept KV blocks still attended exactly; "
                                       "the rest enter as one block-mean token each."),
                io.Int.Input("block_size", default=64, min=16, max=256, step=16,
                             tooltip="Tokens per block for pooling and routing (a power of two; the paper uses 64)."),
                io.Int.Input("exact_steps", default=0, min=0, max=1000,
                             tooltip="Keep exact attention for the first K sampling steps (where layout forms)."),
                io.Int.Input("exact_blocks", default=0, min=0, max=100,
                             tooltip="Keep exact attention in the first L transformer blocks of every step."),
                io.Combo.Input("backend", options=list(BACKENDS), default="auto",
                               tooltip="auto: sharp query blocks by cuDNN/Flash attention, the rest by the Triton "
                                       "kernel on CUDA (torch elsewhere). triton: everything in the Triton kernel. "
                                       "torch: no Triton (CPU / Mac)."),
                io.Combo.Input("other_models", options=list(OTHER_MODELS), default="error",
                               tooltip="What to do with a MODEL that is not a Wan model."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The patched clone; the input MODEL is unchanged.")],
        )

    @classmethod
    def execute(cls, model, context, context_frames, alpha_s, alpha_f, alpha_ns, block_size, exact_steps,
                exact_blocks, backend, other_models) -> io.NodeOutput:
        settings = IsaSettings(context=context, context_frames=context_frames, alpha_s=alpha_s, alpha_f=alpha_f,
                               alpha_ns=alpha_ns, block_size=block_size, exact_steps=exact_steps,
                               exact_blocks=exact_blocks, backend=backend)
        return io.NodeOutput(patch_model(model, settings, other_models))
