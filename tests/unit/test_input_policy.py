"""Issue 15 at the unit level: what may be opened, where outputs may go, timing of gaps and raw streams,
audio layouts, and other packs' AUDIO. The same behaviours run through a real server in
tests/integration/test_hostile_inputs.py."""
from __future__ import annotations

import os
from collections.abc import Mapping

import av
import numpy as np
import pytest
import torch

from longedit.core.video import input_policy
from longedit.core.errors import LongEditError
from longedit.core.video.input_policy import ALLOWED_DEMUXERS, MULTI_FILE_DEMUXERS, open_input, refuse_protocol
from longedit.core.video.paths import check_output_path, output_prefix, resolve_inside
from longedit.core.video.sample import frame_image, read_index, write_sample_video
from longedit.core.video.sink import (AudioFromFile, AudioWaveform, VideoWriter, downmix_to_stereo,
                                      read_audio_input)
from longedit.core.video.source import Selection, probe_video, read_audio, read_frames, select_frames

TONES = (300.0, 500.0, 700.0, 60.0, 900.0, 1100.0, 1300.0, 1500.0)  # FL FR FC LFE BL BR SL SR


def tones(channels: int, rate: int, seconds: float) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return np.stack([0.2 * np.sin(2 * np.pi * TONES[k] * t) for k in range(channels)]).astype(np.float32)


def level_at(signal: np.ndarray, rate: int, hz: float) -> float:
    t = np.arange(len(signal)) / rate
    w = np.hanning(len(signal))
    return float(2 * abs(np.sum(signal * w * np.exp(-2j * np.pi * hz * t))) / w.sum())


def write_pcm_video(path: str, layout: str, rate: int = 48000, seconds: float = 0.5) -> np.ndarray:
    """An mkv with a few FFV1 frames and PCM audio of `layout` (written packed: any channel count)."""
    channels = av.AudioLayout(layout).nb_channels
    samples = tones(channels, rate, seconds)
    with av.open(path, "w") as out:
        v = out.add_stream("ffv1", rate=24)
        v.width, v.height, v.pix_fmt = 32, 32, "yuv444p"
        a = out.add_stream("pcm_s16le", rate=rate, layout=layout)
        for i in range(12):
            for p in v.encode(av.VideoFrame.from_ndarray(frame_image(i, 32, 32), format="rgb24")):
                out.mux(p)
        for p in v.encode(None):
            out.mux(p)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples.T).reshape(1, -1), format="flt",
                                           layout=layout)
        frame.sample_rate, frame.pts = rate, 0
        for p in a.encode(frame):
            out.mux(p)
        for p in a.encode(None):
            out.mux(p)
    return samples


# -- inputs ----------------------------------------------------------------------------------------------
def test_the_allowed_and_refused_demuxer_lists_are_disjoint():
    assert not set(ALLOWED_DEMUXERS) & MULTI_FILE_DEMUXERS


@pytest.mark.parametrize("path", ["http://example.com/a.mp4", "concat:a.mp4|b.mp4", "pipe:0", "file:/etc/hostname",
                                  "rtmp://x/y", "  subfile:,start,0,end,1,:a.mp4"])
def test_protocols_are_refused(path):
    with pytest.raises(LongEditError, match="URL or FFmpeg protocol"):
        refuse_protocol(path)


@pytest.mark.parametrize("path", ["clip.mp4", "/abs/clip.mp4", "C:\\videos\\clip.mp4", "dir/a:b.mp4"])
def test_plain_names_are_not_protocols(path):
    refuse_protocol(path)


@pytest.fixture
def outside_segment(tmp_path):
    secret = tmp_path / "outside" / "secret.ts"
    secret.parent.mkdir()
    write_sample_video(str(secret), frames=6, width=32, height=32, container="mpegts")
    return secret


def hls(segment) -> str:
    return f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:0.5,\n{segment}\n#EXT-X-ENDLIST\n"


@pytest.mark.parametrize("name, content, expected", [
    ("a.m3u8", "hls", "playlist, list or script"),
    ("a.mp4", "hls", "holds a playlist"),
    ("a.mkv", "ffconcat", "holds a playlist"),
    ("a.mov", "concat_plain", "holds a playlist"),
])
def test_playlists_and_lists_are_refused_by_name_and_by_content(tmp_path, outside_segment, name, content, expected):
    text = {"hls": hls(outside_segment), "ffconcat": f"ffconcat version 1.0\nfile '{outside_segment}'\n",
            "concat_plain": f"file '{outside_segment}'\n"}[content]
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(LongEditError, match=expected):
        probe_video(str(path))


