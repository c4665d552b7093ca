"""Hostile and unusual inputs through a real ComfyUI's /prompt (issue 15): a corpus generated at test time.

Every case states its expected class:
  OK   correct output, checked with PyAV directly (decoded frame count, size, fps, audio channels and
       duration), independently of the pack's own reader;
  ERR  a clear error: the message names what is wrong ('what') and how to fix it ('Fix: ...'), and nothing
       is written (nor read or written outside ComfyUI's folders).
After every case the server still answers (/system_stats) and its queue is empty.
The inputs are written once per module into the server's input/ folder (and a folder outside it).
"""
from __future__ import annotations

import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable

import av
import numpy as np
import pytest

from comfy_harness import execution_error, load_video_node
from longedit.core.video.sample import frame_image, write_sample_video

FPS = 24
SECONDS = 0.5  # 12 frames at 24 fps


# -- expectations ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Out:
    """Correct output: a video (or PNG folder) with these properties."""

    frames: int
    size: tuple[int, int]  # (width, height)
    fps: float | None = FPS
    channels: int | None = None  # None: no audio stream
    audio_seconds: float | None = None
    check: Callable | None = None  # further checks on the output path


@dataclass(frozen=True)
class Err:
    """A clear error: `what` and `fix` appear in the message; nothing is written."""

    what: str
    fix: str
    rejected: bool = False  # refused by validation (HTTP 400) rather than at run time


@dataclass(frozen=True)
class Case:
    id: str
    prompt: Callable  # (ctx) -> API prompt
    expect: Out | Err
    files: tuple[str, ...] = field(default=())


# -- generated inputs ------------------------------------------------------------------------------------
def write_media(path: str, *, frames: int = 12, width: int = 64, height: int = 48, fps: float = FPS,
                codec: str = "libx264", pix_fmt: str = "yuv420p", container: str | None = None,
                frame_times=None, layout: str | None = None, rate: int = 48000, audio_codec: str = "pcm_s16le",
                audio_seconds: float = SECONDS, options: dict | None = None) -> str:
    """A video (frames from sample_video.frame_image) and optionally audio whose channel k is a sine of
    TONES[k] Hz, so each channel can be recognised in the output."""
    with av.open(path, "w", format=container) as out:
        v = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        v.width, v.height, v.pix_fmt = width, height, pix_fmt
        if options:
            v.options = options
        if frame_times is not None:
            v.codec_context.time_base = Fraction(1, 1000)
        a = out.add_stream(audio_codec, rate=rate, layout=layout) if layout else None
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(frame_image(i, width, height), format="rgb24")
            if frame_times is not None:
                frame.pts, frame.time_base = round(frame_times[i] * 1000), Fraction(1, 1000)
            else:
                frame.pts = i
            for packet in v.encode(frame):
                out.mux(packet)
        for packet in v.encode(None):
            out.mux(packet)
        if a is not None:
            samples = tones(a.codec_context.layout.nb_channels, rate, audio_seconds)
            packed = a.codec_context.layout.nb_channels >= 8  # PyAV takes 8 planes at most: use packed
            block = 1024
            for i in range(0, samples.shape[1], block):
                chunk = samples[:, i:i + block]
                if packed:
                    fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk.T).reshape(1, -1), format="flt",
                                                    layout=layout)
                else:
                    fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout=layout)
                fr.sample_rate, fr.pts = rate, i
                for packet in a.encode(fr):
                    out.mux(packet)
            for packet in a.encode(None):
                out.mux(packet)
    return path


TONES = (300.0, 500.0, 700.0, 60.0, 900.0, 1100.0, 1300.0, 1500.0)  # 5.1/7.1 order: FL FR FC LFE BL BR SL SR


def tones(channels: int, rate: int, seconds: float) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return np.stack([0.2 * np.sin(2 * np.pi * TONES[k] * t) for k in range(channels)]).astype(np.float32)


def dominant_hz(signal: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(len(signal))))
    return float(np.fft.rfftfreq(len(signal), 1 / rate)[np.argmax(spectrum)])


def level_at(signal: np.ndarray, rate: int, hz: float) -> float:
    """Amplitude of the `hz` component (windowed DFT at that bin)."""
    n = len(signal)
    t = np.arange(n) / rate
    w = np.hanning(n)
    return float(2 * abs(np.sum(signal * w * np.exp(-2j * np.pi * hz * t))) / w.sum())


