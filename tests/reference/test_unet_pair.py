"""The two UNets of the pair are the same function: the base every other reference pin stands on."""
from __future__ import annotations

import torch


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_comfy_and_diffusers_unets_agree(unet_pair):
    """Same VP-scale input, same integer timestep, same context -> same eps, for several timesteps.

    Bound: float32 evaluation of the same network by two implementations (different op order in attention
    and group norm) differs by a few ulps per layer; over ~30 layers that is ~1e-6 relative, so 1e-4
    leaves a wide margin while any key-mapping error (swapped q/k, wrong block) gives O(1)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 16, 24, generator=g)
    context = torch.randn(3, 77, 1024, generator=g)
    ms = unet_pair.base.model_sampling
    for t in (0, 1, 481, 981):
        with torch.no_grad():
            ours = unet_pair.base.diffusion_model(x, torch.full((3,), float(t)), context=context)
            ref = unet_pair.unet(x, t, encoder_hidden_states=context).sample
        err = rel(ours, ref)
        print(f"t={t}: comfy vs diffusers eps rel err {err:.2e} (|eps| rms {ref.pow(2).mean().sqrt():.3f})")
        assert err <= 1e-4
    # ComfyUI's sigma <-> timestep mapping lands on the same integer timesteps as diffusers' schedule.
    # diffusers takes the cumulative product of 1000 alphas in float32 (~1000 roundings of 6e-8), ComfyUI
    # in float64: they agree to ~6e-5 relative (1.3e-5 measured, at t=0).
    alphas = unet_pair.scheduler.alphas_cumprod.double()
    sigmas = ((1 - alphas) / alphas).sqrt()
    assert torch.allclose(ms.sigmas.double(), sigmas, rtol=1e-4, atol=0)
    assert [int(ms.timestep(sigmas[t:t + 1].float()).item()) for t in (0, 1, 500, 999)] == [0, 1, 500, 999]
