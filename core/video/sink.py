"""Writing videos in chunks with PyAV, with audio kept and the file appearing only when complete."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator

import av
import numpy as np

from ..errors import LongEditError
from .input_policy import open_input
from .paths import atomic_output

log = logging.getLogger("longedit")
# Channel layouts the audio encoders used here (AAC, FLAC, PCM) take, by channel count. ComfyUI's AUDIO
# carries no layout, so a count maps to FFmpeg's usual layout of that many channels. More channels than
# these are downmixed to stereo (with a warning): PyAV cannot pass 8 or more planar channels to an encoder.
TIMED_TIME_BASE = Fraction(1, 90000)  # for frames on their own timestamps (MPEG's clock; mkv keeps ms)
LAYOUT_BY_CHANNELS = {1: "mono", 2: "stereo", 3: "3.0", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1"}


@dataclass(frozen=True)
class OutputFormat:
    label: str
    extension: str  # "" for an image sequence (a folder)
    container: str
    codec: str
    pix_fmt: str
    copy_audio_codecs: tuple[str, ...]  # audio codecs this container takes as they are
    audio_encoder: str  # used when the source audio cannot be copied, or for an AUDIO waveform


OUTPUT_FORMATS = {
    f.label: f
    for f in (
        OutputFormat("mp4 (h264)", ".mp4", "mp4", "libx264", "yuv420p",
                     ("aac", "mp3", "alac", "opus", "flac", "ac3", "eac3"), "aac"),
        OutputFormat("mp4 (h265)", ".mp4", "mp4", "libx265", "yuv420p",
                     ("aac", "mp3", "alac", "opus", "flac", "ac3", "eac3"), "aac"),
        OutputFormat("mov (ProRes 422 HQ)", ".mov", "mov", "prores_ks", "yuv422p10le",
                     ("aac", "mp3", "alac", "pcm_s16le", "pcm_s24le", "pcm_f32le", "ac3"), "pcm_s16le"),
        OutputFormat("png sequence", "", "image2", "png", "rgb24",
                     (), "flac"),  # audio goes to audio.mka beside the frames
        OutputFormat("mkv (FFV1 lossless)", ".mkv", "matroska", "ffv1", "bgr0",
                     ("aac", "mp3", "opus", "flac", "vorbis", "alac", "ac3", "pcm_s16le"), "flac"),
    )
}
FORMAT_LABELS = tuple(OUTPUT_FORMATS)


@dataclass(frozen=True)
class AudioFromFile:
    """Audio to copy packet by packet from `path` for [start_time, end_time) of its own timeline."""

    path: str
    start_time: float
    end_time: float


@dataclass(frozen=True)
class AudioWaveform:
    """Decoded audio (ComfyUI's AUDIO): float32 [channels, samples] starting at output time 0."""

    samples: np.ndarray
    sample_rate: int
    layout: str | None = None  # FFmpeg's layout name when known (from a file); else from the channel count


def read_audio_input(audio) -> AudioWaveform | None:
    """ComfyUI's AUDIO as a waveform, or None for no audio.

    Other packs pass AUDIO as a lazy mapping that decodes when read and raises for a video without sound
    (VideoHelperSuite's Load Video): as VHS's own Video Combine does, that means 'no audio' (logged).
    """
    if audio is None:
        return None
    try:
        waveform, rate = audio["waveform"], audio["sample_rate"]
    except Exception as e:  # any error of a lazy reader: we cannot know its types
        log.warning("LongEdit: the AUDIO input could not be read (%s: %s); saving without audio.",
                    type(e).__name__, e)
        return None
    if waveform is None:
        return None
    if waveform.ndim == 3:
        waveform = waveform[0]
    if waveform.ndim != 2 or waveform.shape[-1] == 0:
        return None
    return AudioWaveform(waveform.float().cpu().numpy(), int(rate))


def to_fps_fraction(fps: float | Fraction) -> Fraction:
    if fps <= 0:
        raise LongEditError(f"The frame rate must be positive (got {fps}).", "set fps, e.g. 24.")
    return Fraction(fps).limit_denominator(1001) if not isinstance(fps, Fraction) else fps


class _AudioTrack:
    """Muxes audio packets into the output as the video advances (so nothing waits in memory)."""

    def __init__(self, packets: Iterator[av.Packet], closer=None):
        self._packets = packets
        self._pending = None
        self._closer = closer

    def mux_until(self, out: av.container.OutputContainer, seconds: float | None) -> None:
        while True:
            packet = self._pending or next(self._packets, None)
            self._pending = None
            if packet is None:
                return
            if seconds is not None and packet.pts is not None and packet.pts * packet.time_base > seconds:
                self._pending = packet
                return
            out.mux(packet)

    def close(self) -> None:
        if self._closer is not None:
            self._closer.close()


def _copied_audio(out: av.container.OutputContainer, src: AudioFromFile) -> _AudioTrack:
    """Source packets in [start, end), untouched but for their timestamps (trim exact to one packet)."""
    container = open_input(src.path)
    stream = container.streams.audio[0]
    out_stream = out.add_stream_from_template(stream)
    tb = stream.time_base
    offset, end = round(src.start_time / tb), round(src.end_time / tb)
    if src.start_time > 1.0:
        container.seek(int((src.start_time - 1.0) / tb), stream=stream, backward=True)

    def packets() -> Iterator[av.Packet]:
        for packet in container.demux(stream):
            if packet.pts is None or packet.size == 0:
                continue
            if packet.pts + (packet.duration or 0) < offset:
                continue
            # The packet ending at the start is kept too: AAC/MP3 decoders need it to rebuild the first
            # samples; it gets a negative timestamp, which the muxer turns into an edit list (as ffmpeg -c copy).
            if packet.pts >= end:
                return
            packet.pts -= offset
            packet.dts = packet.pts if packet.dts is None else packet.dts - offset
            packet.stream = out_stream
            yield packet

    return _AudioTrack(packets(), closer=container)


def _is_named_layout(layout: str | None, channels: int) -> bool:
    """A standard FFmpeg layout ('5.1', 'stereo') of that many channels; not an unordered '6 channels'."""
    return bool(layout) and not layout.endswith("channels") and av.AudioLayout(layout).nb_channels == channels


def _audio_layout(wave: AudioWaveform) -> tuple[np.ndarray, str]:
    """(samples, layout name) to encode: the layout kept where the encoders take it, else a stereo downmix."""
    channels = wave.samples.shape[0]
    named = wave.layout if _is_named_layout(wave.layout, channels) else None
    if channels in LAYOUT_BY_CHANNELS:
        return wave.samples, named or LAYOUT_BY_CHANNELS[channels]
    named = named or ("7.1" if channels == 8 else None)
    log.warning("LongEdit: %d-channel audio (%s) is downmixed to stereo: LongEdit encodes at most %d channels "
                "(PyAV cannot pass 8 or more planar channels to an encoder).", channels,
                named or "no known layout", max(LAYOUT_BY_CHANNELS))
    if named:
        return downmix_layout_to_stereo(wave.samples, named, wave.sample_rate), "stereo"
    return downmix_to_stereo(wave.samples), "stereo"


def downmix_layout_to_stereo(samples: np.ndarray, layout: str, rate: int) -> np.ndarray:
    """FFmpeg's (swresample's) standard downmix of a named layout: centre and surrounds at -3 dB, LFE dropped."""
    resampler = av.AudioResampler(format="fltp", layout="stereo", rate=rate)
    packed = np.ascontiguousarray(samples.T, dtype=np.float32).reshape(1, -1)  # packed: any channel count
    frame = av.AudioFrame.from_ndarray(packed, format="flt", layout=layout)
    frame.sample_rate, frame.pts = rate, 0
    out = [f.to_ndarray() for f in resampler.resample(frame)] + [f.to_ndarray() for f in resampler.resample(None)]
    return np.concatenate(out, axis=1)[:, :samples.shape[1]] if out else np.zeros((2, 0), np.float32)


def downmix_to_stereo(samples: np.ndarray) -> np.ndarray:
    """Equal-power downmix of n unlabelled channels: channel i goes to the left at cos(pan_i) and to the
    right at sin(pan_i), pans spread evenly from left to right, then scaled so a signal on every channel
    at once keeps its level. (Without a layout there is no centre or LFE to treat specially.)"""
    n = samples.shape[0]
    pan = np.linspace(0.0, np.pi / 2, n)
    weights = np.stack([np.cos(pan), np.sin(pan)])  # [2, n]
    weights /= weights.sum(axis=1, keepdims=True)
    return (weights @ samples.astype(np.float64)).astype(np.float32)


def _encoded_audio(out: av.container.OutputContainer, wave: AudioWaveform, encoder: str) -> _AudioTrack:
    samples, layout = _audio_layout(wave)
    stream = out.add_stream(encoder, rate=wave.sample_rate, layout=layout)

    def packets() -> Iterator[av.Packet]:
        block, pts = 4096, 0
        for i in range(0, samples.shape[1], block):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, i:i + block], dtype=np.float32),
                                               format="fltp", layout=layout)
            frame.sample_rate, frame.pts = wave.sample_rate, pts
            pts += frame.samples
            yield from stream.encode(frame)
        yield from stream.encode(None)

    return _AudioTrack(packets())


