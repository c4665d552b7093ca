"""Writing: formats, audio pass-through and trim, odd sizes, and outputs that appear only when complete."""
from __future__ import annotations

import os
from fractions import Fraction

import av
import numpy as np
import pytest

from longedit.core.errors import LongEditError
from longedit.core.video.sample import frame_image, read_index, tone, write_sample_video
from longedit.core.video.sink import FORMAT_LABELS, AudioFromFile, AudioWaveform, VideoWriter
from longedit.core.video.source import Selection, iter_frames, probe_video, read_audio, read_frames, select_frames


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("src") / "clip.mp4"
    return write_sample_video(str(path), frames=48, width=128, height=96, fps=24, audio_seconds=2.0)


def frames(count: int, width: int = 128, height: int = 96) -> np.ndarray:
    return np.stack([frame_image(i, width, height) for i in range(count)])


def written_frames(path: str) -> np.ndarray:
    return read_frames(select_frames(probe_video(path), Selection(multiple=1)))


def save_selection(out: str, fmt: str, source: str, selection: Selection) -> None:
    """Write a selection of `source` with its audio copied, as Decode + Save Video does."""
    video = select_frames(probe_video(source), selection)
    with VideoWriter(out, fmt, video.fps, video.width, video.height,
                     audio=AudioFromFile(source, video.start_time, video.end_time)) as writer:
        for chunk in iter_frames(video, 5):
            writer.write(chunk)


@pytest.mark.parametrize("fmt", FORMAT_LABELS)
def test_every_format_keeps_frame_count_order_and_rate(tmp_path, fmt):
    out = str(tmp_path / "out")
    images = frames(10)
    with VideoWriter(out, fmt, Fraction(30000, 1001), 128, 96) as writer:
        writer.write(images[:4])
        writer.write(images[4:])
    if fmt == "png sequence":
        pngs = sorted(os.listdir(out))
        assert pngs == [f"{i:06d}.png" for i in range(1, 11)]
        with av.open(os.path.join(out, pngs[3])) as c:
            assert np.array_equal(next(c.decode(video=0)).to_ndarray(format="rgb24"), images[3])
        return
    info = probe_video(out)
    assert info.frame_count == 10
    assert info.fps == Fraction(30000, 1001)
    decoded = written_frames(out)
    assert [read_index(f) for f in decoded] == list(range(10))
    if "lossless" in fmt:
        assert np.array_equal(decoded, images)


def test_source_audio_is_copied_untouched_and_trimmed(tmp_path, clip):
    video = select_frames(probe_video(clip), Selection(start=12, frame_cap=24))
    out = str(tmp_path / "trim.mp4")
    save_selection(out, "mp4 (h264)", clip, Selection(start=12, frame_cap=24))
    with av.open(clip) as src, av.open(out) as dst:
        src_stream, dst_stream = src.streams.audio[0], dst.streams.audio[0]
        assert dst_stream.codec_context.name == "aac"
        lo, hi = video.start_time / src_stream.time_base, video.end_time / src_stream.time_base
        expected = [bytes(p) for p in src.demux(src_stream)
                    if p.pts is not None and p.size and p.pts + p.duration >= lo and p.pts < hi]
        copied = [bytes(p) for p in dst.demux(dst_stream) if p.size]
    assert copied == expected  # same encoded packets: no re-encoding
    assert len(copied) >= 24 * 44100 / 24 / 1024  # and all of the selection's second
    samples, rate = read_audio(out, 0, 10)
    assert abs(samples.shape[1] / rate - video.duration) <= 1024 / rate + 1e-3
    reference, _ = read_audio(clip, video.start_time, video.end_time)
    middle = slice(2048, min(samples.shape[1], reference.shape[1]) - 2048)
    assert np.abs(samples[:, middle] - reference[:, middle]).max() < 1e-3  # aligned to the sample


