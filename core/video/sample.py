"""Generated videos: test inputs, benchmark inputs and the runner's sample, made with PyAV.

Each frame carries its own index as a row of black/white bit cells along the top, so a reader can tell
exactly which source frame it received, through lossy compression. The rest of the frame holds moving
shapes whose colours change at the scene cuts, so clip segmentation has something real to find.
"""
from __future__ import annotations

from fractions import Fraction
from typing import Sequence

import av
import numpy as np

INDEX_BITS = 14  # frames up to 16,383
INDEX_ROWS = 8  # height of the bit strip


def frame_image(index: int, width: int, height: int, scene: int = 0) -> np.ndarray:
    """uint8 HxWx3: a bit strip with `index` on top, then a scene-coloured background with moving shapes."""
    rng = np.random.default_rng(1000 + scene)
    bg = rng.integers(30, 225, size=3)
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = bg
    # Shapes move a fixed number of pixels per frame, so correspondences have a known answer.
    for s in range(3):
        cx = (index * (2 + s) + s * width // 3) % max(width, 1)
        cy = height // 2 + int((height // 4) * np.sin(index / 15.0 + s))
        r = max(3, min(width, height) // (6 + 2 * s))
        color = rng.integers(0, 256, size=3)
        y0, y1, x0, x1 = max(cy - r, 0), min(cy + r + 1, height), max(cx - r, 0), min(cx + r + 1, width)
        yy, xx = np.ogrid[y0:y1, x0:x1]  # only the shape's bounding box
        image[y0:y1, x0:x1][(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = color
    cell = max(1, width // INDEX_BITS)
    for b in range(INDEX_BITS):
        image[:INDEX_ROWS, b * cell:(b + 1) * cell] = 255 if (index >> b) & 1 else 0
    return image


def read_index(image: np.ndarray) -> int:
    """Recover the index written by `frame_image` (frames must not have been resized or cropped)."""
    width = image.shape[1]
    cell = max(1, width // INDEX_BITS)
    strip = image[1:INDEX_ROWS - 1].astype(np.float32).mean(axis=(0, 2))
    value = 0
    for b in range(INDEX_BITS):
        if strip[b * cell + cell // 4:(b + 1) * cell - cell // 4].mean() > 127:
            value |= 1 << b
    return value


def write_sample_video(path: str, frames: int = 48, width: int = 128, height: int = 96, fps: float = 24,
                       codec: str = "libx264", pix_fmt: str = "yuv420p", container: str | None = None,
                       audio_seconds: float | None = None, audio_codec: str = "aac", sample_rate: int = 44100,
                       scene_cuts: Sequence[int] = (), frame_times: Sequence[float] | None = None,
                       rotation: int = 0, video: bool = True) -> str:
    """Write a test video. `frame_times` (seconds) makes it variable-rate; `rotation` sets display
    metadata (degrees counter-clockwise); `audio_seconds` adds a sine tone whose pitch encodes time."""
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(path, "w", format=container) as out:
        vstream = None
        if video:
            vstream = out.add_stream(codec, rate=rate)
            vstream.width, vstream.height, vstream.pix_fmt = width, height, pix_fmt
            if codec in ("libx264", "libx265"):
                vstream.options = {"preset": "ultrafast", "crf": "18"}
                if codec == "libx265":
                    vstream.options["x265-params"] = "log-level=error"
            if frame_times is not None:
                vstream.codec_context.time_base = Fraction(1, 1000)
            if rotation:
                vstream.set_display_matrix(_rotation_matrix(rotation))
        astream = None
        if audio_seconds:
            astream = out.add_stream(audio_codec, rate=sample_rate, layout="stereo")
        out.start_encoding()  # write the header even if no frame follows (a zero-frame test file)
        scene = 0
        cuts = set(scene_cuts)
        for i in range(frames if video else 0):
            scene += i in cuts
            frame = av.VideoFrame.from_ndarray(frame_image(i, width, height, scene), format="rgb24")
            if frame_times is not None:
                frame.pts = round(frame_times[i] * 1000)
                frame.time_base = Fraction(1, 1000)
            else:
                frame.pts = i
            for packet in vstream.encode(frame):
                out.mux(packet)
        if vstream is not None:
            for packet in vstream.encode(None):
                out.mux(packet)
        if astream is not None:
            for packet in _tone_packets(astream, audio_seconds, sample_rate):
                out.mux(packet)
    return path


def tone(seconds: float, sample_rate: int) -> np.ndarray:
    """float32 [2, n]: left channel a sine, right a ramp of the time itself (so a trim can be read back)."""
    t = np.arange(round(seconds * sample_rate), dtype=np.float64) / sample_rate
    left = 0.25 * np.sin(2 * np.pi * 440.0 * t)
    right = (t % 1.0) - 0.5
    return np.stack([left, right]).astype(np.float32)


def _tone_packets(stream, seconds: float, sample_rate: int):
    samples = tone(seconds, sample_rate)
    block = 1024
    for i in range(0, samples.shape[1], block):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, i:i + block]), format="fltp",
                                           layout="stereo")
        frame.sample_rate = sample_rate
        frame.pts = i
        yield from stream.encode(frame)
    yield from stream.encode(None)


def _rotation_matrix(degrees: int) -> list[int]:
    """FFmpeg's 3x3 display matrix (16.16 fixed point, 2.30 for the last column) for a ccw rotation."""
    rad = np.deg2rad(degrees)
    c, s = np.cos(rad), np.sin(rad)
    # av_display_rotation_set: [cos, -sin, 0, sin, cos, 0, 0, 0, 1] in its own (transposed) convention
    m = [c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0]
    return [int(round(v * (1 << 16))) if i not in (2, 5, 8) else int(round(v * (1 << 30)))
            for i, v in enumerate(m)]