def _source_waveform(src: AudioFromFile) -> AudioWaveform:
    from .source import read_audio  # local: sinks do not otherwise need the reader

    samples, rate = read_audio(src.path, src.start_time, src.end_time)
    with open_input(src.path) as container:
        layout = container.streams.audio[0].codec_context.layout.name
    return AudioWaveform(samples, rate, layout)


class VideoWriter:
    """Write uint8 RGB frames chunk by chunk; the file appears at `final_path` only on a clean close.

    Use as a context manager: an exception (interrupt, out of memory, bad frame) removes the partial file.
    Audio is interleaved as the video advances, so nothing waits in memory for the end.
    """

    def __init__(self, final_path: str, fmt: str, fps: float | Fraction, width: int, height: int,
                 crf: int = 19, audio: AudioFromFile | AudioWaveform | None = None,
                 metadata: dict | None = None, frame_times: np.ndarray | None = None):
        if fmt not in OUTPUT_FORMATS:
            raise LongEditError(f"Unknown output format '{fmt}'.", f"pick one of {FORMAT_LABELS}.")
        self.format = OUTPUT_FORMATS[fmt]
        self.final_path = final_path
        self.fps = to_fps_fraction(fps)
        self.size = (width, height)
        self.crf = crf
        self.audio_source = audio
        self.metadata = metadata or {}
        # Seconds at which each frame is shown (a variable-rate source's own timing); None: k / fps.
        self.frame_times = None if frame_times is None else np.asarray(frame_times, dtype=np.float64)
        self._last_pts = -1
        self.frames_written = 0
        self._atomic = None
        self._container = None
        self._audio = None
        self._audio_container = None

    # -- setup -------------------------------------------------------------------------------------
    def __enter__(self) -> "VideoWriter":
        self._atomic = atomic_output(self.final_path)
        tmp = self._atomic.__enter__()
        try:
            self._open(tmp)
        except BaseException:
            self._abort()
            raise
        return self

    def _open(self, tmp: str) -> None:
        fmt = self.format
        width, height = self.size
        if fmt.container == "image2":
            os.makedirs(tmp)
            # The image2 muxer expands '%' in the whole path: a literal one in the folder name is doubled.
            self._container = av.open(os.path.join(tmp.replace("%", "%%"), "%06d.png"), "w", format="image2")
        else:
            options = {"movflags": "use_metadata_tags"} if fmt.container in ("mp4", "mov") else {}
            self._container = av.open(tmp, "w", format=fmt.container, options=options)
            for key, value in self.metadata.items():
                self._container.metadata[key] = value if isinstance(value, str) else json.dumps(value)
        stream = self._container.add_stream(fmt.codec, rate=self.fps)
        if self.frame_times is not None:
            stream.codec_context.time_base = TIMED_TIME_BASE
        stream.width, stream.height = width + width % 2, height + height % 2
        if fmt.pix_fmt == "rgb24" or fmt.codec == "prores_ks":
            stream.width, stream.height = width, height  # no chroma subsampling: any size
        stream.pix_fmt = fmt.pix_fmt
        if fmt.codec in ("libx264", "libx265"):
            stream.options = {"crf": str(self.crf), "preset": "medium" if fmt.codec == "libx264" else "fast"}
            if fmt.codec == "libx265":
                stream.options["x265-params"] = "log-level=error"
        if fmt.codec == "prores_ks":
            stream.options = {"profile": "3"}  # 422 HQ
        try:
            stream.codec_context.open()  # now, so a size the encoder refuses is reported before any work
        except av.error.FFmpegError as e:
            raise LongEditError(
                f"The {fmt.label} encoder ({fmt.codec}) refused {width}x{height} frames at {float(self.fps):g} "
                f"fps ({e}).", "pick 'mkv (FFV1 lossless)' or 'png sequence' (they take any size), or resize "
                "the frames (h265 needs at least 16 pixels a side)."
                if fmt.codec == "libx265" else "pick 'mkv (FFV1 lossless)' or 'png sequence' (they take any "
                "size), or resize the frames.") from e
        self._stream = stream
        if self.audio_source is not None:
            self._audio = self._open_audio(tmp)

    def _open_audio(self, tmp: str):
        fmt = self.format
        target = self._container
        if fmt.container == "image2":
            self._audio_container = av.open(os.path.join(tmp, "audio.mka"), "w", format="matroska")
            target = self._audio_container
            copyable = ("aac", "mp3", "opus", "flac", "vorbis", "alac", "ac3", "pcm_s16le", "pcm_s24le")
        else:
            copyable = fmt.copy_audio_codecs
        src = self.audio_source
        if isinstance(src, AudioWaveform):
            return _encoded_audio(target, src, fmt.audio_encoder)
        with open_input(src.path) as probe:
            if not probe.streams.audio:
                return None
            codec = probe.streams.audio[0].codec_context.name
        if codec in copyable:
            return _copied_audio(target, src)
        return _encoded_audio(target, _source_waveform(src), fmt.audio_encoder)  # exact trim, re-encoded

    # -- writing -----------------------------------------------------------------------------------
    def write(self, frames: np.ndarray) -> None:
        """Append uint8 frames [n, H, W, 3]."""
        width, height = self.size
        if frames.ndim != 4 or frames.shape[1:] != (height, width, 3) or frames.dtype != np.uint8:
            raise LongEditError(
                f"Frames of shape {tuple(frames.shape)} {frames.dtype} do not match the video being written "
                f"({height}x{width}x3 uint8).", "give every chunk the same size.")
        pad_w, pad_h = self._stream.width - width, self._stream.height - height
        for image in frames:
            if pad_w or pad_h:  # yuv420p needs even sides: repeat the last row/column
                image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = self._next_pts()
            if self.frame_times is not None:
                frame.time_base = TIMED_TIME_BASE
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
            self.frames_written += 1
        if self._audio is not None:
            self._audio.mux_until(self._audio_container or self._container, self._time_of(self.frames_written))

    def _time_of(self, k: int) -> float:
        if self.frame_times is not None and k < len(self.frame_times):
            return float(self.frame_times[k])
        return k / float(self.fps)

    def _next_pts(self) -> int:
        """The next frame's timestamp: its index at 1/fps, or its own time in TIMED_TIME_BASE units (kept
        strictly increasing should two source times round to the same unit)."""
        if self.frame_times is None:
            return self.frames_written
        if self.frames_written >= len(self.frame_times):
            raise LongEditError(f"More frames than the {len(self.frame_times)} timestamps given.",
                                "give one timestamp per frame.")
        pts = max(round(self.frame_times[self.frames_written] / TIMED_TIME_BASE), self._last_pts + 1)
        self._last_pts = pts
        return pts

    # -- finishing ---------------------------------------------------------------------------------
    def _finish(self) -> None:
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        if self._audio is not None:
            self._audio.mux_until(self._audio_container or self._container, None)
            self._audio.close()
        if self._audio_container is not None:
            self._audio_container.close()
        self._container.close()

    def _abort(self) -> None:
        for closer in (self._audio, self._audio_container, self._container):
            try:
                if closer is not None:
                    closer.close()
            except Exception:  # the partial file is removed below whatever state it is in
                pass
        if self._atomic is not None:
            try:
                self._atomic.__exit__(RuntimeError, RuntimeError("aborted"), None)
            except RuntimeError:
                pass

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self._abort()
            return False
        if self.frames_written == 0:
            self._abort()
            raise LongEditError("No frames were given to write; nothing was saved.", "check the input frames.")
        try:
            self._finish()
        except BaseException:
            self._abort()
            raise
        self._atomic.__exit__(None, None, None)
        return False
