"""Reading long videos lazily with PyAV: probe, select frames, stream decoded chunks, read audio.

Nothing here decodes the whole video at once. `probe_video` demuxes packets (no decoding) to learn the
exact presentation timestamps of every frame, so selections, frame counts and errors are known before any
pixels are decoded; `iter_frames` then decodes only what the selection needs, one chunk at a time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Iterator

import av
import numpy as np

from ..errors import LongEditError
from .input_policy import open_input

RESIZE_MODES = ("crop", "pad", "stretch")
START_UNITS = ("frame", "second")
_TIME_EPS = 1e-6
GAP_FACTOR = 4.0  # a frame interval longer than this many times the shortest one is a gap, not the rate


@dataclass(frozen=True)
class AudioInfo:
    codec: str
    sample_rate: int
    channels: int


@dataclass(frozen=True)
class SourceInfo:
    """What the file holds, learned without decoding it."""

    path: str
    width: int  # as displayed, i.e. after rotation metadata is applied
    height: int
    rotation: int  # degrees counter-clockwise to turn a decoded frame for display: 0, 90, 180 or 270
    fps: Fraction  # average frame rate
    frame_times: np.ndarray = field(repr=False)  # sorted presentation times, seconds, float64
    frame_pts: np.ndarray = field(repr=False)  # the same in stream time-base units, int64
    is_vfr: bool
    codec: str
    pix_fmt: str
    audio: AudioInfo | None
    timestamps_synthesized: bool = False  # no timestamps in the file: frame_pts are frame indices

    @property
    def frame_count(self) -> int:
        return len(self.frame_times)

    @property
    def end_time(self) -> float:
        """When the last frame stops being shown."""
        return float(self.frame_times[-1]) + 1.0 / float(self.fps)

    @property
    def duration(self) -> float:
        return self.end_time - float(self.frame_times[0])


@dataclass(frozen=True)
class Selection:
    """Which frames to take and at what size. Defaults take every frame at the source size."""

    start: float = 0.0
    start_unit: str = "frame"  # "frame" or "second" (seconds from the first frame)
    frame_cap: int = 0  # 0: no cap
    every_nth: int = 1
    force_fps: float = 0.0  # 0: every frame once, on its own timestamp (a variable-rate source's gaps stay gaps)
    width: int = 0  # 0: from the source (keeping the aspect if the other side is given)
    height: int = 0
    resize_mode: str = "crop"
    multiple: int = 8  # output sides are rounded down to a multiple of this (VAE needs 8, some models 64)


@dataclass(frozen=True)
class Geometry:
    """How a decoded frame becomes an output frame: scale, rotate, then crop or pad to the target."""

    scaled_width: int  # display orientation
    scaled_height: int
    width: int
    height: int
    mode: str


@dataclass(frozen=True)
class LongVideo:
    """A lazy handle on a selection of a video file: the LONGEDIT_VIDEO type passed between nodes."""

    source: SourceInfo
    selection: Selection
    source_indices: np.ndarray = field(repr=False)  # output frame k shows source frame source_indices[k]
    fps: Fraction
    start_time: float  # absolute stream time of output frame 0
    geometry: Geometry
    # Seconds from start_time at which each output frame is shown, when the frames keep a variable-rate
    # source's own timing; None: frame k at k / fps.
    times: np.ndarray | None = field(default=None, repr=False)

    @property
    def frame_count(self) -> int:
        return len(self.source_indices)

    @property
    def output_times(self) -> np.ndarray:
        if self.times is not None:
            return self.times
        return np.arange(self.frame_count, dtype=np.float64) / float(self.fps)

    @property
    def width(self) -> int:
        return self.geometry.width

    @property
    def height(self) -> int:
        return self.geometry.height

    @property
    def end_time(self) -> float:
        """When the last output frame stops being shown (absolute stream time)."""
        if self.times is not None:
            return self.start_time + float(self.times[-1]) + 1.0 / float(self.fps)
        return self.start_time + self.frame_count / float(self.fps)

    @property
    def duration(self) -> float:
        return self.end_time - self.start_time

    def describe(self) -> str:
        src = self.source
        audio = (f"{src.audio.codec} {src.audio.sample_rate} Hz {src.audio.channels} ch" if src.audio
                 else "no audio")
        return (
            f"{self.frame_count} frames {self.width}x{self.height} @ {float(self.fps):.3f} fps "
            f"({self.duration:.2f} s from {self.start_time - float(src.frame_times[0]):.2f} s); "
            f"source {src.frame_count} frames {src.width}x{src.height} {src.codec}/{src.pix_fmt} "
            f"@ {float(src.fps):.3f} fps{' (variable)' if src.is_vfr else ''}"
            f"{f', rotated {src.rotation} deg' if src.rotation else ''}; {audio}"
        )


def _open(path: str) -> av.container.InputContainer:
    return open_input(path)


def _video_stream(container, path: str):
    if container.streams.video:
        return container.streams.video[0]
    if container.streams.audio:
        raise LongEditError(
            f"'{path}' has no video stream; it is an audio file.",
            "pick a video file (audio alone can be attached at Save Video through its 'audio' input).")
    raise LongEditError(f"'{path}' holds zero frames: it has no video stream with any frame in it.",
                        "pick another video, or re-export this one.")


def _rotation_of(container, stream) -> int:
    """Counter-clockwise degrees to turn decoded frames, from the first frame's display matrix."""
    try:
        container.seek(0)  # raw streams cannot seek; they carry no display matrix either
        for frame in container.decode(stream):
            return int(round(frame.rotation / 90.0)) * 90 % 360
    except av.error.FFmpegError:
        return 0
    return 0