def test_ffmpeg_itself_refuses_a_playlist_the_sniffing_missed(tmp_path, outside_segment, monkeypatch):
    """The demuxer whitelist is a second, independent layer: with the name and content checks switched off,
    FFmpeg still refuses to open an HLS playlist (without the whitelist it opens and reads the segment)."""
    path = tmp_path / "a.m3u8"
    path.write_text(hls(outside_segment))
    with av.open(str(path)) as plain:  # what happens without the policy: the outside segment is read
        assert plain.format.name == "hls" and plain.streams.video
    monkeypatch.setattr(input_policy, "check_plain_file", lambda p: None)
    with pytest.raises(LongEditError, match="not in a container LongEdit reads"):
        open_input(str(path))


def test_the_opened_demuxer_is_checked_again_by_name(tmp_path, outside_segment, monkeypatch):
    """The third layer on its own: with the first two let through (no sniffing, hls whitelisted), the
    demuxer FFmpeg picked is still refused by name after opening."""
    path = tmp_path / "a.m3u8"
    path.write_text(hls(outside_segment))
    monkeypatch.setattr(input_policy, "check_plain_file", lambda p: None)
    monkeypatch.setattr(input_policy, "ALLOWED_DEMUXERS", ALLOWED_DEMUXERS + ("hls",))
    with pytest.raises(LongEditError, match="opened as 'hls', a format that reads other files"):
        open_input(str(path))


def test_a_percent_pattern_name_is_refused_not_expanded(tmp_path):
    for k in range(1, 3):
        write_sample_video(str(tmp_path / f"tmp{k}.png"), frames=1, width=32, height=32, codec="png",
                           pix_fmt="rgb24", container="image2")
        os.rename(tmp_path / f"tmp{k}.png", tmp_path / f"img{k:03d}.png")
    (tmp_path / "img%03d.png").write_bytes((tmp_path / "img001.png").read_bytes())
    with pytest.raises(LongEditError, match="image sequence pattern"):
        probe_video(str(tmp_path / "img%03d.png"))


def test_a_literal_percent_in_a_video_name_works(tmp_path):
    path = write_sample_video(str(tmp_path / "100% done %d.mp4"), frames=5, width=32, height=32)
    assert [read_index(f) for f in read_frames(select_frames(probe_video(path), Selection()))] == list(range(5))


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "f.mp4"
    os.mkfifo(fifo)
    with pytest.raises(LongEditError, match="not a regular file"):
        resolve_inside(str(fifo), [str(tmp_path)])
    with pytest.raises(LongEditError, match="not a regular file"):
        probe_video(str(fifo))


# -- outputs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix, expected", [
    ("", "LongEdit"), ("   ", "LongEdit"), ("clips/", os.path.join("clips", "LongEdit")), ("a/b", "a/b")])
def test_output_prefix_never_makes_an_empty_or_hidden_name(prefix, expected):
    assert output_prefix(prefix) == expected


def test_a_hidden_output_name_is_refused():
    with pytest.raises(LongEditError, match="hidden file"):
        output_prefix("clips/.secret")


def test_outputs_through_a_link_out_of_output_are_refused(tmp_path):
    out, elsewhere = tmp_path / "output", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "real").mkdir()
    os.symlink(elsewhere, out / "link")
    check_output_path(str(out / "real" / "x_00001_.mp4"), str(out))
    with pytest.raises(LongEditError, match="symbolic link"):
        check_output_path(str(out / "link" / "x_00001_.mp4"), str(out))
    with pytest.raises(LongEditError, match="symbolic link"):
        check_output_path(str(out / "link" / "new" / "x_00001_.mp4"), str(out))
    os.symlink(elsewhere / "target.mp4", out / "dangling_00001_.mp4")  # a file link, dangling
    with pytest.raises(LongEditError, match="symbolic link"):
        check_output_path(str(out / "dangling_00001_.mp4"), str(out))
    with pytest.raises(LongEditError, match="without '..'"):
        check_output_path(str(out / ".." / "x_00001_.mp4"), str(out))


def test_output_names_too_long_for_the_file_system_are_refused(tmp_path):
    fits = "a" * (255 - len(".") - len(".12345678.partial"))
    check_output_path(str(tmp_path / fits), str(tmp_path))
    with pytest.raises(LongEditError, match="bytes long"):
        check_output_path(str(tmp_path / (fits + "b")), str(tmp_path))