# -- reading outputs with PyAV only ------------------------------------------------------------------
@dataclass
class Seen:
    frames: int
    size: tuple[int, int]
    fps: float | None
    channels: int | None
    audio_seconds: float | None
    audio: np.ndarray | None
    rate: int | None


def inspect(path: Path) -> Seen:
    if path.is_dir():  # png sequence (+ audio.mka)
        pngs = sorted(path.glob("*.png"))
        with av.open(str(pngs[0])) as c:
            frame = next(c.decode(video=0))
        seen = Seen(len(pngs), (frame.width, frame.height), None, None, None, None, None)
        if (path / "audio.mka").exists():
            seen.channels, seen.audio, seen.rate, seen.audio_seconds = _audio(path / "audio.mka")
        return seen
    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        fps = float(vs.average_rate) if vs.average_rate else None
        frames = [f for f in c.decode(vs)]
        seen = Seen(len(frames), (frames[0].width, frames[0].height), fps, None, None, None, None)
        video_start = float(frames[0].pts * frames[0].time_base) if frames[0].pts is not None else 0.0
    if seen.fps is not None:
        seen.fps = float(Fraction(seen.fps).limit_denominator(1001))
    with av.open(str(path)) as c:
        has_audio = bool(c.streams.audio)
    if has_audio:
        seen.channels, seen.audio, seen.rate, seen.audio_seconds = _audio(path, video_start)
    return seen


def _audio(path: Path, video_start: float = 0.0):
    """(channels, float32 [channels, samples], rate, seconds): seconds from the frames' own timestamps, from
    the first video frame on (a copied AAC track starts with a priming packet before it, which some muxers
    keep by shifting every stream, and which plays no part in the duration)."""
    with av.open(str(path)) as c:
        s = c.streams.audio[0]
        chunks, start, end = [], math.inf, 0.0
        for f in c.decode(s):
            chunks.append(f.to_ndarray())
            t0 = float(f.pts * f.time_base) if f.pts is not None else end
            start, end = min(start, t0), max(end, t0 + f.samples / f.sample_rate)
        channels = s.codec_context.channels
        data = np.concatenate(chunks, axis=1)
        if data.shape[0] != channels:  # packed samples
            data = data.reshape(-1, channels).T
        return channels, data.astype(np.float32), s.codec_context.sample_rate, end - max(start, video_start)


# -- graphs ----------------------------------------------------------------------------------------------
def save_node(images, video=None, **overrides) -> dict:
    inputs = dict(filename_prefix="hostile/out", format="mkv (FFV1 lossless)", crf=19, fps=0, images=images)
    if video is not None:
        inputs["video"] = video
    inputs.update(overrides)
    return {"class_type": "LongEditSaveVideo", "inputs": inputs}


def roundtrip(name: str, load: dict | None = None, save: dict | None = None) -> Callable:
    """Load Video (every selected frame as IMAGE) -> Save Video with the video handle (fps, audio)."""
    def build(ctx):
        return {"1": load_video_node(name, **{"images": "all selected frames", **(load or {})}),
                "2": save_node(["1", 1], ["1", 0], **(save or {}))}
    return build


def by_path(path_of: Callable, **load) -> Callable:
    """Load Video reading `path` (a string, or a function of the context), then Save Video."""
    def build(ctx):
        path = path_of(ctx) if callable(path_of) else path_of
        return {"1": load_video_node(BASIC, path=path, **{"images": "all selected frames", **load}),
                "2": save_node(["1", 1], ["1", 0])}
    return build


def save_only(**save) -> Callable:
    """Load BASIC, then Save Video with these inputs (no video handle unless given)."""
    def build(ctx):
        inputs = dict(save)
        video = inputs.pop("video", None)
        return {"1": load_video_node(BASIC, images="all selected frames"),
                "2": save_node(["1", 1], video, **inputs)}
    return build


BASIC = "basic_h264_aac.mp4"
AUTO = "auto (all when connected)"
ALPHA = "alpha_vp9.webm"


def _png_count_check(expected: int):
    def check(path: Path):
        assert path.is_dir() and len(list(path.glob("*.png"))) == expected
    return check


GAP_TIMES = [0.0, 0.042, 1000.0]
VFR_TIMES = list(np.concatenate([np.arange(10) * 0.02, 0.2 + np.arange(10) * 0.1]))


