"""The few ComfyUI services our nodes share: directories, progress, interrupts, memory, output names."""
from __future__ import annotations

import os

import numpy as np
import torch

import comfy.model_management as mm
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..core.errors import LongEditError
from ..core.memory import frames_per_chunk
from ..core.video.paths import check_output_path, output_prefix

LongVideoType = io.Custom("LONGEDIT_VIDEO")


def allowed_roots() -> list[str]:
    """Where file inputs may come from: ComfyUI's input, output and temp directories."""
    return [folder_paths.get_input_directory(), folder_paths.get_output_directory(),
            folder_paths.get_temp_directory()]


def resume_dir() -> str:
    """Where sampling states are kept between runs: under ComfyUI's user directory, because ComfyUI empties
    its temp directory whenever it starts, and a resume after a restart is the point."""
    return os.path.join(folder_paths.get_user_directory(), "longedit", "resume")


def cache_dir() -> str:
    """Where finished inversions and keyframe plans are kept between runs (core/stage_cache.py): beside the
    sampling states, under ComfyUI's user directory, which ComfyUI does not empty when it starts."""
    return os.path.join(folder_paths.get_user_directory(), "longedit", "cache")


CACHE_LIMIT_BYTES = 64 * 2**30  # cached stage results kept in all; the least recently used go first
WEIGHT_SAMPLE = 64  # elements hashed per weight tensor: tells checkpoints and patches apart cheaply


def add_model_identity(fp, model) -> None:
    """Add to a Fingerprint what of a MODEL determines its outputs: ComfyUI's version, the architecture,
    parameterisation (eps or v) and dtype, a sample of every weight, and its weight patches (LoRAs).
    Attention patches and wrappers of other packs are functions, which a digest cannot read (as for the
    sampler's run key)."""
    from .adaflow_edit import plain_value  # ComfyUI's wrappers of patches as plain values; imported late: that
                                           # node imports the Invert and Keyframe nodes that call this
    base = model.model
    try:  # another ComfyUI may compute the same model differently (attention, casting)
        from comfyui_version import __version__ as comfy_version
    except ImportError:
        comfy_version = "unknown"
    fp.add([comfy_version, type(base.model_config).__name__, [c.__name__ for c in type(base.model_sampling).__mro__],
            str(model.model_dtype()), str(getattr(base, "manual_cast_dtype", None)),
            float(getattr(base.latent_format, "scale_factor", 1.0))])
    # The weights as loaded from the checkpoint: ComfyUI patches LoRAs into the weights of a loaded model in
    # place and keeps the originals in `backup` (shared by all clones), so a model whose patches happen to be
    # applied right now has the same key as before it was loaded.
    backup = getattr(model, "backup", {})
    for name, weight in base.state_dict().items():
        if name.startswith("diffusion_model."):
            original = backup.get(name)
            fp.add(name).add(original.weight if original is not None else weight, sample=WEIGHT_SAMPLE)
    fp.add(plain_value(model.patches), sample=WEIGHT_SAMPLE)


def scratch_dir() -> str:
    path = os.path.join(folder_paths.get_temp_directory(), "longedit")
    os.makedirs(path, exist_ok=True)
    return path


class Progress:
    """A node's progress bar that also stops promptly when the user presses Cancel."""

    def __init__(self, total: int):
        self.total = max(1, total)
        self.bar = comfy.utils.ProgressBar(self.total)

    def check(self) -> None:
        mm.throw_exception_if_processing_interrupted()

    def update(self, done: int) -> None:
        self.bar.update_absolute(done, self.total)


def vae_chunk(vae, per_frame_shape: tuple[int, ...], encode: bool, host_bytes_per_frame: int) -> int:
    """Frames per VAE call from the free memory of the VAE's device and ComfyUI's own VAE cost model."""
    cost = vae.memory_used_encode if encode else vae.memory_used_decode
    need = int(cost(per_frame_shape, vae.vae_dtype))
    return frames_per_chunk(mm.get_free_memory(vae.device), need, host_bytes_per_frame)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """IMAGE floats in [0, 1] -> uint8 RGB (drops an alpha channel)."""
    return (images[..., :3].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def output_target(prefix: str, extension: str, width: int, height: int) -> tuple[str, str, str]:
    """(final path, file name, subfolder) for a new output; ComfyUI's counter never reuses a name."""
    out_dir = folder_paths.get_output_directory()
    prefix = output_prefix(prefix)
    # ComfyUI creates the folder itself; refuse a folder behind an outside link before it does.
    check_output_path(os.path.join(out_dir, os.path.normpath(prefix)), out_dir)
    try:
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, out_dir, width, height)
    except OSError as e:  # e.g. a folder name over the file system's limit
        raise LongEditError(f"The filename_prefix '{prefix[:60]}' cannot be used as a path ({e}).",
                            "use a shorter filename_prefix made of ordinary folder and file names.") from e
    except Exception as e:  # ComfyUI refuses '..' that leaves the output directory with a bare Exception
        if "outside the output folder" not in str(e):
            raise
        raise LongEditError(f"The filename_prefix '{prefix}' leads outside ComfyUI's output directory.",
                            "use a relative prefix without '..', e.g. 'LongEdit/video'.") from e
    filename = f"{name}_{counter:05}_{extension}"
    final_path = os.path.join(folder, filename)
    check_output_path(final_path, out_dir)
    os.makedirs(folder, exist_ok=True)
    return final_path, filename, subfolder


SD_UNET_CONFIGS = ("SD15", "SD20")  # ComfyUI's model configs of SD1.x and SD2.x (2.0 and 2.1, base and v)


def check_sd_unet(model, what: str) -> None:
    """AdaFlow runs on SD1.x/SD2.x UNets (the paper uses SD2.1-base); refuse anything else clearly."""
    config = type(model.model.model_config).__name__
    if config not in SD_UNET_CONFIGS:
        raise LongEditError(
            f"{what} works with Stable Diffusion 1.x and 2.x UNets (AdaFlow uses SD2.1-base); this MODEL is "
            f"'{config}'.", "load an SD1.5 or SD2.1 checkpoint for AdaFlow; Wan models use ISA Sparse Attention.")


def latent_thumbnails(model, latents: torch.Tensor) -> np.ndarray:
    """Cheap RGB previews of latents through the model's latent-to-RGB factors (no VAE needed)."""
    fmt = model.model.latent_format
    factors = torch.tensor(fmt.latent_rgb_factors, dtype=torch.float32)  # [c, 3]
    bias = torch.tensor(fmt.latent_rgb_factors_bias or [0.0, 0.0, 0.0], dtype=torch.float32)
    rgb = torch.einsum("nchw,cr->nhwr", fmt.process_in(latents.float()), factors) + bias
    return ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy()


def card_memory(device) -> tuple[int, int]:
    """(total memory of the device, the part held outside PyTorch's allocator: the CUDA context, other
    processes). On the CPU: RAM and 0."""
    total = int(mm.get_total_memory(device))
    if getattr(device, "type", str(device)) != "cuda":
        return total, 0
    free, _ = torch.cuda.mem_get_info(device)
    return total, max(0, total - int(free) - torch.cuda.memory_reserved(device))

