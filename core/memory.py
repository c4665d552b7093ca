"""Chunk sizes from free memory: how many frames to hold at once."""
from __future__ import annotations

HOST_CHUNK_BYTES = 256 * 2**20  # decoded uint8 frames held at once on the host
MAX_CHUNK_FRAMES = 64


def frames_per_chunk(free_device_bytes: int, device_bytes_per_frame: int, host_bytes_per_frame: int,
                     reserve: float = 0.25) -> int:
    """Frames per chunk so that one chunk fits the free device memory (less a reserve) and a bounded
    host buffer; at least 1, at most MAX_CHUNK_FRAMES (larger chunks no longer speed up a VAE)."""
    by_device = int(free_device_bytes * (1.0 - reserve)) // max(1, device_bytes_per_frame)
    by_host = HOST_CHUNK_BYTES // max(1, host_bytes_per_frame)
    return max(1, min(by_device, by_host, MAX_CHUNK_FRAMES))