def _times(expected):
    """Every frame once, shown at its source time (relative to the first): gaps are not filled."""
    def check(path: Path):
        with av.open(str(path)) as c:
            shown = sorted(float(f.pts * f.time_base) for f in c.decode(video=0))
        assert np.allclose(np.array(shown) - shown[0], np.array(expected) - expected[0], atol=1.5e-3), shown
    return check


def _five_one_kept(path: Path):
    """Each of the six channels still carries its own source tone (no channel dropped or swapped)."""
    seen = inspect(path)
    heard = [dominant_hz(seen.audio[k], seen.rate) for k in range(6)]
    assert np.allclose(heard, TONES[:6], atol=6), heard


def _seven_one_downmixed(path: Path):
    """swresample's downmix: FL only left, FR only right, FC in both at -3 dB (0.707 of its level)."""
    seen = inspect(path)
    left, right = seen.audio
    fl = (level_at(left, seen.rate, TONES[0]), level_at(right, seen.rate, TONES[0]))
    fc = (level_at(left, seen.rate, TONES[2]), level_at(right, seen.rate, TONES[2]))
    assert fl[0] > 10 * fl[1], fl
    assert fc[0] == pytest.approx(fc[1], rel=0.05) and fc[0] == pytest.approx(0.2 * 0.7071 * fl[0] / 0.2, rel=0.1), (
        fc, fl)