def test_audio_the_container_cannot_hold_is_reencoded_with_an_exact_trim(tmp_path):
    src = write_sample_video(str(tmp_path / "pcm.mkv"), frames=48, fps=24, audio_seconds=2.0,
                             audio_codec="pcm_s16le", sample_rate=48000, container="matroska")
    out = str(tmp_path / "reenc.mp4")
    save_selection(out, "mp4 (h264)", src, Selection(start=24, frame_cap=12))
    with av.open(out) as c:
        assert c.streams.audio[0].codec_context.name == "aac"
    samples, rate = read_audio(out, 0, 10)
    assert abs(samples.shape[1] / rate - 0.5) <= 1024 / rate + 1e-3


def test_waveform_audio_is_encoded(tmp_path):
    wave = tone(1.0, 44100)
    out = str(tmp_path / "wave.mov")
    with VideoWriter(out, "mov (ProRes 422 HQ)", 24, 128, 96, audio=AudioWaveform(wave, 44100)) as writer:
        writer.write(frames(24))
    samples, rate = read_audio(out, 0, 10)
    assert samples.shape[1] == 44100  # PCM in mov: exact length
    assert np.abs(samples - wave).max() < 1e-3


def test_png_sequence_gets_audio_beside_it(tmp_path, clip):
    out = str(tmp_path / "seq")
    save_selection(out, "png sequence", clip, Selection(frame_cap=6))
    assert "audio.mka" in os.listdir(out)
    assert len([f for f in os.listdir(out) if f.endswith(".png")]) == 6


def test_odd_frame_sizes_are_padded_for_yuv420(tmp_path):
    out = str(tmp_path / "odd.mp4")
    with VideoWriter(out, "mp4 (h264)", 24, 65, 33) as writer:
        writer.write(frames(3, 65, 33))
    info = probe_video(out)
    assert (info.width, info.height) == (66, 34) and info.frame_count == 3


def test_audio_from_the_very_start_keeps_the_priming_packet(tmp_path, clip):
    out = str(tmp_path / "head.mp4")
    save_selection(out, "mp4 (h264)", clip, Selection(frame_cap=24))
    with av.open(clip) as src, av.open(out) as dst:
        first_src = next(p for p in src.demux(src.streams.audio[0]) if p.size)
        first_dst = next(p for p in dst.demux(dst.streams.audio[0]) if p.size)
        assert bytes(first_dst) == bytes(first_src)
    samples, rate = read_audio(out, 0, 10)
    expected, _ = read_audio(clip, 0, 1.0)
    n = min(samples.shape[1], expected.shape[1])
    assert abs(samples.shape[1] - rate) <= 1024
    assert np.abs(samples[:, :n] - expected[:, :n]).max() < 1e-4  # the same decoded audio from sample 0


def test_a_failure_mid_write_leaves_nothing(tmp_path):
    out = tmp_path / "broken.mp4"
    with pytest.raises(RuntimeError, match="interrupted"):
        with VideoWriter(str(out), "mp4 (h264)", 24, 128, 96, audio=AudioWaveform(tone(1, 44100), 44100)) as w:
            w.write(frames(5))
            raise RuntimeError("interrupted by the user")
    assert os.listdir(tmp_path) == []


def test_a_complete_file_is_never_replaced(tmp_path):
    out = tmp_path / "done.mp4"
    out.write_bytes(b"a finished video")
    with pytest.raises(LongEditError, match="not overwritten"):
        with VideoWriter(str(out), "mp4 (h264)", 24, 128, 96) as w:
            w.write(frames(2))
    assert out.read_bytes() == b"a finished video"
    assert os.listdir(tmp_path) == ["done.mp4"]


def test_wrong_chunk_shape_and_empty_output_are_refused(tmp_path):
    with pytest.raises(LongEditError, match="do not match"):
        with VideoWriter(str(tmp_path / "a.mp4"), "mp4 (h264)", 24, 128, 96) as w:
            w.write(frames(2, 64, 64))
    with pytest.raises(LongEditError, match="No frames"):
        with VideoWriter(str(tmp_path / "b.mp4"), "mp4 (h264)", 24, 128, 96):
            pass
    assert os.listdir(tmp_path) == []
