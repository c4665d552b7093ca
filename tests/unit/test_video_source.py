"""Reading: probe, selection, decoding, geometry and audio, on videos generated with PyAV."""
from __future__ import annotations

import numpy as np
import pytest

from longedit.core.errors import LongEditError
from longedit.core.video.sample import read_index, tone, write_sample_video
from longedit.core.video.source import (
    Selection, iter_frames, plan_geometry, probe_video, read_audio, read_frames, select_frames,
)


def indices_of(frames: np.ndarray) -> list[int]:
    return [read_index(f) for f in frames]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("src") / "clip.mp4"
    return write_sample_video(str(path), frames=60, width=128, height=96, fps=24, audio_seconds=2.5)


def test_probe_counts_frames_without_decoding(clip):
    info = probe_video(clip)
    assert info.frame_count == 60
    assert info.fps == 24 and not info.is_vfr
    assert (info.width, info.height, info.rotation) == (128, 96, 0)
    assert info.audio is not None and info.audio.sample_rate == 44100 and info.audio.channels == 2
    assert info.duration == pytest.approx(60 / 24)


@pytest.mark.parametrize("selection, expected", [
    (Selection(), list(range(60))),
    (Selection(start=10), list(range(10, 60))),
    (Selection(start=0.5, start_unit="second"), list(range(12, 60))),
    (Selection(start=7, every_nth=3, frame_cap=5), [7, 10, 13, 16, 19]),
    (Selection(frame_cap=1), [0]),
    (Selection(start=59), [59]),
])
def test_selection_picks_exactly_the_right_frames(clip, selection, expected):
    video = select_frames(probe_video(clip), selection)
    assert video.frame_count == len(expected)
    assert indices_of(read_frames(video)) == expected


def test_every_nth_divides_fps_and_keeps_duration(clip):
    video = select_frames(probe_video(clip), Selection(every_nth=4))
    assert video.fps == 6
    assert video.duration == pytest.approx(60 / 24)