CASES: list[Case] = [
    # ---- containers and codecs -------------------------------------------------------------------------
    Case("mp4_h264_aac", roundtrip(BASIC), Out(12, (64, 48), channels=2, audio_seconds=SECONDS)),
    Case("mp4_h264_aac_to_mp4", roundtrip(BASIC, save=dict(format="mp4 (h264)")),
         Out(12, (64, 48), channels=2, audio_seconds=SECONDS)),
    Case("mkv_ffv1_odd_size", roundtrip("odd_33x17.mkv"), Out(12, (32, 16))),
    Case("webm_vp8", roundtrip("vp8.webm"), Out(12, (64, 48))),
    Case("avi_mjpeg_full_range", roundtrip("mjpeg_yuvj.avi"), Out(12, (64, 48))),
    Case("mpegts_mpeg2", roundtrip("mpeg2.ts"), Out(12, (64, 48))),
    Case("mov_qtrle_rgb", roundtrip("qtrle.mov"), Out(12, (64, 48))),
    Case("gif", roundtrip("anim.gif", save=dict(fps=10)), Out(12, (64, 48), fps=10)),
    Case("h265_10bit", roundtrip("h265_10bit.mp4"), Out(12, (64, 48))),
    Case("alpha_vp9_yuva", roundtrip(ALPHA), Out(12, (64, 48))),
    Case("ffv1_gray16", roundtrip("gray16.mkv"), Out(12, (64, 48))),
    Case("ffv1_yuv444p12_bt2020", roundtrip("bt2020_444p12.mkv"), Out(12, (64, 48))),
    Case("rotated_90", roundtrip("rot90.mp4"), Out(12, (48, 64))),
    Case("save_as_h265", roundtrip(BASIC, save=dict(format="mp4 (h265)")),
         Out(12, (64, 48), channels=2, audio_seconds=SECONDS)),
    Case("save_as_prores", roundtrip(BASIC, save=dict(format="mov (ProRes 422 HQ)")),
         Out(12, (64, 48), channels=2, audio_seconds=SECONDS)),
    # ---- timestamps --------------------------------------------------------------------------------------
    Case("raw_h264_no_timestamps", roundtrip("raw.h264", save=dict(fps=FPS)), Out(12, (64, 48))),
    Case("raw_h264_named_mkv", roundtrip("raw_stream.mkv", save=dict(fps=FPS)), Out(12, (64, 48))),
    Case("raw_h264_start_at_5", roundtrip("raw.h264", load=dict(start=5), save=dict(fps=FPS)),
         Out(7, (64, 48))),
    Case("gap_0_0042_1000s", roundtrip("gap.mkv"), Out(3, (64, 48), fps=None, check=_times(GAP_TIMES))),
    Case("gap_via_fps_output_closes_gaps", lambda ctx: {
        "1": load_video_node("gap.mkv", images="all selected frames"),
        "2": save_node(["1", 1], None, fps=["1", 3])}, Out(3, (64, 48), fps=1 / 0.042)),
    Case("vfr_fast_then_slow", roundtrip("vfr.mkv"), Out(20, (64, 48), fps=None, check=_times(VFR_TIMES))),
    Case("vfr_every_2nd_frame", roundtrip("vfr.mkv", load=dict(every_nth=2)),
         Out(10, (64, 48), fps=None, check=_times(VFR_TIMES[::2]))),
    Case("vfr_forced_10fps", roundtrip("vfr.mkv", load=dict(force_fps=10)), Out(12, (64, 48), fps=10)),
    Case("negative_start_time", roundtrip("negative.mkv"), Out(12, (64, 48))),
    Case("mpegts_pts_wrap", roundtrip("wrap.ts"), Out(12, (64, 48))),
    # ---- sizes -------------------------------------------------------------------------------------------
    Case("one_pixel", roundtrip("1x1.mkv", load=dict(size_multiple="8")), Out(12, (8, 8))),
    Case("one_pixel_wide_column", roundtrip("1x64.mov"), Out(12, (8, 64))),
    Case("width_16384", roundtrip("16384x8.mkv"), Out(2, (16384, 8), fps=FPS)),
    Case("h265_8x8_refused", roundtrip("8x8.mkv", save=dict(format="mp4 (h265)")),
         Err("refused 8x8 frames", "FFV1")),
    Case("resize_to_8x8", roundtrip(BASIC, load=dict(width=8, height=8)),
         Out(12, (8, 8), channels=2, audio_seconds=SECONDS)),
    # ---- audio layouts and rates -------------------------------------------------------------------------
    Case("pcm_5_1_to_mp4_aac", roundtrip("pcm51.mov", save=dict(format="mp4 (h264)")),
         Out(12, (64, 48), channels=6, audio_seconds=SECONDS, check=_five_one_kept)),
    Case("pcm_5_1_to_mkv_copied", roundtrip("pcm51.mov"),
         Out(12, (64, 48), channels=6, audio_seconds=SECONDS, check=_five_one_kept)),
    Case("pcm_7_1_downmixed", roundtrip("pcm71.mov", save=dict(format="mp4 (h264)")),
         Out(12, (64, 48), channels=2, audio_seconds=SECONDS, check=_seven_one_downmixed)),
    Case("mono_8khz", roundtrip("mono8k.mkv"), Out(12, (64, 48), channels=1, audio_seconds=SECONDS)),
    Case("flac_96khz_to_mp4", roundtrip("flac96k.mkv", save=dict(format="mp4 (h264)")),
         Out(12, (64, 48), channels=2, audio_seconds=SECONDS)),
    Case("audio_output_5_1_to_save", lambda ctx: {
        "1": load_video_node("pcm51.mov", images="all selected frames"),
        "2": save_node(["1", 1], None, fps=["1", 3], audio=["1", 2], format="mp4 (h264)")},
         Out(12, (64, 48), channels=6, audio_seconds=SECONDS, check=_five_one_kept)),
    # another pack's AUDIO of a silent video: a lazy mapping that raises when read (tests/test_nodes) means
    # no audio, even over a source that has sound
    Case("lazy_audio_that_raises", lambda ctx: {
        "1": load_video_node(BASIC, images="all selected frames"),
        "3": {"class_type": "TestLazySilentAudio", "inputs": {}},
        "2": save_node(["1", 1], ["1", 0], audio=["3", 0])},
         Out(12, (64, 48), channels=None)),
    # ---- playlists, lists, protocols, devices, links ---------------------------------------------------
    Case("hls_playlist_m3u8", roundtrip("playlist.m3u8"), Err("playlist", "pick the video file itself")),
    Case("hls_playlist_named_mp4", roundtrip("playlist_in_disguise.mp4"), Err("playlist", "pick the video")),
    Case("ffconcat_named_mkv", roundtrip("list_in_disguise.mkv"), Err("concat list", "pick the video")),
    Case("concat_list_txt", roundtrip("list.txt"), Err("playlist, list or script", "pick the video")),
    Case("sdp_file", roundtrip("stream.sdp"), Err("playlist, list or script", "pick the video")),
    Case("url_http", by_path("http://127.0.0.1:9/x.mp4"), Err("URL or FFmpeg protocol", "input directory")),
    Case("url_concat", by_path(f"concat:{BASIC}|{BASIC}"), Err("URL or FFmpeg protocol", "input directory")),
    Case("url_pipe", by_path("pipe:0"), Err("URL or FFmpeg protocol", "input directory")),
    Case("url_file", by_path("file:/etc/hostname"), Err("URL or FFmpeg protocol", "input directory")),
    Case("device_dev_zero", by_path("/dev/zero"), Err("outside the directories", "input directory")),
    Case("fifo_in_input", roundtrip("fifo.mp4"), Err("not a regular file", "pick a video file")),
    Case("symlink_to_outside", roundtrip("link_outside.mp4"), Err("outside the directories", "input directory")),
    Case("symlink_inside", roundtrip("link_inside.mp4"), Out(12, (64, 48), channels=2, audio_seconds=SECONDS)),
    Case("image_pattern_name_refused", roundtrip("img%03d.png", save=dict(fps=FPS)),
         Err("image sequence pattern", "rename the file")),
    Case("percent_and_unicode_name", roundtrip("100% vidéo %d 'q'.mp4"), Out(12, (64, 48))),
    Case("text_file", roundtrip("notes.mp4"), Err("could not be opened as a video", "re-export")),
    Case("zero_frames", roundtrip("empty.mp4"), Err("zero frames", "pick another video")),
    Case("audio_only", roundtrip("voice.m4a"), Err("audio file", "pick a video file")),
    # ---- outputs -----------------------------------------------------------------------------------------
    Case("output_symlink_folder", save_only(video=["1", 0], filename_prefix="outlink/new/x"),
         Err("outside ComfyUI's output directory", "real folders")),
    Case("output_dotdot", save_only(video=["1", 0], filename_prefix="../escape"),
         Err("leads outside ComfyUI's output directory", "without '..'")),
    Case("output_hidden_name", save_only(video=["1", 0], filename_prefix="clips/.secret"),
         Err("hidden file", "start the name with a letter")),
    Case("output_empty_prefix", save_only(video=["1", 0], filename_prefix=""),
         Out(12, (64, 48), channels=2, audio_seconds=SECONDS,
             check=lambda p: p.name.startswith("LongEdit_") and not p.name.startswith("."))),
    Case("output_240_char_prefix", save_only(video=["1", 0], filename_prefix="a" * 240),
         Err("bytes long", "shorten")),
    Case("png_sequence_percent_d_prefix", save_only(video=["1", 0], format="png sequence",
                                                    filename_prefix="seq/frame_%d_%06d"),
         Out(12, (64, 48), fps=None, channels=2, audio_seconds=SECONDS, check=_png_count_check(12))),
    Case("save_fps_0_without_video", save_only(), Err("fps is 0", "connect Load Video's 'fps' output")),
    Case("save_fps_from_load_output", lambda ctx: {
        "1": load_video_node("12_5fps.mkv", images="all selected frames"),
        "2": save_node(["1", 1], None, fps=["1", 3])}, Out(12, (64, 48), fps=12.5)),
    # ---- node inputs at their limits ---------------------------------------------------------------------
    Case("frame_cap_1", roundtrip(BASIC, load=dict(frame_cap=1)), Out(1, (64, 48), channels=2,
                                                                       audio_seconds=1 / FPS)),
    Case("every_nth_1000", roundtrip(BASIC, load=dict(every_nth=1000)), Out(1, (64, 48), fps=FPS / 1000,
                                                                           channels=2, audio_seconds=SECONDS)),
    Case("start_last_frame", roundtrip(BASIC, load=dict(start=11)), Out(1, (64, 48), channels=2,
                                                                        audio_seconds=1 / FPS)),
    Case("start_past_end", roundtrip(BASIC, load=dict(start=12)), Err("past the end", "lower 'start'")),
    Case("force_fps_240", roundtrip(BASIC, load=dict(force_fps=240)),
         Out(120, (64, 48), fps=240, channels=2, audio_seconds=SECONDS)),
    Case("crf_51", save_only(video=["1", 0], format="mp4 (h264)", crf=51),
         Out(12, (64, 48), channels=2, audio_seconds=SECONDS)),
    # ---- other packs' and core types ---------------------------------------------------------------------
    Case("core_create_video_in_memory", lambda ctx: {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 40, "height": 24, "batch_size": 9, "color": 255}},
        "2": {"class_type": "CreateVideo", "inputs": {"images": ["1", 0], "fps": 12.0}},
        "3": load_video_node(BASIC, images=AUTO, video_in=["2", 0]),
        "4": save_node(["3", 1], ["3", 0])}, Out(9, (40, 24), fps=12)),
    Case("core_create_video_with_audio", lambda ctx: {
        "0": load_video_node(BASIC),
        "1": {"class_type": "EmptyImage", "inputs": {"width": 40, "height": 24, "batch_size": 12, "color": 0}},
        "2": {"class_type": "CreateVideo", "inputs": {"images": ["1", 0], "fps": 24.0, "audio": ["0", 2]}},
        "3": load_video_node(BASIC, images=AUTO, video_in=["2", 0]),
        "4": save_node(["3", 1], ["3", 0])}, Out(12, (40, 24), channels=2, audio_seconds=SECONDS)),
    Case("core_load_video_file_backed", lambda ctx: {
        "1": {"class_type": "LoadVideo", "inputs": {"file": BASIC}},
        "3": load_video_node(BASIC, images=AUTO, video_in=["1", 0]),
        "4": save_node(["3", 1], ["3", 0])}, Out(12, (64, 48), channels=2, audio_seconds=SECONDS)),
    Case("default_images_output_feeds_saver", lambda ctx: {
        "1": load_video_node(BASIC, images=default_of(ctx.comfy, "LongEditLoadVideo", "images")),
        "2": save_node(["1", 1], None, fps=["1", 3])}, Out(12, (64, 48))),
    Case("auto_images_over_cap", lambda ctx: {
        "1": load_video_node(BASIC, images=AUTO, image_frame_cap=5),
        "2": save_node(["1", 1], ["1", 0])}, Err("would decode 12 frames", "image_frame_cap")),
    Case("image_batch_from_core_node", lambda ctx: {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 24, "height": 16, "batch_size": 5, "color": 0}},
        "2": save_node(["1", 0], None, fps=8.0, format="mp4 (h264)")}, Out(5, (24, 16), fps=8)),
]


