"""DIFT features through our node's featurizer (AdaFlow Keyframe Selection on a ComfyUI model) against a
transcription of the authors' featurizer (dift_sd.py: SDFeaturizer.forward / OneStepSDPipeline) on
diffusers, with the node's default timestep and ensemble and the same noise draws."""
from __future__ import annotations

import torch


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


class _Stop(Exception):
    pass


@torch.no_grad()
def reference_dift(unet, scheduler, latents: torch.Tensor, noise: torch.Tensor, t: int,
                   context: torch.Tensor) -> torch.Tensor:
    """Per frame: the latent repeated `ensemble` times, DDIMScheduler.add_noise to timestep t, the UNet with
    the null prompt up to the output of up_blocks[2] (up_ft_index 2), mean over the ensemble.

    The reference gets its latents by encoding the frame once per ensemble member (a VAE posterior sample
    each) from [0, 1] pixels; this takes the latents as given (see docs/faithful.md)."""
    captured = {}

    def grab(module, args, output):
        captured["h"] = output
        raise _Stop

    hook = unet.up_blocks[2].register_forward_hook(grab)
    out = []
    try:
        for latent in latents:
            batch = latent[None].expand(len(noise), -1, -1, -1)
            timestep = torch.tensor(t, dtype=torch.long)
            noisy = scheduler.add_noise(batch, noise, timestep)
            try:
                unet(noisy, timestep, encoder_hidden_states=context.expand(len(noise), -1, -1))
            except _Stop:
                pass
            out.append(captured.pop("h").mean(0))
    finally:
        hook.remove()
    return torch.stack(out)


def schema_default(node, name: str):
    return next(i.default for i in node.define_schema().inputs if i.id == name)


def test_dift_features_match_the_reference_featurizer(unet_pair):
    """Bound 1e-3 relative: our features come back as float16 (2^-11 rounding); the UNets agree to ~1e-6."""
    from longedit.core.adaflow.dift import dift_feature_chunks, ensemble_noise
    from longedit.nodes.adaflow_keyframes import AdaFlowKeyframeSelection, make_featurizer

    t = schema_default(AdaFlowKeyframeSelection, "feature_timestep")
    ensemble = schema_default(AdaFlowKeyframeSelection, "ensemble")
    assert (t, ensemble) == (0, 8)  # dift.forward(frame, prompt='', t=0, up_ft_index=[2], ensemble_size=8)
    g = torch.Generator().manual_seed(4)
    raw = torch.randn(5, 4, 8, 24, generator=g) * 5
    context = torch.randn(1, 77, 1024, generator=g)  # stands for CLIP's embedding of the empty prompt
    _, featurize = make_featurizer(unet_pair.patcher, context, t)
    ours = torch.cat(list(dift_feature_chunks(raw, featurize, ensemble, seed=7, frames_per_chunk=2)))

    noise = ensemble_noise(tuple(raw.shape[1:]), ensemble, seed=7)  # the same draws for every frame
    expected = reference_dift(unet_pair.unet, unet_pair.scheduler, raw * 0.18215, noise, t, context)
    assert ours.shape == expected.shape  # [frames, 2 * model_channels, h, w]: up_blocks[2] at the latent grid
    errors = [rel(a, b) for a, b in zip(ours, expected)]
    print(f"DIFT (t={t}, ensemble {ensemble}) vs diffusers reference: max rel err per frame {max(errors):.2e}")
    assert max(errors) <= 1e-3
    # a wrong timestep is visible at this size: t=50 (the old default) moves the features by far more
    _, featurize_50 = make_featurizer(unet_pair.patcher, context, 50)
    off = torch.cat(list(dift_feature_chunks(raw, featurize_50, ensemble, seed=7, frames_per_chunk=2)))
    assert rel(off, expected) > 10 * max(errors)
