"""When and how ISA replaces a DiT's self-attention: which tokens are context, which calls stay exact.

A host installs `IsaAttention` as its attention override. Per model forward it learns the token layout
(`begin_forward`), then for each attention call decides: cross-attention (keys of another length) and
the first `exact_blocks` self-attention layers of every forward and the first `exact_steps` sampling steps
keep exact attention (common practice for quality); every other self-attention runs ISA with the context
range the user declared. Nothing is guessed from tensor sizes except self vs cross attention.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ...kernels import HAVE_TRITON, isa_attention
from ..errors import LongEditError
from ..schedule import step_index

CONTEXT_LAYOUTS = ("none", "second half", "last N latent frames")
BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class IsaSettings:
    context: str = "second half"
    context_frames: int = 0  # with "last N latent frames"
    alpha_s: float = 0.15
    alpha_f: float = 0.5
    alpha_ns: float = 0.0625
    block_size: int = 64
    exact_steps: int = 0
    exact_blocks: int = 0
    backend: str = "auto"

    def validate(self) -> None:
        if self.context not in CONTEXT_LAYOUTS:
            raise LongEditError(f"Unknown context layout '{self.context}'.", f"use one of {CONTEXT_LAYOUTS}.")
        if self.backend not in BACKENDS:
            raise LongEditError(f"Unknown backend '{self.backend}'.", f"use one of {BACKENDS}.")
        if self.backend == "triton" and not HAVE_TRITON:
            raise LongEditError("The 'triton' backend was chosen but Triton is not installed.",
                                "install triton (Linux + CUDA) or choose backend 'auto'.")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise LongEditError(f"block_size must be a power of two >= 16 (got {self.block_size}).", "use 64.")


def context_range(n_tokens: int, settings: IsaSettings, tokens_per_frame: int | None) -> tuple[int, int]:
    """[start, end) of the context tokens for a sequence of `n_tokens` (empty range: no context)."""
    if settings.context == "none":
        return n_tokens, n_tokens
    if settings.context == "second half":
        return n_tokens // 2, n_tokens
    if not tokens_per_frame:
        raise LongEditError("'last N latent frames' needs the model's token grid, which was not found.",
                            "use the 'second half' layout for this model.")
    count = settings.context_frames * tokens_per_frame
    if count > n_tokens:
        raise LongEditError(f"The context of {settings.context_frames} latent frames ({count} tokens) is longer "
                            f"than the sequence ({n_tokens} tokens).", "lower context_frames.")
    return n_tokens - count, n_tokens


@dataclass
class IsaAttention:
    """The attention override: ISA for self-attention after the exact warm-up, the chained one otherwise."""

    settings: IsaSettings
    previous: Callable | None = None  # another pack's override, kept for everything ISA does not take
    tokens_per_frame: int | None = None
    layer: int = 0
    counts: dict = field(default_factory=lambda: {"isa": 0, "exact_self": 0, "cross": 0})

    def begin_forward(self, tokens_per_frame: int | None) -> None:
        self.layer = 0
        self.tokens_per_frame = tokens_per_frame

    def passthrough(self, func, *args, **kwargs):
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def __call__(self, func, *args, **kwargs):
        """Called as ComfyUI calls an attention override: (func, q, k, v, heads, mask=..., ...)."""
        q, k, v = args[:3]
        heads = kwargs.get("heads", args[3] if len(args) > 3 else None)
        mask = kwargs.get("mask", args[4] if len(args) > 4 else None)
        skip_reshape = kwargs.get("skip_reshape", False)
        n_q = q.shape[2] if skip_reshape else q.shape[1]
        n_k = k.shape[2] if skip_reshape else k.shape[1]
        if n_q != n_k or mask is not None:
            self.counts["cross"] += 1
            return self.passthrough(func, *args, **kwargs)
        layer, self.layer = self.layer, self.layer + 1
        if layer < self.settings.exact_blocks or step_index(kwargs.get("transformer_options")) < self.settings.exact_steps:
            self.counts["exact_self"] += 1
            return self.passthrough(func, *args, **kwargs)
        self.counts["isa"] += 1
        return self.sparse(q, k, v, heads, skip_reshape, kwargs.get("skip_output_reshape", False))

    def sparse(self, q, k, v, heads, skip_reshape: bool, skip_output_reshape: bool) -> torch.Tensor:
        if not skip_reshape:  # [B, N, H*d] -> [B, H, N, d]
            b, n, width = q.shape
            q, k, v = (t.view(b, n, heads, width // heads).transpose(1, 2) for t in (q, k, v))
        ctx_start, ctx_end = context_range(q.shape[2], self.settings, self.tokens_per_frame)
        s = self.settings
        options = dict(block_size=s.block_size, alpha_s=s.alpha_s, alpha_f=s.alpha_f, alpha_ns=s.alpha_ns)
        if s.backend == "triton" and not q.is_cuda:
            raise LongEditError("The 'triton' backend needs a CUDA device.", "choose backend 'auto' or 'torch'.")
        out = isa_attention(q, k, v, ctx_start, ctx_end, backend=s.backend, **options)
        if skip_output_reshape:
            return out
        b, h, n, d = out.shape
        return out.transpose(1, 2).reshape(b, n, h * d)