# -- the corpus on disk ----------------------------------------------------------------------------------
def _make_corpus(inp: Path, outside: Path, out_dir: Path) -> None:
    j = lambda name: str(inp / name)  # noqa: E731
    write_sample_video(j(BASIC), frames=12, width=64, height=48, fps=FPS, audio_seconds=SECONDS)
    write_media(j("odd_33x17.mkv"), width=33, height=17, codec="ffv1", pix_fmt="yuv444p")
    write_media(j("vp8.webm"), codec="libvpx", container="webm")
    write_media(j("mjpeg_yuvj.avi"), codec="mjpeg", pix_fmt="yuvj420p")
    write_media(j("mpeg2.ts"), codec="mpeg2video", container="mpegts")
    write_media(j("qtrle.mov"), codec="qtrle", pix_fmt="rgb24")
    write_media(j("anim.gif"), codec="gif", pix_fmt="rgb8", fps=10)
    write_media(j("h265_10bit.mp4"), codec="libx265", pix_fmt="yuv420p10le",
                options={"preset": "ultrafast", "x265-params": "log-level=error"})
    write_media(j(ALPHA), codec="libvpx-vp9", pix_fmt="yuva420p", container="webm")
    write_media(j("gray16.mkv"), codec="ffv1", pix_fmt="gray16le")
    write_media(j("bt2020_444p12.mkv"), codec="ffv1", pix_fmt="yuv444p12le")
    write_sample_video(j("rot90.mp4"), frames=12, width=64, height=48, rotation=90)
    write_sample_video(j("raw.h264"), frames=12, width=64, height=48, container="h264")
    shutil.copy(j("raw.h264"), j("raw_stream.mkv"))
    write_media(j("gap.mkv"), frames=3, codec="ffv1", pix_fmt="yuv444p", frame_times=GAP_TIMES)
    write_media(j("vfr.mkv"), frames=20, codec="ffv1", pix_fmt="yuv444p", frame_times=VFR_TIMES)
    write_media(j("negative.mkv"), codec="ffv1", pix_fmt="yuv444p", frame_times=-0.5 + np.arange(12) / FPS)
    wrap_start = 2 ** 33 / 90000 - 0.25  # mpegts timestamps wrap at 2^33 ticks of 90 kHz, 0.25 s in
    write_media(j("wrap.ts"), container="mpegts", frame_times=wrap_start + np.arange(12) / FPS)
    write_media(j("1x1.mkv"), width=1, height=1, codec="ffv1", pix_fmt="yuv444p")
    write_media(j("1x64.mov"), width=1, height=64, codec="png", pix_fmt="rgb24")
    write_media(j("16384x8.mkv"), frames=2, width=16384, height=8, codec="ffv1", pix_fmt="yuv444p")
    write_media(j("8x8.mkv"), width=8, height=8, codec="ffv1", pix_fmt="yuv444p")
    write_media(j("pcm51.mov"), layout="5.1", rate=48000)
    write_media(j("pcm71.mov"), layout="7.1", rate=48000)
    write_media(j("mono8k.mkv"), codec="ffv1", pix_fmt="yuv444p", layout="mono", rate=8000, audio_codec="flac")
    write_media(j("flac96k.mkv"), codec="ffv1", pix_fmt="yuv444p", layout="stereo", rate=96000,
                audio_codec="flac")
    write_media(j("12_5fps.mkv"), codec="ffv1", pix_fmt="yuv444p", fps=12.5)
    # playlists and lists whose entries lie outside the allowed folders
    write_media(str(outside / "secret.ts"), codec="mpeg2video", container="mpegts")
    segment = outside / "secret.ts"
    hls = f"#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:1\n#EXTINF:0.5,\n{segment}\n#EXT-X-ENDLIST\n"
    (inp / "playlist.m3u8").write_text(hls)
    (inp / "playlist_in_disguise.mp4").write_text(hls)
    (inp / "list_in_disguise.mkv").write_text(f"ffconcat version 1.0\nfile '{segment}'\n")
    (inp / "list.txt").write_text(f"file '{segment}'\n")
    (inp / "stream.sdp").write_text("v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\n"
                                    "m=video 5004 RTP/AVP 96\na=rtpmap:96 H264/90000\n")
    os.mkfifo(j("fifo.mp4"))
    os.symlink(str(segment), j("link_outside.mp4"))
    os.symlink(j(BASIC), j("link_inside.mp4"))
    # a file literally named like an image2 pattern (the muxer would expand it, so write it under another name)
    write_media(j("literal.png"), frames=1, width=16, height=16, codec="png", pix_fmt="rgb24", container="image2")
    os.rename(j("literal.png"), j("img%03d.png"))
    for k in range(1, 4):  # what an image2 pattern would expand to
        write_media(j(f"img{k:03d}.png"), frames=1, width=32, height=32, codec="png", pix_fmt="rgb24",
                    container="image2")
    write_media(j("100% vidéo %d 'q'.mp4"))
    (inp / "notes.mp4").write_text("this is not a video\n" * 100)
    write_sample_video(j("empty.mp4"), frames=0)
    write_sample_video(j("voice.m4a"), video=False, audio_seconds=1.0, container="mp4")
    (outside / "outlink_target").mkdir()
    os.symlink(str(outside / "outlink_target"), str(out_dir / "outlink"))