def test_h265_at_8x8_is_a_clear_error_and_leaves_nothing(tmp_path):
    out = tmp_path / "tiny.mp4"
    with pytest.raises(LongEditError, match="refused 8x8 frames"):
        with VideoWriter(str(out), "mp4 (h265)", 24, 8, 8) as writer:
            writer.write(np.zeros((2, 8, 8, 3), np.uint8))
    assert os.listdir(tmp_path) == []


def test_png_sequence_folder_with_percent_d_in_its_name(tmp_path):
    out = tmp_path / "frame_%d_%06d"
    with VideoWriter(str(out), "png sequence", 24, 32, 32) as writer:
        writer.write(np.stack([frame_image(i, 32, 32) for i in range(3)]))
    assert sorted(os.listdir(out)) == ["000001.png", "000002.png", "000003.png"]


# -- timing ----------------------------------------------------------------------------------------------
def test_a_long_gap_gives_the_frames_that_exist_not_a_filled_grid(tmp_path):
    times = [0.0, 0.042, 1000.0]
    path = write_sample_video(str(tmp_path / "gap.mkv"), frames=3, width=64, height=32, codec="ffv1",
                              pix_fmt="yuv444p", frame_times=times)
    video = select_frames(probe_video(path), Selection())
    assert [read_index(f) for f in read_frames(video)] == [0, 1, 2]
    assert float(video.fps) == pytest.approx(1 / 0.042, rel=1e-3)  # the typical interval, not 3 / 1000 s


def frame_times_of(path: str) -> list[float]:
    with av.open(path) as c:
        return sorted(float(f.pts * f.time_base) for f in c.decode(video=0))


@pytest.mark.parametrize("fmt", ["mp4 (h264)", "mkv (FFV1 lossless)", "mov (ProRes 422 HQ)"])
def test_saved_frames_keep_their_own_timestamps_and_the_audio_its_length(tmp_path, fmt):
    """A variable-rate source with audio, saved through its handle: every frame once, at its source time
    (relative to the first), and the audio as long as the video (so they stay in sync)."""
    times = np.concatenate([np.arange(10) * 0.02, 0.2 + np.arange(10) * 0.1, [5.0]])  # fast, slow, a gap
    path = write_sample_video(str(tmp_path / "vfr.mkv"), frames=21, width=64, height=32, codec="ffv1",
                              pix_fmt="yuv444p", frame_times=times, audio_seconds=5.2, audio_codec="flac",
                              container="matroska")
    video = select_frames(probe_video(path), Selection(start=2))
    assert np.allclose(video.times, times[2:] - times[2], atol=1e-3)
    out = str(tmp_path / ("out" + {"mp4 (h264)": ".mp4", "mkv (FFV1 lossless)": ".mkv"}.get(fmt, ".mov")))
    with VideoWriter(out, fmt, video.fps, 64, 32, audio=AudioFromFile(path, video.start_time, video.end_time),
                     frame_times=video.times) as writer:
        writer.write(read_frames(video))
    shown = frame_times_of(out)
    assert np.allclose(np.array(shown) - shown[0], times[2:] - times[2], atol=1.5e-3), shown
    samples, rate = read_audio(out, shown[0], 100)  # mkv shifts every stream when a packet starts before 0
    # FLAC is copied packet by packet into mp4 and mkv (trim exact to one 4608-sample packet); mov re-encodes
    # it as PCM, exact to the sample.
    packet = 4608 / 44100 if fmt != "mov (ProRes 422 HQ)" else 0.0
    assert samples.shape[1] / rate == pytest.approx(video.duration, abs=packet + 2e-3)
    assert video.duration == pytest.approx(5.0 - times[2] + 1 / float(video.fps), abs=1e-3)


def test_jittery_vfr_keeps_every_frame_once_at_the_median_rate(tmp_path):
    rng = np.random.default_rng(0)
    times = np.cumsum(np.r_[0, rng.uniform(0.025, 0.045, 29)])  # about 30 fps with a lot of jitter
    path = write_sample_video(str(tmp_path / "jitter.mkv"), frames=30, width=64, height=32, fps=30, codec="ffv1",
                              pix_fmt="yuv444p", frame_times=times)
    info = probe_video(path)
    assert info.is_vfr
    video = select_frames(info, Selection())
    assert [read_index(f) for f in read_frames(video)] == list(range(30))
    median = np.median(np.diff(np.round(times, 3)))  # mkv keeps milliseconds
    assert float(video.fps) == pytest.approx(1 / median, rel=2e-3)