def probe_video(path: str) -> SourceInfo:
    """Learn frame timestamps, size, rotation and audio of `path` by demuxing, without decoding frames."""
    with _open(path) as container:
        stream = _video_stream(container, path)
        pts = []
        packets = 0
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue  # the flush packet at the end
                packets += 1
                ts = packet.pts if packet.pts is not None else packet.dts
                if ts is not None:
                    pts.append(ts)
        except av.error.FFmpegError as e:
            if not packets:
                raise LongEditError(
                    f"'{path}' is corrupt: no readable video packets ({e}).", "re-export the file."
                ) from e
            # A damaged tail: keep what was readable; decoding will stop at the same place.
        if not packets:
            raise LongEditError(f"'{path}' has a video stream with zero frames.", "pick another video.")
        synthesized = not pts  # a raw stream (.h264, .hevc) carries no timestamps: frames follow at 1/fps
        if synthesized:
            rate = Fraction(stream.average_rate or stream.guessed_rate or stream.base_rate or 25)
            frame_pts = np.arange(packets, dtype=np.int64)  # the frame index is the timestamp
            time_base = 1 / rate
        else:
            frame_pts = np.unique(np.asarray(pts, dtype=np.int64))
            time_base = stream.time_base or Fraction(1, 90000)
        frame_times = frame_pts.astype(np.float64) * float(time_base)
        fps = _average_fps(stream, frame_times)
        gaps = np.diff(frame_times)
        is_vfr = bool(len(gaps) > 1 and (gaps.max() - gaps.min()) > 0.5 / float(fps))
        if is_vfr:
            # The typical interval, not the mean: a long gap (frames at 0, 0.042 and 1000 s) must not turn a
            # 24 fps clip into a 0.003 fps one. Intervals over GAP_FACTOR x the shortest count as gaps; the
            # median of the rest sets the rate, and the frames are then shown once each at this rate.
            regular = gaps[gaps <= GAP_FACTOR * gaps.min()]
            fps = Fraction(1.0 / float(np.median(regular))).limit_denominator(1001)
        rotation = _rotation_of(container, stream)
        ctx = stream.codec_context
        width, height = (ctx.height, ctx.width) if rotation in (90, 270) else (ctx.width, ctx.height)
        audio = None
        if container.streams.audio:
            a = container.streams.audio[0]
            audio = AudioInfo(a.codec_context.name, a.codec_context.sample_rate, a.codec_context.channels)
        return SourceInfo(
            path=path, width=width, height=height, rotation=rotation, fps=fps, frame_times=frame_times,
            frame_pts=frame_pts, is_vfr=is_vfr, codec=ctx.name, pix_fmt=str(ctx.pix_fmt), audio=audio,
            timestamps_synthesized=synthesized,
        )