def default_of(comfy, node: str, name: str):
    """An input's default as the server declares it (what a user gets on a new node)."""
    spec = comfy.get(f"/object_info/{node}")[node]["input"]
    spec = {**spec.get("required", {}), **spec.get("optional", {})}
    return spec[name][1]["default"]


@dataclass(frozen=True)
class Context:
    comfy: object
    outside: Path


@pytest.fixture(scope="module")
def corpus(comfy, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside_comfy")
    _make_corpus(comfy.input_dir, outside, comfy.output_dir)
    before = {p: p.stat().st_mtime_ns for p in outside.rglob("*")}
    yield Context(comfy, outside)
    # nothing outside ComfyUI's folders was written, whatever the cases did
    assert {p: p.stat().st_mtime_ns for p in outside.rglob("*")} == before


def _new_outputs(comfy, before: set[Path]) -> list[Path]:
    """New output files; a PNG sequence counts as its folder."""
    found = set()
    for p in comfy.output_dir.rglob("*"):
        if p.is_file() and p not in before and "outlink" not in p.parts:
            found.add(p.parent if p.suffix == ".png" or p.name == "audio.mka" else p)
    return sorted(found)


def _existing(comfy) -> set[Path]:
    return {p for p in comfy.output_dir.rglob("*") if p.is_file() and "outlink" not in p.parts}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(comfy, corpus, case):
    before = _existing(comfy)
    outside_before = sorted(corpus.outside.rglob("*"))
    entry = comfy.run(case.prompt(corpus), timeout=300)
    assert sorted(corpus.outside.rglob("*")) == outside_before, "something was created outside ComfyUI's folders"
    expect = case.expect
    if isinstance(expect, Err):
        message = str(entry["rejected"]) if "rejected" in entry else execution_error(entry)
        assert message is not None, f"expected an error, got {entry.get('status')}"
        assert expect.what in message and "Fix:" in message and expect.fix in message.split("Fix:")[-1], message
        assert _new_outputs(comfy, before) == []
    else:
        assert "rejected" not in entry, entry["rejected"]
        assert execution_error(entry) is None, execution_error(entry)
        [written] = _new_outputs(comfy, before)
        seen = inspect(written)
        assert seen.frames == expect.frames, (seen.frames, expect.frames)
        assert seen.size == expect.size
        if expect.fps is not None:
            assert seen.fps == pytest.approx(expect.fps, rel=1e-3), (seen.fps, expect.fps)
        assert seen.channels == expect.channels
        if expect.audio_seconds is not None:
            # A copied AAC track is trimmed to whole 1024-sample packets, one kept before the start for the
            # decoder; beside a PNG sequence nothing aligns that packet, so it counts too. PCM/FLAC are exact.
            packets = 2 if written.is_dir() else 1
            assert abs(seen.audio_seconds - expect.audio_seconds) <= packets * 1024 / seen.rate + 1e-3, (
                seen.audio_seconds)
        if expect.check is not None:
            assert expect.check(written) is not False
    assert not [p for p in comfy.output_dir.rglob(".*partial*")], "a partial file was left behind"
    # the server still answers, and nothing is left running
    assert "system" in comfy.get("/system_stats")
    queue = comfy.get("/queue")
    assert queue["queue_running"] == [] and queue["queue_pending"] == []


def test_corpus_size_and_classes():
    """The issue asks for at least 40 cases across both classes."""
    ok = sum(isinstance(c.expect, Out) for c in CASES)
    err = sum(isinstance(c.expect, Err) for c in CASES)
    assert ok + err >= 40 and ok >= 10 and err >= 10, (ok, err)
    assert len({c.id for c in CASES}) == len(CASES)


def interrupted_node(entry: dict) -> str | None:
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_interrupted":
            return data.get("node_type")
    return None


def test_cancel_at_every_stage_leaves_nothing_half_done(comfy):
    """Cancel pressed while each stage of the edit runs: decode + save, sampling, inversion, keyframe
    selection, encode. ComfyUI keeps the outputs of the last prompt's nodes, so after a complete run a prompt
    that changes one setting runs that stage first; a complete run after each Cancel restores the kept
    outputs. Each Cancel must stop that very node, leave no output or partial file, and leave the server
    answering; the complete run after it must succeed."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_adaflow_edit import edit_graph  # noqa: E402  (the end-to-end edit graph)

    name = "cancel12.mp4"
    write_sample_video(str(comfy.input_dir / name), frames=12, width=112, height=64, fps=8, audio_seconds=1.0)

    def graph(change: dict | None = None) -> dict:
        prompt = edit_graph(name, with_keyframes=True, steps=2, sampler_steps=2)
        prompt["9"]["inputs"]["filename_prefix"] = "cancel/edit"
        for (node, key), value in (change or {}).items():
            prompt[node]["inputs"][key] = value
        return prompt

    def complete() -> None:
        entry = comfy.run(graph(), timeout=900)
        assert execution_error(entry) is None and interrupted_node(entry) is None, entry.get("status")

    complete()
    for label, node_type, change in (
            ("decode + save", "LongEditDecodeSaveVideo", {("9", "crf"): 20}),
            ("sampling", "KSamplerAdvanced", {("8", "cfg"): 6.5}),
            ("inversion", "LongEditAdaFlowInvert", {("6", "inversion_steps"): 4}),
            ("keyframe selection", "LongEditAdaFlowKeyframeSelection", {("10", "seed"): 1}),
            ("encode", "LongEditEncodeVideo", {("2", "frame_cap"): 11})):
        before = _existing(comfy)
        entry = comfy.run(graph(change), timeout=900, interrupt_after=0.3)
        assert interrupted_node(entry) == node_type, (label, interrupted_node(entry), entry.get("status"))
        assert _new_outputs(comfy, before) == [], label
        assert not [p for p in comfy.output_dir.rglob(".*partial*")], label
        assert "system" in comfy.get("/system_stats") and comfy.get("/queue")["queue_running"] == []
        if label != "encode":
            complete()
