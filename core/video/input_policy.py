"""What LongEdit agrees to open: plain media files, never playlists, lists, protocols or devices.

A path that passed the folder check (core/video/paths.py resolve_inside) can still make FFmpeg read elsewhere:
an HLS playlist or a concat list names other files (absolute paths included), an image2 pattern expands
to many files, an SDP file opens network streams. So every input is checked three times:
  1. before opening: a regular file (not a FIFO or device), no playlist/list extension, and no playlist or
     list text at its start (an '.mp4' that is really an HLS playlist is refused too);
  2. while opening: FFmpeg may only use the 'file' protocol and the single-file demuxers of ALLOWED_DEMUXERS;
  3. after opening: the demuxer that was chosen is checked again by name.
"""
from __future__ import annotations

import os
import re

import av

from ..errors import LongEditError

# Demuxers that read one self-contained file. Anything else (hls, concat, dash, image2, sdp, devices...)
# is refused by FFmpeg itself through format_whitelist.
ALLOWED_DEMUXERS = (
    "mov", "mp4", "m4a", "3gp", "3g2", "mj2", "matroska", "webm", "avi", "flv", "mpegts", "mpeg", "ogg", "asf",
    "nut", "ivf", "gif", "apng", "mxf", "dv", "h264", "hevc", "m4v", "mjpeg", "mpegvideo", "obu",
    "yuv4mpegpipe", "wav", "mp3", "aac", "flac", "png_pipe", "jpeg_pipe", "webp_pipe", "bmp_pipe",
)
# Named explicitly so the refusal says why: each of these opens other files, URLs or devices.
MULTI_FILE_DEMUXERS = frozenset({
    "hls", "applehttp", "concat", "dash", "image2", "image2pipe", "sdp", "rtp", "rtsp", "imf", "smoothstreaming",
    "hds", "webm_dash_manifest", "avisynth", "vapoursynth", "lavfi", "tee", "fifo", "segment", "mpjpeg",
    "alsa", "oss", "fbdev", "kmsgrab", "video4linux2,v4l2", "x11grab", "pulse", "jack", "dshow", "gdigrab",
    "avfoundation",
})
LIST_EXTENSIONS = frozenset({".m3u8", ".m3u", ".ffconcat", ".concat", ".sdp", ".mpd", ".ism", ".ismc", ".pls",
                             ".txt", ".avs", ".vpy", ".xspf", ".f4m", ".cue"})
# Text a playlist, concat list, manifest or session description starts with (lower case, after whitespace).
LIST_MARKERS = (b"#extm3u", b"#ext-x-", b"ffconcat", b"[playlist]", b"v=0", b"<?xml", b"<mpd", b"<smil",
                b"file ", b"file\t", b"http:", b"https:", b"<smoothstreamingmedia")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+:")  # 'file:', 'http:', 'concat:', 'pipe:'... (not 'C:')
_SNIFF_BYTES = 4096


def refuse_protocol(path: str) -> None:
    """A path written as a URL ('http://', 'concat:a|b', 'pipe:0', 'file:x') is not a plain file name."""
    if _SCHEME.match(path.strip()):
        raise LongEditError(
            f"'{path}' is written as a URL or FFmpeg protocol ('{path.split(':', 1)[0]}:'); LongEdit reads "
            "plain files only.", "download or copy the video into ComfyUI's input directory and pick it there.")


def check_plain_file(path: str) -> None:
    """Refuse what is not a regular media file: FIFOs, devices, playlists and lists, by name and content."""
    if not os.path.exists(path):
        raise LongEditError(f"The video file '{path}' does not exist.", "check the path or upload the file.")
    if not os.path.isfile(path):
        kind = "a directory" if os.path.isdir(path) else "not a regular file (a device, FIFO or socket)"
        raise LongEditError(f"'{path}' is {kind}, not a video file.", "pick a video file.")
    extension = os.path.splitext(path)[1].lower()
    if extension in LIST_EXTENSIONS:
        raise LongEditError(
            f"'{os.path.basename(path)}' is a playlist, list or script ({extension}): it names other files or "
            "streams, which LongEdit does not follow.", "pick the video file itself (e.g. an .mp4 or .mkv).")
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if start.startswith(LIST_MARKERS) or b"#ext-x-" in head.lower():
        raise LongEditError(
            f"'{os.path.basename(path)}' holds a playlist, concat list or stream description (text naming other "
            "files or URLs), whatever its extension; LongEdit does not follow those.",
            "pick the video file itself, or join the parts into one file first (e.g. ffmpeg -i list -c copy out.mp4).")


def open_input(path: str) -> av.container.InputContainer:
    """Open a local media file for reading under the input policy (see the module docstring)."""
    path = os.path.abspath(path)  # an absolute path is never read as a protocol ('concat:...', 'pipe:...')
    check_plain_file(path)
    options = {"protocol_whitelist": "file", "format_whitelist": ",".join(ALLOWED_DEMUXERS)}
    try:
        container = av.open(path, mode="r", options=options)
    except av.error.ArgumentError as e:  # FFmpeg's EINVAL: the probed format is not on the whitelist
        if "%" in os.path.basename(path):
            raise LongEditError(
                f"'{os.path.basename(path)}' has a '%' in its name, which FFmpeg reads as an image sequence "
                "pattern (it would open other files); LongEdit refuses that.",
                "rename the file without '%', or make the images into one video file.") from e
        raise LongEditError(
            f"'{path}' is not in a container LongEdit reads ({e}); playlists, lists, image patterns and "
            "streams are refused.", "re-export it as mp4, mov, mkv, webm or avi.") from e
    except (av.error.InvalidDataError, av.error.FFmpegError, UnicodeDecodeError) as e:
        raise LongEditError(
            f"'{path}' could not be opened as a video ({e}); it is not a video, or it is truncated or corrupt.",
            "re-export or re-download the file; an mp4 cut off before its end loses its index (moov atom).",
        ) from e
    name = container.format.name
    if set(name.split(",")) & MULTI_FILE_DEMUXERS or not set(name.split(",")) & set(ALLOWED_DEMUXERS):
        container.close()
        raise LongEditError(
            f"'{path}' opened as '{name}', a format that reads other files or streams.",
            "pick a plain video file (mp4, mov, mkv, webm, avi).")
    return container