def _average_fps(stream, frame_times: np.ndarray) -> Fraction:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if rate:
        return Fraction(rate).limit_denominator(100000)
    if len(frame_times) > 1:
        return Fraction((len(frame_times) - 1) / (frame_times[-1] - frame_times[0])).limit_denominator(1001)
    return Fraction(25)


def round_down(value: int, multiple: int) -> int:
    return max(multiple, (value // multiple) * multiple)


def plan_geometry(width: int, height: int, sel: Selection) -> Geometry:
    """Output size and the scaled size it is cut from (crop) or padded from (pad)."""
    if sel.resize_mode not in RESIZE_MODES:
        raise LongEditError(f"Unknown resize mode '{sel.resize_mode}'.", f"use one of {RESIZE_MODES}.")
    if sel.width < 0 or sel.height < 0 or sel.multiple < 1:
        raise LongEditError("Width, height and rounding must not be negative.", "use 0 for 'from the source'.")
    m = sel.multiple
    if sel.width == 0 and sel.height == 0:
        # Source size: only cut the few pixels that rounding removes; never resample.
        tw, th = round_down(width, m), round_down(height, m)
        if tw <= width and th <= height:
            return Geometry(width, height, tw, th, "crop")
        return Geometry(width, height, tw, th, "pad")  # a source smaller than one multiple
    tw = sel.width or round(sel.height * width / height)
    th = sel.height or round(sel.width * height / width)
    tw, th = round_down(tw, m), round_down(th, m)
    if sel.resize_mode == "stretch":
        return Geometry(tw, th, tw, th, "stretch")
    scale = max(tw / width, th / height) if sel.resize_mode == "crop" else min(tw / width, th / height)
    sw, sh = width * scale, height * scale
    sw = math.ceil(sw - 1e-6) if sel.resize_mode == "crop" else math.floor(sw + 1e-6)
    sh = math.ceil(sh - 1e-6) if sel.resize_mode == "crop" else math.floor(sh + 1e-6)
    return Geometry(max(sw, 1), max(sh, 1), tw, th, sel.resize_mode)


def select_frames(info: SourceInfo, sel: Selection) -> LongVideo:
    """Resolve a Selection into the list of source frames shown by each output frame."""
    if sel.start_unit not in START_UNITS:
        raise LongEditError(f"Unknown start unit '{sel.start_unit}'.", f"use one of {START_UNITS}.")
    if sel.every_nth < 1 or sel.frame_cap < 0 or sel.force_fps < 0 or sel.start < 0:
        raise LongEditError(
            "every_nth must be at least 1; start, frame_cap and force_fps must not be negative.",
            "use every_nth=1, frame_cap=0 (no cap), force_fps=0 (source rate) for the defaults.",
        )
    times = info.frame_times
    t_first = float(times[0])
    if sel.start_unit == "frame":
        first = int(sel.start)
        start_time = float(times[first]) if first < info.frame_count else math.inf
    else:
        start_time = t_first + sel.start
        first = int(np.searchsorted(times, start_time - _TIME_EPS, side="left"))
    if first >= info.frame_count or start_time >= info.end_time:
        raise LongEditError(
            f"The start ({sel.start:g} {sel.start_unit}s) is past the end of the video "
            f"({info.frame_count} frames, {info.duration:.2f} s).",
            "lower 'start'.",
        )
    if sel.force_fps > 0:
        # Resample on a constant grid: output frame k shows the latest source frame at start + k/rate.
        rate = Fraction(sel.force_fps).limit_denominator(1001)
        count = math.ceil((info.end_time - start_time) * rate - _TIME_EPS)
        grid = start_time + np.arange(max(count, 0), dtype=np.float64) / float(rate)
        indices = np.searchsorted(times, grid + _TIME_EPS, side="right") - 1
        indices = np.clip(indices, 0, info.frame_count - 1)
    else:
        # The frames that exist, each once, in timestamp order: a variable-rate source's frames keep their
        # own times (gaps are not filled with repeated frames); `rate` is its typical rate.
        rate = info.fps
        indices = np.arange(first, info.frame_count, dtype=np.int64)
    indices = indices[:: sel.every_nth]
    if sel.frame_cap:
        indices = indices[: sel.frame_cap]
    shown_at = times[indices] - start_time if info.is_vfr and sel.force_fps <= 0 else None
    if len(indices) == 0:
        raise LongEditError(
            f"The selection holds zero frames (start {sel.start:g} {sel.start_unit}s, every "
            f"{sel.every_nth}th, cap {sel.frame_cap}) of a {info.frame_count}-frame video.",
            "lower 'start' or 'every_nth', or raise 'frame_cap'.",
        )
    return LongVideo(
        source=info, selection=sel, source_indices=indices.astype(np.int64), fps=rate / sel.every_nth,
        start_time=start_time, geometry=plan_geometry(info.width, info.height, sel), times=shown_at,
    )


def open_long_video(path: str, sel: Selection | None = None) -> LongVideo:
    return select_frames(probe_video(path), sel or Selection())


def _to_output(frame: av.VideoFrame, rotation: int, geo: Geometry) -> np.ndarray:
    """Decode one frame into uint8 HxWx3 RGB at the output geometry (scaling is done by swscale)."""
    sw, sh = (geo.scaled_height, geo.scaled_width) if rotation in (90, 270) else (geo.scaled_width, geo.scaled_height)
    if (sw, sh) == (frame.width, frame.height):
        rgb = frame.to_ndarray(format="rgb24")
    else:
        rgb = frame.reformat(width=sw, height=sh, format="rgb24", interpolation="AREA").to_ndarray()
    if rotation:
        rgb = np.rot90(rgb, k=rotation // 90)
    h, w = rgb.shape[:2]
    if geo.mode == "pad" and (w < geo.width or h < geo.height):
        out = np.zeros((geo.height, geo.width, 3), dtype=np.uint8)
        y0, x0 = (geo.height - h) // 2, (geo.width - w) // 2
        out[y0:y0 + h, x0:x0 + w] = rgb[: geo.height, : geo.width]
        return out
    y0, x0 = (h - geo.height) // 2, (w - geo.width) // 2
    return np.ascontiguousarray(rgb[y0:y0 + geo.height, x0:x0 + geo.width])


def iter_frames(video: LongVideo, chunk_frames: int, start: int = 0) -> Iterator[np.ndarray]:
    """Yield the selected frames from output index `start` on, as uint8 arrays [n, H, W, 3], n <= chunk_frames.

    Decodes each needed source frame once, seeking to the nearest keyframe before the first one. A file that
    ends (or breaks) before every selected frame was decoded raises LongEditError after the frames it had.
    """
    if chunk_frames < 1:
        raise ValueError("chunk_frames must be >= 1")
    src = video.source
    wanted = video.source_indices[start:]
    if len(wanted) == 0:
        return
    buf = np.empty((min(chunk_frames, len(wanted)), video.height, video.width, 3), dtype=np.uint8)
    filled = 0
    k = 0  # next output frame to produce
    with _open(src.path) as container:
        stream = _video_stream(container, src.path)
        stream.thread_type = "AUTO"
        first_pts = int(src.frame_pts[wanted[0]])
        if wanted[0] > 0 and not src.timestamps_synthesized:  # without timestamps: decode from the start
            container.seek(first_pts, stream=stream, backward=True, any_frame=False)
        decoded = -1
        try:
            for frame in container.decode(stream):
                decoded += 1
                ts = frame.pts if frame.pts is not None else frame.dts
                if src.timestamps_synthesized:
                    j = decoded
                else:
                    j = int(np.searchsorted(src.frame_pts, ts, side="left")) if ts is not None else wanted[k]
                if j < wanted[k]:
                    continue
                # j > wanted[k] only if the decoder dropped a frame: show this one in its place.
                image = None
                while k < len(wanted) and wanted[k] <= j:
                    if image is None:
                        image = _to_output(frame, src.rotation, video.geometry)
                    buf[filled] = image
                    filled += 1
                    k += 1
                    if filled == len(buf):
                        yield buf[:filled].copy()
                        filled = 0
                if k == len(wanted):
                    break
        except av.error.FFmpegError as e:
            raise LongEditError(
                f"'{src.path}' is corrupt: decoding failed near output frame {start + k} ({e}).",
                "re-export the file, or select a range before the damage with 'frame_cap'.",
            ) from e
    if filled:
        yield buf[:filled].copy()
    if k < len(wanted):
        raise LongEditError(
            f"'{src.path}' ended after {start + k} of {start + len(wanted)} selected frames; "
            f"the file is truncated or damaged.",
            "re-export the file, or lower 'frame_cap' to the frames that exist.",
        )


def read_frames(video: LongVideo, start: int = 0, count: int | None = None) -> np.ndarray:
    """Decode output frames [start, start+count) into one uint8 array (for short clips and previews)."""
    count = video.frame_count - start if count is None else count
    out = np.empty((count, video.height, video.width, 3), dtype=np.uint8)
    k = 0
    for chunk in iter_frames(video, min(64, max(count, 1)), start):
        n = min(len(chunk), count - k)
        out[k:k + n] = chunk[:n]
        k += n
        if k == count:
            break
    return out


def read_audio(path: str, start_time: float, end_time: float) -> tuple[np.ndarray, int] | None:
    """Decode the audio of [start_time, end_time) (absolute stream seconds) as float32 [channels, samples].

    Sample-exact trim; None when the file has no audio stream.
    """
    with _open(path) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        # Packed float, one plane whatever the channel count: PyAV reads planar frames of 8 or more channels
        # through FFmpeg's 8 fixed data pointers and crashes the process (7.1 audio took ComfyUI down).
        resampler = av.AudioResampler(format="flt", layout=stream.codec_context.layout, rate=rate)
        first = round(start_time * rate)
        total = max(0, round(end_time * rate) - first)
        channels = stream.codec_context.channels
        out = np.zeros((channels, total), dtype=np.float32)
        written = 0
        next_f0 = None
        if start_time > 1.0:
            container.seek(int((start_time - 1.0) / float(stream.time_base)), stream=stream, backward=True)
        try:
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                f0 = round(frame.pts * float(stream.time_base) * rate)
                if next_f0 is not None and abs(f0 - next_f0) <= rate // 500 + 1:
                    f0 = next_f0  # contiguous: containers such as mkv round timestamps to 1 ms
                for res in resampler.resample(frame):
                    data = res.to_ndarray().reshape(-1, channels).T  # packed [1, n*channels] -> [channels, n]
                    lo, hi = max(f0, first), min(f0 + data.shape[1], first + total)
                    if hi > lo:
                        out[:, lo - first:hi - first] = data[:, lo - f0:hi - f0]
                        written = max(written, hi - first)
                    f0 += data.shape[1]
                next_f0 = f0
                if f0 >= first + total:
                    break
        except av.error.FFmpegError as e:
            raise LongEditError(f"The audio of '{path}' is corrupt ({e}).", "re-export the file.") from e
        return out[:, :written], rate  # a stream that ends early is not padded with silence
