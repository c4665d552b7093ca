"""How the keyframe pass slims its extended attention: the policy and its knobs (host-agnostic settings).

The keyframe pass's edited branch attends, from every keyframe, to the tokens of all K keyframes (extended
attention, O(K^2) in the keyframes). Three policies:
- full: exact extended attention, whatever K;
- aas: AdaFlow's Adaptive Attention Slimming: with more than `kv_budget` keyframes, each keyframe keeps the
  `kv_budget` frames' worth of tokens that DIFT ranks most similar to it (needs a keyframe plan);
- isa: In-context Sparse Attention over the in-context sequence [this keyframe | the other keyframes]
  (core/adaflow/keyframe_isa.py), with the ratios below.
Keyframe Editing alone means `aas` with its own `kv_budget`; the AdaFlow Attention Slimming node sets these
settings explicitly, and then they win (see `effective_slimming`).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import LongEditError

POLICIES = ("full", "aas", "isa")
ISA_BACKENDS = ("auto", "torch")


@dataclass(frozen=True)
class KeyframeSlimming:
    policy: str = "aas"
    kv_budget: int = 20  # aas: keyframes whose full K/V each keyframe keeps
    alpha_s: float = 0.15  # isa: share of the other keyframes' KV blocks kept (ranked by the ISA rule)
    alpha_f: float = 0.5  # isa: share of each keyframe's query blocks that take exact attention
    alpha_ns: float = 0.0625  # isa: share of kept KV blocks a non-sharp query block still attends exactly
    block_size: int = 64  # isa: tokens per block
    backend: str = "auto"  # isa: 'auto' (Triton for the Taylor rows on CUDA), 'torch' (no Triton)

    def validate(self) -> "KeyframeSlimming":
        if self.policy not in POLICIES:
            raise LongEditError(f"Unknown attention slimming policy '{self.policy}'.", f"use one of {POLICIES}.")
        if self.kv_budget < 1:
            raise LongEditError(f"kv_budget must be at least 1 (got {self.kv_budget}).", "set kv_budget >= 1.")
        for name in ("alpha_s", "alpha_f", "alpha_ns"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise LongEditError(f"{name} must lie in [0, 1] (got {value}).", f"set {name} between 0 and 1.")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise LongEditError(f"block_size must be a power of two >= 16 (got {self.block_size}).", "use 64.")
        if self.backend not in ISA_BACKENDS:
            raise LongEditError(f"Unknown ISA backend '{self.backend}'.", f"use one of {ISA_BACKENDS}.")
        return self


def effective_slimming(settings: dict) -> KeyframeSlimming:
    """The slimming a model's AdaFlow settings ask for: the Attention Slimming node's, when it is on the model
    (in either order with Keyframe Editing), else AAS with Keyframe Editing's kv_budget."""
    explicit = settings.get("slimming")
    if explicit is not None:
        return explicit
    return KeyframeSlimming(policy="aas", kv_budget=int(settings.get("kv_budget", KeyframeSlimming.kv_budget)))
