"""One random-weight UNet with SD2.1-base's architecture, as ComfyUI's model and as diffusers' model.

Same topology as SD2.1-base (4 levels, 2 res blocks each, spatial transformers with linear projections at
the first 3 levels and the middle, 1024-dim context, 64-dim heads, eps prediction, the scaled-linear
0.00085..0.012 schedule); channel widths reduced 5x (64, 128, 256, 256) so that the tier runs on a CPU.
The ComfyUI side is built the way ComfyUI builds an SD2 checkpoint (supported_models.SD20 -> BaseModel ->
ModelPatcher); the diffusers side is UNet2DConditionModel with the weights converted by diffusers' own
LDM -> diffusers checkpoint converter, so neither side's key mapping is ours.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MODEL_CHANNELS = 64
CHANNEL_MULT = (1, 2, 4, 4)
HEAD_DIM = 64
CONTEXT_DIM = 1024
OUT_GAIN = 50.0


@dataclass
class UNetPair:
    patcher: object  # comfy.model_patcher.ModelPatcher around comfy.model_base.BaseModel
    unet: object  # diffusers.UNet2DConditionModel, same weights
    scheduler: object  # diffusers.DDIMScheduler with SD2.1-base's scheduler config

    @property
    def base(self):
        return self.patcher.model


def comfy_unet_config() -> dict:
    levels = len(CHANNEL_MULT)
    return {
        "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
        "model_channels": MODEL_CHANNELS, "num_res_blocks": [2] * levels, "channel_mult": list(CHANNEL_MULT),
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_spatial_transformer": True, "use_linear_in_transformer": True, "context_dim": CONTEXT_DIM,
        "legacy": False, "adm_in_channels": None, "use_temporal_attention": False,
        "use_temporal_resblock": False, "dtype": torch.float32,
    }


def diffusers_unet_config() -> dict:
    widths = tuple(MODEL_CHANNELS * m for m in CHANNEL_MULT)
    return {
        "sample_size": 32, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": widths,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        # diffusers' SD2 configs name the head COUNT per level attention_head_dim
        "attention_head_dim": tuple(w // HEAD_DIM for w in widths),
        "cross_attention_dim": CONTEXT_DIM, "use_linear_projection": True, "norm_num_groups": 32,
    }


def sd21_ddim_scheduler():
    """DDIMScheduler exactly as stabilityai/stable-diffusion-2-1-base's scheduler_config.json sets it."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                         steps_offset=1, prediction_type="epsilon")


def random_ldm_state_dict(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random values for every tensor of `model`, scaled so that activations stay O(1) through the UNet:
    weights ~ N(0, 1/fan_in), biases ~ N(0, 0.02^2), norm scales ~ 1 + N(0, 0.05^2)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in sorted(model.state_dict().items()):
        if "norm" in name and p.ndim == 1:
            v = 1 + 0.05 * torch.randn(p.shape, generator=g) if name.endswith("weight") else \
                0.02 * torch.randn(p.shape, generator=g)
        elif p.ndim == 1:
            v = 0.02 * torch.randn(p.shape, generator=g)
        else:
            fan_in = math.prod(p.shape[1:])
            v = torch.randn(p.shape, generator=g) / math.sqrt(fan_in)
        out[name] = v.to(p.dtype)
    # The last conv sees ~unit activations through a 1/fan_in init and would give eps of rms ~0.02; scale
    # it so that eps is O(1) like a trained model's, or the inversion would barely depend on the UNet.
    out["out.2.weight"] *= OUT_GAIN
    return out


def build_unet_pair(seed: int = 0) -> UNetPair:
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = comfy.supported_models.SD20(comfy_unet_config())
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({}, device=torch.device("cpu"))
    weights = random_ldm_state_dict(base.diffusion_model, seed)
    missing, unexpected = base.diffusion_model.load_state_dict(weights, strict=True), None
    base.eval()
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                               offload_device=torch.device("cpu"))

    unet = UNet2DConditionModel(**diffusers_unet_config())
    ldm = {f"model.diffusion_model.{k}": v for k, v in weights.items()}
    converted = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    unet.load_state_dict(converted, strict=True)
    unet.eval()
    return UNetPair(patcher=patcher, unet=unet, scheduler=sd21_ddim_scheduler())
