"""Where a model call sits in the sampler's schedule, from ComfyUI-style transformer_options."""
from __future__ import annotations

import torch


def step_index(transformer_options: dict | None) -> int:
    """Sampling step of the current call, from the sampler's schedule (0 when unknown)."""
    if not transformer_options or "sample_sigmas" not in transformer_options or "sigmas" not in transformer_options:
        return 0
    schedule = transformer_options["sample_sigmas"]
    sigma = transformer_options["sigmas"].flatten()[0]
    return int(torch.argmin((schedule.to(sigma.device) - sigma).abs()))
