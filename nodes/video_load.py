"""Load Video (LongEdit): a lazy handle on a long video, plus IMAGE, AUDIO, fps and frame count."""
from __future__ import annotations

import hashlib
import io as pyio
import os

import torch

import folder_paths
from comfy_api.latest import io

from ..core.errors import LongEditError
from ..core.video.input_policy import refuse_protocol
from ..core.video.paths import resolve_inside
from ..core.video.sink import VideoWriter, read_audio_input
from ..core.video.source import RESIZE_MODES, START_UNITS, Selection, probe_video, read_audio, read_frames, select_frames
from .comfy_glue import LongVideoType, allowed_roots, scratch_dir, to_uint8

IMAGES_AUTO = "auto (all when connected)"
IMAGES_FIRST = "first frame only"
IMAGES_ALL = "all selected frames"


def _input_videos() -> list[str]:
    input_dir = folder_paths.get_input_directory()
    files = [f for f in os.listdir(input_dir) if os.path.isfile(os.path.join(input_dir, f))]
    return sorted(folder_paths.filter_files_content_types(files, ["video"]))


def _resolve(video: str, path: str) -> str:
    if path.strip():
        refuse_protocol(path)
        return resolve_inside(path.strip(), allowed_roots(), base=folder_paths.get_input_directory())
    if not video:
        raise LongEditError("No video was chosen.", "upload a video or pick one from the list.")
    refuse_protocol(video)
    return resolve_inside(folder_paths.get_annotated_filepath(video), allowed_roots())


def _stream_source(video):
    """A file-backed VIDEO's path or bytes; None for one held in memory (its default get_stream_source
    would have to encode it, and fails in ComfyUI 0.3.64: 'Could not determine output format')."""
    if not hasattr(video, "get_stream_source"):
        return None
    try:
        return video.get_stream_source()
    except Exception:  # an in-memory VIDEO of any pack: read its components instead
        return None


def _from_core_video(video) -> str:
    """A file path for ComfyUI's VIDEO type: its own file, or a lossless copy in ComfyUI's temp dir."""
    source = _stream_source(video)
    if isinstance(source, str):
        refuse_protocol(source)
        return resolve_inside(source, allowed_roots())  # the same policy as a picked file
    if isinstance(source, pyio.BytesIO):
        data = source.getvalue()
        path = os.path.join(scratch_dir(), f"video_{hashlib.sha1(data).hexdigest()[:16]}.bin")
        if not os.path.exists(path):
            with open(path + ".tmp", "wb") as f:
                f.write(data)
            os.replace(path + ".tmp", path)
        return path
    if not hasattr(video, "get_components"):
        raise LongEditError(f"This VIDEO ({type(video).__name__}) has neither a file nor frames to read.",
                            "connect a VIDEO from ComfyUI's Load Video or Create Video.")
    components = video.get_components()  # frames already in memory (e.g. from Create Video)
    images = components.images
    if images.ndim != 4 or images.shape[0] == 0:
        raise LongEditError(f"This VIDEO holds no frames (images of shape {tuple(images.shape)}).",
                            "connect a VIDEO with at least one frame.")
    fps = float(components.frame_rate or 0)
    if fps <= 0:
        raise LongEditError(f"This VIDEO has no frame rate ({components.frame_rate}).",
                            "set the frame rate in the node that made it (e.g. Create Video's fps).")
    path = os.path.join(scratch_dir(), f"video_{id(video):x}_{images.shape[0]}.mkv")
    if os.path.exists(path):
        os.remove(path)
    with VideoWriter(path, "mkv (FFV1 lossless)", fps, images.shape[2], images.shape[1],
                     audio=read_audio_input(components.audio)) as writer:
        for i in range(0, images.shape[0], 64):
            writer.write(to_uint8(images[i:i + 64]))
    return path


def _images_connected(prompt, node_id) -> bool:
    """Whether any node of the running prompt reads this node's IMAGE output (slot 1)."""
    if not prompt or node_id is None:
        return True  # unknown: be safe and decode what was asked for
    for node in prompt.values():
        for value in (node.get("inputs") or {}).values():
            if isinstance(value, list) and len(value) == 2 and str(value[0]) == str(node_id) and value[1] == 1:
                return True
    return False


class LoadLongVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LongEditLoadVideo",
            display_name="Load Video (LongEdit)",
            category="LongEdit/video",
            description=(
                "Opens a video lazily: only timestamps are read here, frames are decoded later in chunks by "
                "Encode Video / Save nodes, so 10,000-frame videos do not fill RAM."),
            inputs=[
                io.Combo.Input("video", options=_input_videos(), upload=io.UploadType.video,
                               tooltip="A video in ComfyUI's input directory (use the upload button to add one)."),
                io.Float.Input("start", default=0, min=0, max=1e9, step=1,
                               tooltip="Where the selection begins, in the unit chosen below."),
                io.Combo.Input("start_unit", options=list(START_UNITS), default="frame",
                               tooltip="'frame': start is a source frame index; 'second': a time from the start."),
                io.Int.Input("frame_cap", default=0, min=0, max=1_000_000,
                             tooltip="Take at most this many frames (after every_nth). 0 takes all."),
                io.Int.Input("every_nth", default=1, min=1, max=1000,
                             tooltip="Keep every n-th frame; the frame rate is divided by n so timing is kept."),
                io.Float.Input("force_fps", default=0, min=0, max=240, step=0.001,
                               tooltip="Resample to this frame rate (frames are repeated or dropped). 0: every frame "
                                       "once on its own timestamp (a variable-rate source keeps its timing "
                                       "through the save nodes; gaps are not filled)."),
                io.Int.Input("width", default=0, min=0, max=16384, step=8,
                             tooltip="Output width. 0: from the source (or from height, keeping the aspect)."),
                io.Int.Input("height", default=0, min=0, max=16384, step=8,
                             tooltip="Output height. 0: from the source (or from width, keeping the aspect)."),
                io.Combo.Input("resize_mode", options=list(RESIZE_MODES), default="crop",
                               tooltip="crop: fill the size and cut the overflow; pad: fit inside and add black "
                                       "bars; stretch: ignore the aspect ratio."),
                io.Combo.Input("size_multiple", options=["8", "16", "64"], default="8",
                               tooltip="Round the output sides down to this multiple (SD VAEs need 8)."),
                io.Combo.Input("images", options=[IMAGES_AUTO, IMAGES_FIRST, IMAGES_ALL], default=IMAGES_AUTO,
                               tooltip="What the IMAGE output holds. auto: every selected frame when the IMAGE "
                                       "output is connected (so a saver downstream gets the whole clip), else "
                                       "only the first frame. 'all selected frames' decodes them into RAM; long "
                                       "videos should stay on the 'video' output, which streams."),
                io.Int.Input("image_frame_cap", default=256, min=1, max=100_000,
                             tooltip="With 'all selected frames', refuse selections longer than this "
                                     "(float32 RGB costs width x height x 12 bytes per frame)."),
                io.String.Input("path", default="", optional=True,
                                tooltip="Optional: a plain video file inside ComfyUI's input, output or temp "
                                        "directory (relative paths start at input/; links are followed and must "
                                        "stay inside; no URLs, playlists or lists). Overrides 'video'."),
                io.Video.Input("video_in", optional=True,
                               tooltip="Optional: a VIDEO from ComfyUI's own nodes (Load Video, Create Video; "
                                       "file-backed or in memory). Overrides 'video' and 'path'."),
            ],
            outputs=[
                LongVideoType.Output(display_name="video",
                                     tooltip="Lazy handle for Encode Video and the save nodes (no frames decoded)."),
                io.Image.Output(display_name="images", tooltip="See the 'images' input."),
                io.Audio.Output(display_name="audio", tooltip="The audio of the selected range (None if silent)."),
                io.Float.Output(display_name="fps", tooltip="Frame rate of the selection (of a variable-rate "
                                                                    "source: its median frame interval)."),
                io.Int.Output(display_name="frame_count", tooltip="Frames in the selection."),
                io.String.Output(display_name="info", tooltip="A one-line description of source and selection."),
            ],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, video, path=None):
        # Listing only these keeps ComfyUI's own range and option checks for every other input.
        if not (path or "").strip() and not folder_paths.exists_annotated_filepath(video):
            return f"Invalid video file: {video} (upload it, or pick one from the list)"
        return True

    @classmethod
    def fingerprint_inputs(cls, video, path=None, video_in=None, **kwargs):
        if video_in is not None:
            return float("nan")  # compare by the upstream node instead
        try:
            real = _resolve(video, path or "")
            stat = os.stat(real)
            return f"{real}:{stat.st_mtime_ns}:{stat.st_size}"
        except LongEditError as e:
            return str(e)

    @classmethod
    def execute(cls, video, start, start_unit, frame_cap, every_nth, force_fps, width, height, resize_mode,
                size_multiple, images, image_frame_cap, path="", video_in=None) -> io.NodeOutput:
        source = _from_core_video(video_in) if video_in is not None else _resolve(video, path or "")
        selection = Selection(start=start, start_unit=start_unit, frame_cap=frame_cap, every_nth=every_nth,
                              force_fps=force_fps, width=width, height=height, resize_mode=resize_mode,
                              multiple=int(size_multiple))
        long_video = select_frames(probe_video(source), selection)
        count = long_video.frame_count
        requested = images
        if images == IMAGES_AUTO:
            images = IMAGES_ALL if _images_connected(cls.hidden.prompt, cls.hidden.unique_id) else IMAGES_FIRST
        if images == IMAGES_ALL and count > image_frame_cap:
            gb = count * long_video.width * long_video.height * 12 / 1e9
            raise LongEditError(
                f"images='{requested}' would decode {count} frames into RAM ({gb:.1f} GB as IMAGE), more than "
                f"image_frame_cap={image_frame_cap}.",
                "connect the 'video' output to Encode Video / Save instead (they stream) and leave IMAGE "
                "unconnected, or raise image_frame_cap, or lower frame_cap.")
        frames = read_frames(long_video, 0, count if images == IMAGES_ALL else 1)
        image_tensor = torch.from_numpy(frames).float().div_(255.0)
        audio = read_audio(source, long_video.start_time, long_video.end_time) if long_video.source.audio else None
        audio_out = None
        if audio is not None:
            audio_out = {"waveform": torch.from_numpy(audio[0]).unsqueeze(0), "sample_rate": audio[1]}
        info = long_video.describe()
        return io.NodeOutput(long_video, image_tensor, audio_out, float(long_video.fps), count, info,
                             ui={"text": [info]})
