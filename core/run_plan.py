"""The memory plan of a long edit: what a run will hold on the GPU, in RAM and on disk, checked up front.

Printed before the heavy work starts; a run that cannot fit the free disk or RAM is refused with the
numbers, instead of failing hours later.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import LongEditError

GIB = 2**30
SAMPLER_COPIES = 4  # the sampler holds the latent batch several times (input, state, denoised, output)


@dataclass(frozen=True)
class RunPlan:
    frames: int
    latent_shape: tuple[int, int, int]  # c, h, w
    steps: int
    clips: int | None = None  # keyframes per step (one per clip); None: every frame is a keyframe
    per_clip: int = 3
    attention_tokens: int = 0  # tokens over all attention levels of one frame (for the correspondences)
    chunk_frames: int | None = None
    gpu_bytes: int | None = None  # the host's estimate for the keyframe pass, if it has one

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
        return SAMPLER_COPIES * self.latent_bytes

    @property
    def disk_bytes(self) -> int:
        return self.trajectory_bytes + self.matches_bytes

    def describe(self) -> str:
        keyframes = f"{self.clips} keyframes per step" if self.clips else "every frame a keyframe"
        parts = [f"{self.frames} frames, {keyframes}, {self.steps} steps",
                 f"RAM ~{self.ram_bytes / GIB:.2f} GiB (latent batches)",
                 f"disk ~{self.disk_bytes / GIB:.2f} GiB (trajectory {self.trajectory_bytes / GIB:.2f}, "
                 f"correspondences {self.matches_bytes / GIB:.2f})"]
        if self.chunk_frames:
            parts.append(f"non-keyframes in chunks of {self.chunk_frames}")
        if self.gpu_bytes:
            parts.append(f"GPU ~{self.gpu_bytes / GIB:.1f} GiB for the keyframe pass")
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
    if ram is not None and plan.ram_bytes > 0.9 * ram:
        raise LongEditError(
            f"This run needs ~{plan.ram_bytes / GIB:.1f} GiB of RAM but {ram / GIB:.1f} GiB are available "
            f"({plan.describe()}).", "select fewer frames (frame_cap / every_nth) or a smaller size.")
