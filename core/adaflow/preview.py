"""A picture of a keyframe plan: one thumbnail per clip (its first candidate) above a clip timeline strip."""
from __future__ import annotations

import math

import numpy as np

MAX_THUMBNAILS = 48


def clip_colors(count: int) -> np.ndarray:
    """Distinct, bright colours (golden-angle hues), uint8 [count, 3]."""
    hues = (np.arange(count) * 0.618034) % 1.0
    k = (hues[:, None] * 6 + np.array([5, 3, 1])) % 6
    rgb = 1 - np.clip(np.minimum(k, 4 - k), 0, 1) * 0.75
    return (rgb * 255).astype(np.uint8)


def plan_preview(thumbnails: np.ndarray, clip_starts: np.ndarray, candidates: np.ndarray, frame_count: int,
                 width: int = 1024) -> np.ndarray:
    """uint8 [H, width, 3]. thumbnails: uint8 [clips, h, w, 3], one per clip (at most MAX_THUMBNAILS are shown,
    evenly chosen). Each thumbnail has its clip's colour as a border; the strip below shows every clip's
    span in that colour, with a white tick at each keyframe candidate."""
    clips = len(clip_starts) - 1
    colors = clip_colors(clips)
    shown = np.unique(np.linspace(0, clips - 1, min(clips, MAX_THUMBNAILS)).round().astype(int))
    cols = min(len(shown), 8)
    rows = math.ceil(len(shown) / cols)
    cell_w = width // cols
    th, tw = thumbnails.shape[1:3]
    cell_h = max(8, round(cell_w * th / tw))
    strip_h = 32
    image = np.full((rows * cell_h + strip_h, width, 3), 24, dtype=np.uint8)
    for n, clip in enumerate(shown):
        y, x = (n // cols) * cell_h, (n % cols) * cell_w
        image[y:y + cell_h, x:x + cell_w] = colors[clip]
        thumb = _resize_nearest(thumbnails[clip], cell_h - 6, cell_w - 6)
        image[y + 3:y + cell_h - 3, x + 3:x + cell_w - 3] = thumb
    top = rows * cell_h
    edges = (clip_starts * width // max(frame_count, 1)).astype(int)
    for clip in range(clips):
        image[top + 4:top + strip_h - 4, edges[clip]:max(edges[clip + 1], edges[clip] + 1)] = colors[clip]
    for frame in np.unique(candidates):
        x = min(int(frame * width // max(frame_count, 1)), width - 1)
        image[top:top + strip_h, x] = 255
    return image


def _resize_nearest(image: np.ndarray, height: int, width: int) -> np.ndarray:
    ys = np.arange(height) * image.shape[0] // height
    xs = np.arange(width) * image.shape[1] // width
    return image[ys][:, xs]