def test_a_raw_stream_without_timestamps_decodes_every_frame(tmp_path):
    path = write_sample_video(str(tmp_path / "raw.h264"), frames=12, width=64, height=32, container="h264")
    with av.open(path) as c:  # the premise: no packet carries a timestamp
        assert all(p.pts is None and p.dts is None for p in c.demux(video=0) if p.size)
    info = probe_video(path)
    assert info.frame_count == 12
    assert [read_index(f) for f in read_frames(select_frames(info, Selection()))] == list(range(12))
    assert [read_index(f) for f in read_frames(select_frames(info, Selection(start=5)))] == list(range(5, 12))


# -- audio -----------------------------------------------------------------------------------------------
def test_eight_channel_audio_is_read_without_crashing(tmp_path):
    """PyAV crashes the process on planar frames of 8+ channels; the reader goes through packed samples."""
    path = str(tmp_path / "71.mkv")
    source = write_pcm_video(path, "7.1")
    samples, rate = read_audio(path, 0, 0.5)
    assert samples.shape == source.shape
    assert np.abs(samples - source).max() < 2 / 32768 + 1e-6  # pcm_s16le quantisation


def test_five_one_waveform_keeps_six_channels_in_mp4(tmp_path):
    out = str(tmp_path / "six.mp4")
    with VideoWriter(out, "mp4 (h264)", 24, 32, 32, audio=AudioWaveform(tones(6, 48000, 0.5), 48000)) as w:
        w.write(np.stack([frame_image(i, 32, 32) for i in range(12)]))
    samples, rate = read_audio(out, 0, 10)
    assert samples.shape[0] == 6
    for k in range(6):  # each channel still carries its own tone, well above the others
        others = [level_at(samples[k], rate, TONES[j]) for j in range(6) if j != k]
        assert level_at(samples[k], rate, TONES[k]) > 0.15 and max(others) < 0.02, k


def test_seven_one_is_downmixed_by_the_standard_matrix(tmp_path, caplog):
    out = str(tmp_path / "two.mp4")
    with caplog.at_level("WARNING", logger="longedit"):
        with VideoWriter(out, "mov (ProRes 422 HQ)", 24, 32, 32,
                         audio=AudioWaveform(tones(8, 48000, 0.5), 48000, "7.1")) as w:
            w.write(np.stack([frame_image(i, 32, 32) for i in range(12)]))
    assert "downmixed to stereo" in caplog.text
    (left, right), rate = read_audio(out, 0, 10)
    # ITU/FFmpeg downmix: L = FL + 0.707 FC + 0.707 BL + 0.707 SL (LFE dropped), and the mirror for R.
    assert level_at(left, rate, TONES[0]) == pytest.approx(0.2, rel=0.02)
    assert level_at(right, rate, TONES[0]) < 0.005
    for hz in (TONES[2],):  # the centre, in both at -3 dB
        assert level_at(left, rate, hz) == pytest.approx(0.2 * 0.7071, rel=0.02)
        assert level_at(right, rate, hz) == pytest.approx(0.2 * 0.7071, rel=0.02)
    assert level_at(left, rate, TONES[3]) < 0.005 and level_at(right, rate, TONES[3]) < 0.005  # LFE


def test_unlabelled_channels_downmix_with_equal_power_panning():
    n = 9
    ones = np.ones((n, 4), np.float32)
    assert np.allclose(downmix_to_stereo(ones), 1.0)  # a signal on every channel keeps its level
    first = np.zeros((n, 4), np.float32)
    first[0] = 1.0
    mixed = downmix_to_stereo(first)
    pan = np.linspace(0, np.pi / 2, n)
    assert np.allclose(mixed[:, 0], [1 / np.cos(pan).sum(), 0.0], atol=1e-7)  # hard left only


class LazyAudio(Mapping):
    """Like VideoHelperSuite's AUDIO for a silent video: reading it runs a decoder that fails."""

    def __getitem__(self, key):
        raise RuntimeError("ffmpeg: Output file #0 does not contain any stream")

    def __iter__(self):
        return iter(("waveform", "sample_rate"))

    def __len__(self):
        return 2


def test_other_packs_audio_inputs(caplog):
    with caplog.at_level("WARNING", logger="longedit"):
        assert read_audio_input(LazyAudio()) is None
    assert "could not be read" in caplog.text
    assert read_audio_input(None) is None
    assert read_audio_input({"waveform": None, "sample_rate": 44100}) is None
    wave = read_audio_input({"waveform": torch.ones(1, 6, 100, dtype=torch.float16), "sample_rate": 48000})
    assert wave.samples.shape == (6, 100) and wave.samples.dtype == np.float32 and wave.sample_rate == 48000
