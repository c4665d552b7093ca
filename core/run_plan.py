"""The memory plan of a long edit: what a run will hold on the GPU, in RAM and on disk, checked up front.

Printed before the heavy work starts; a run that cannot fit the free disk or RAM is refused with the
numbers, instead of failing hours later.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import LongEditError

GIB = 2**30
# fp32 full-batch latent copies in RAM at the sampler's peak, now that its state stays on the host: counted in
# ComfyUI 0.3.64's samplers.py (state, noise, start latent, denoised, d, next x; per CFG branch the batched
# input, the model output, the cond output and its count; the CFG result) -- a count, not a measurement
SAMPLER_COPIES = 16
# Euler/DDIM taken pass by pass (core/adaflow/sampling.py): the LATENT the sampler got, its zero noise, the one
# state tensor, and the output latent at the end -- counted in the same code, not measured
PASS_BY_PASS_COPIES = 4
MIN_WEIGHTS_ON_GPU = 128 * 2**20  # ComfyUI keeps at least this much of a model's weights loaded


@dataclass(frozen=True)
class GpuPlan:
    """What the sampling stage holds on one card: weights (as much as fit, the rest offloaded, as ComfyUI's
    low-VRAM loading does), the activations of the largest pass, and the keyframe outputs a step keeps for
    propagation. None of it depends on the number of frames, only on the keyframes per step."""

    card_bytes: int  # the card's total memory, as the host reports it
    reserved_bytes: int  # kept free by the host (CUDA context, ComfyUI's reserve)
    weights_bytes: int
    pass_bytes: int  # activations of the keyframe pass (the host's own estimate)
    recorded_bytes: int = 0  # the keyframe records on the device (those of the clips one chunk spans)
    chunk_pass_bytes: int = 0  # activations of one chunk of non-keyframes (sized to the free memory)

    @property
    def working_bytes(self) -> int:  # the keyframe pass runs with no records on the device; chunks with them
        return max(self.pass_bytes, self.recorded_bytes)

    @property
    def room_for_weights(self) -> int:
        return self.card_bytes - self.reserved_bytes - self.working_bytes

    @property
    def weights_on_gpu(self) -> int:
        return int(max(0, min(self.weights_bytes, self.room_for_weights)))

    @property
    def offloads(self) -> bool:
        return self.weights_on_gpu < self.weights_bytes

    @property
    def fits(self) -> bool:
        return self.room_for_weights >= min(self.weights_bytes, MIN_WEIGHTS_ON_GPU)

    @property
    def peak_bytes(self) -> int:
        return self.weights_on_gpu + max(self.pass_bytes, self.recorded_bytes + self.chunk_pass_bytes)

    def describe(self) -> str:
        weights = (f"weights {self.weights_on_gpu / GIB:.2f} of {self.weights_bytes / GIB:.2f} GiB on the GPU "
                   f"(rest offloaded)" if self.offloads else f"weights {self.weights_bytes / GIB:.2f} GiB")
        return (f"GPU ~{self.peak_bytes / GIB:.2f} GiB of a {self.card_bytes / GIB:.1f} GiB card ({weights}, "
                f"keyframe pass {self.pass_bytes / GIB:.2f} GiB, chunk pass {self.chunk_pass_bytes / GIB:.2f} GiB, "
                f"keyframe records of the clips a chunk spans {self.recorded_bytes / GIB:.2f} GiB)")


@dataclass(frozen=True)
class RunPlan:
    frames: int
    latent_shape: tuple[int, int, int]  # c, h, w
    steps: int
    clips: int | None = None  # keyframes per step (one per clip); None: every frame is a keyframe
    per_clip: int = 3
    attention_tokens: int = 0  # tokens over all attention levels of one frame (for the correspondences)
    chunk_frames: int | None = None
    gpu: GpuPlan | None = None  # the sampling stage on the card it runs on, if the host knows it
    sampler_copies: int = SAMPLER_COPIES  # float32 copies of all latents the sampler holds at its peak
    record_bytes: int = 0  # the keyframe pass's record for propagation (every keyframe, source + 2 branches)
    records_on_disk: bool = False  # the record is memory-mapped from disk (RAM too small to hold it)

    @property
    def latent_bytes(self) -> int:
        c, h, w = self.latent_shape
        return self.frames * c * h * w * 4

    @property
    def trajectory_bytes(self) -> int:
        c, h, w = self.latent_shape
        return (self.steps + 1) * self.frames * c * h * w * 2

    @property
    def matches_bytes(self) -> int:
        return self.frames * self.per_clip * self.attention_tokens * 4

    @property
    def ram_bytes(self) -> int:
        return self.sampler_copies * self.latent_bytes + (0 if self.records_on_disk else self.record_bytes)

    @property
    def disk_bytes(self) -> int:
        return self.trajectory_bytes + self.matches_bytes + (self.record_bytes if self.records_on_disk else 0)

    def describe(self) -> str:
        keyframes = f"{self.clips} keyframes per step" if self.clips else "every frame a keyframe"
        records = (f", keyframe records {self.record_bytes / GIB:.2f}" if self.record_bytes else "")
        ram_records = records if not self.records_on_disk else ""
        disk_records = records if self.records_on_disk else ""
        latents = f"{self.sampler_copies} latent copies"
        if self.sampler_copies != SAMPLER_COPIES:
            latents += f" with euler/ddim, {SAMPLER_COPIES * self.latent_bytes / GIB:.2f} GiB with other samplers"
        parts = [f"{self.frames} frames, {keyframes}, {self.steps} steps",
                 f"RAM ~{self.ram_bytes / GIB:.2f} GiB ({latents}{ram_records})",
                 f"disk ~{self.disk_bytes / GIB:.2f} GiB (trajectory {self.trajectory_bytes / GIB:.2f}, "
                 f"correspondences {self.matches_bytes / GIB:.2f}{disk_records})"]
        if self.chunk_frames:
            parts.append(f"non-keyframes in chunks of {self.chunk_frames}")
        if self.gpu is not None:
            parts.append(self.gpu.describe())
        return "LongEdit plan: " + "; ".join(parts)


def available_ram() -> int | None:
    """MemAvailable on Linux; None where it cannot be read (the check is then skipped)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def free_disk(folder: str) -> int:
    os.makedirs(folder, exist_ok=True)
    stat = os.statvfs(folder)
    return stat.f_bavail * stat.f_frsize


