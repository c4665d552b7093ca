"""Chunk sizes from free memory: how many frames to hold at once."""
from __future__ import annotations

import math

HOST_CHUNK_BYTES = 256 * 2**20  # decoded uint8 frames held at once on the host
MAX_CHUNK_FRAMES = 64


def frames_per_chunk(free_device_bytes: float, device_bytes_per_frame: float, host_bytes_per_frame: float,
                     reserve: float = 0.25, cap: int = MAX_CHUNK_FRAMES) -> int:
    """Frames per chunk so that one chunk fits the free device memory (less a reserve) and a bounded
    host buffer; at least 1, at most `cap` (larger chunks no longer speed up a VAE or a UNet).

    Always an int: hosts report memory as floats (ComfyUI's `memory_required` is one), and a float chunk
    size breaks `range` and slicing far from here."""
    by_device = math.floor(float(free_device_bytes) * (1.0 - reserve) / max(1.0, float(device_bytes_per_frame)))
    by_host = math.floor(HOST_CHUNK_BYTES / max(1.0, float(host_bytes_per_frame)))
    return int(max(1, min(by_device, by_host, int(cap))))