@pytest.mark.parametrize("fps, expected", [
    (12, list(range(0, 60, 2))),  # half rate: every other frame
    (48, [i // 2 for i in range(120)]),  # double rate: each frame twice
])
def test_force_fps_resamples_on_a_grid(clip, fps, expected):
    video = select_frames(probe_video(clip), Selection(force_fps=fps))
    assert video.fps == fps
    assert indices_of(read_frames(video)) == expected


def test_chunks_cover_the_selection_in_order(clip):
    video = select_frames(probe_video(clip), Selection(start=5, frame_cap=23))
    chunks = list(iter_frames(video, 7))
    assert [len(c) for c in chunks] == [7, 7, 7, 2]
    assert indices_of(np.concatenate(chunks)) == list(range(5, 28))
    assert indices_of(np.concatenate(list(iter_frames(video, 7, start=20)))) == [25, 26, 27]


def test_seek_into_a_long_gop_still_finds_the_frame(tmp_path):
    path = write_sample_video(str(tmp_path / "long.mp4"), frames=300, fps=30)
    video = select_frames(probe_video(path), Selection(start=251, frame_cap=3))
    assert indices_of(read_frames(video)) == [251, 252, 253]


def test_variable_frame_rate_is_put_on_a_constant_grid(tmp_path):
    # Frames at irregular times: 10 fast (20 ms apart) then 10 slow (100 ms apart).
    times = np.concatenate([np.arange(10) * 0.02, 0.2 + np.arange(10) * 0.1])
    path = write_sample_video(str(tmp_path / "vfr.mp4"), frames=20, frame_times=times, container="mp4")
    info = probe_video(path)
    assert info.is_vfr and info.frame_count == 20
    video = select_frames(info, Selection(force_fps=10))
    shown = indices_of(read_frames(video))
    grid = np.arange(video.frame_count) / 10.0
    latest = [int(np.searchsorted(times, t + 1e-6, side="right") - 1) for t in grid]
    assert shown == latest
    assert video.duration == pytest.approx(info.duration, abs=0.1)


@pytest.mark.parametrize("rotation, k", [(90, 1), (270, 3), (180, 2)])
def test_rotation_metadata_is_applied(tmp_path, rotation, k):
    plain = write_sample_video(str(tmp_path / "plain.mp4"), frames=3, width=64, height=32)
    turned = write_sample_video(str(tmp_path / f"r{rotation}.mp4"), frames=3, width=64, height=32,
                                rotation=rotation)
    info = probe_video(turned)
    assert info.rotation == rotation
    assert (info.width, info.height) == ((32, 64) if rotation != 180 else (64, 32))
    upright = read_frames(select_frames(probe_video(plain), Selection()))
    shown = read_frames(select_frames(info, Selection()))
    assert np.array_equal(shown, np.stack([np.rot90(f, k) for f in upright]))


def test_odd_sizes_are_rounded_down_by_cropping_without_resampling(tmp_path):
    path = write_sample_video(str(tmp_path / "odd.mkv"), frames=4, width=131, height=75, codec="ffv1",
                              pix_fmt="yuv444p")
    info = probe_video(path)
    assert (info.width, info.height) == (131, 75)
    video = select_frames(info, Selection())
    frames = read_frames(video)
    assert frames.shape == (4, 72, 128, 3)
    full = read_frames(select_frames(info, Selection(multiple=1)))
    assert np.array_equal(frames, full[:, 1:73, 1:129])  # centred crop, same pixels


@pytest.mark.parametrize("codec, pix_fmt, container", [
    ("libx265", "yuv420p10le", "mp4"),
    ("prores_ks", "yuv422p10le", "mov"),
])
def test_ten_bit_input_decodes_to_rgb(tmp_path, codec, pix_fmt, container):
    path = write_sample_video(str(tmp_path / f"ten.{container}"), frames=6, codec=codec, pix_fmt=pix_fmt,
                              container=container)
    info = probe_video(path)
    assert "10" in info.pix_fmt
    frames = read_frames(select_frames(info, Selection()))
    assert frames.dtype == np.uint8
    assert indices_of(frames) == list(range(6))


@pytest.mark.parametrize("mode, scaled", [("crop", (86, 64)), ("pad", (64, 48)), ("stretch", (64, 64))])
def test_resize_modes(mode, scaled):
    geo = plan_geometry(128, 96, Selection(width=64, height=64, resize_mode=mode))
    assert (geo.width, geo.height) == (64, 64)
    assert (geo.scaled_width, geo.scaled_height) == scaled


def test_resize_keeps_aspect_when_one_side_is_zero_and_rounds_to_multiple():
    geo = plan_geometry(1920, 1080, Selection(width=672, multiple=64))
    assert (geo.width, geo.height) == (640, 320)
    geo = plan_geometry(1920, 1080, Selection(height=384))
    assert (geo.width, geo.height) == (680, 384)


def test_pad_mode_puts_black_bars_around_the_picture(clip):
    video = select_frames(probe_video(clip), Selection(width=128, height=128, resize_mode="pad", frame_cap=1))
    frame = read_frames(video)[0]
    assert frame.shape == (128, 128, 3)
    assert frame[:16].max() == 0 and frame[-16:].max() == 0
    assert read_index(frame[16:112]) == 0


def test_audio_is_trimmed_to_the_selection_sample_exactly(tmp_path):
    # Lossless PCM so that the samples themselves can be compared; the right channel is a ramp of time.
    path = write_sample_video(str(tmp_path / "pcm.mkv"), frames=60, fps=24, audio_seconds=2.5,
                              audio_codec="pcm_s16le", sample_rate=48000, container="matroska")
    video = select_frames(probe_video(path), Selection(start=12, frame_cap=24))
    samples, rate = read_audio(path, video.start_time, video.end_time)
    assert samples.shape == (2, 48000)
    expected = tone(2.5, rate)[:, 24000:72000]
    assert np.abs(samples - expected).max() < 1e-4  # 16-bit quantisation only


def test_lossy_audio_trim_is_aligned(clip):
    video = select_frames(probe_video(clip), Selection(start=12, frame_cap=24))
    samples, rate = read_audio(clip, video.start_time, video.end_time)
    assert samples.shape == (2, rate)
    expected = tone(2.5, rate)[1, round(0.5 * rate):round(1.5 * rate)]
    # The ramp rises 1/rate per sample: the median difference is the misalignment in samples/rate.
    assert abs(np.median(samples[1] - expected)) * rate < 64  # within AAC's filter delay


def test_no_audio_gives_none(tmp_path):
    path = write_sample_video(str(tmp_path / "silent.mp4"), frames=4)
    assert probe_video(path).audio is None
    assert read_audio(path, 0, 1) is None


@pytest.mark.parametrize("selection, message", [
    (Selection(start=60), "past the end"),
    (Selection(start=2.5, start_unit="second"), "past the end"),
    (Selection(every_nth=0), "every_nth must be at least 1"),
    (Selection(resize_mode="zoom"), "Unknown resize mode"),
    (Selection(start_unit="minute"), "Unknown start unit"),
])
def test_bad_selections_say_what_and_how(clip, selection, message):
    with pytest.raises(LongEditError, match=message) as error:
        select_frames(probe_video(clip), selection)
    assert error.value.fix


def test_audio_only_file_is_refused_clearly(tmp_path):
    path = write_sample_video(str(tmp_path / "voice.m4a"), video=False, audio_seconds=1.0, container="mp4")
    with pytest.raises(LongEditError, match="audio file"):
        probe_video(path)


def test_zero_frame_video_is_refused_clearly(tmp_path):
    path = write_sample_video(str(tmp_path / "empty.mp4"), frames=0)
    with pytest.raises(LongEditError, match="zero frames"):
        probe_video(path)


def test_missing_and_non_video_files(tmp_path):
    with pytest.raises(LongEditError, match="does not exist"):
        probe_video(str(tmp_path / "nope.mp4"))
    text = tmp_path / "notes.mp4"
    text.write_text("hello\n" * 1000)
    with pytest.raises(LongEditError, match="could not be opened as a video"):
        probe_video(str(text))


def test_truncated_mp4_is_refused_clearly(tmp_path):
    path = tmp_path / "cut.mp4"
    write_sample_video(str(path), frames=40)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(LongEditError, match="truncated or corrupt"):
        probe_video(str(path))


def test_truncated_stream_raises_after_the_frames_it_had(tmp_path):
    # A streamable container cut mid-way: the probe sees fewer packets and says so through decoding.
    path = tmp_path / "cut.ts"
    write_sample_video(str(path), frames=60, container="mpegts")
    info = probe_video(str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    video = select_frames(info, Selection())  # the selection was planned on the complete file
    with pytest.raises(LongEditError, match="truncated or damaged"):
        for _ in iter_frames(video, 16):
            pass