def check_resources(plan: RunPlan, folder: str, ram: int | None = None, disk: int | None = None) -> None:
    """Refuse a run whose disk or RAM needs exceed what is free, saying how much of each."""
    disk = free_disk(folder) if disk is None else disk
    ram = available_ram() if ram is None else ram
    if plan.disk_bytes > 0.95 * disk:
        raise LongEditError(
            f"This run needs ~{plan.disk_bytes / GIB:.1f} GiB on disk in {folder} but {disk / GIB:.1f} GiB are free "
            f"({plan.describe()}).",
            "free disk space, use fewer steps or frames, or start ComfyUI with --temp-directory on a larger disk.")
    check_gpu(plan)
    if ram is not None and plan.ram_bytes > 0.9 * ram:
        raise LongEditError(
            f"This run needs ~{plan.ram_bytes / GIB:.1f} GiB of RAM but {ram / GIB:.1f} GiB are available "
            f"({plan.describe()}).", "select fewer frames (frame_cap / every_nth) or a smaller size.")


def check_gpu(plan: RunPlan) -> None:
    """Refuse, with the numbers, an edit whose keyframe pass cannot fit the card even with the weights offloaded."""
    gpu = plan.gpu
    if gpu is None or gpu.fits:
        return
    raise LongEditError(
        f"The keyframe pass needs ~{gpu.working_bytes / GIB:.2f} GiB on the GPU besides the weights, but this "
        f"{gpu.card_bytes / GIB:.1f} GiB card leaves {(gpu.card_bytes - gpu.reserved_bytes) / GIB:.2f} GiB "
        f"({plan.describe()}).",
        "use fewer keyframes per step (a higher max_clip_length, lower tau_mean / tau_region in Keyframe "
        "Selection), a smaller size, or a larger card.")
