"""File locations: inputs must stay inside allowed roots; outputs appear atomically."""
from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from typing import Iterable, Iterator

from ..errors import LongEditError


def resolve_inside(path: str, roots: Iterable[str], base: str | None = None) -> str:
    """Resolve `path` (absolute, or relative to `base`) and require it inside one of `roots`.

    Symlinks are resolved first, so a link inside input/ that points elsewhere is refused too.
    """
    roots = [os.path.realpath(r) for r in roots]
    candidate = path if os.path.isabs(path) or base is None else os.path.join(base, path)
    real = os.path.realpath(candidate)
    if not any(os.path.commonpath([real, r]) == r for r in roots):
        raise LongEditError(
            f"The path '{path}' is outside the directories LongEdit may read ({', '.join(roots)}).",
            "copy or upload the video into ComfyUI's input directory and pick it there.",
        )
    if not os.path.exists(real):
        raise LongEditError(
            f"The video file '{path}' does not exist (looked for {real}).",
            "check the file name, or upload the video with the node's upload button.",
        )
    if not os.path.isfile(real):
        kind = "a directory" if os.path.isdir(real) else "not a regular file (a device, FIFO or socket)"
        raise LongEditError(f"'{path}' is {kind}, not a video file.", "pick a video file.")
    return real


DEFAULT_OUTPUT_NAME = "LongEdit"
NAME_MAX = 255  # bytes in one file name on Linux, macOS and Windows file systems
_PARTIAL_EXTRA = len(".") + len(".12345678.partial")  # what partial_path adds to a name


def output_prefix(prefix: str) -> str:
    """The filename_prefix to use: an empty name (or a bare folder, 'clips/') gets DEFAULT_OUTPUT_NAME, so
    no output is named '_00001_.mp4' or hidden; a name starting with '.' (a hidden file) is refused."""
    prefix = prefix.strip()
    folder, name = os.path.split(prefix)
    if not name:
        return os.path.join(folder, DEFAULT_OUTPUT_NAME) if folder else DEFAULT_OUTPUT_NAME
    if name.startswith("."):
        raise LongEditError(f"The filename_prefix '{prefix}' would make a hidden file (a name starting with '.').",
                            "start the name with a letter or digit, e.g. 'LongEdit/video'.")
    return prefix


def check_output_path(final_path: str, output_dir: str) -> None:
    """The output and its folder must resolve (symlinks followed) inside output_dir, and its name must fit.

    ComfyUI's own check compares absolute paths, so a subfolder of output/ that is a symlink to elsewhere
    passes it; this one compares real paths.
    """
    root = os.path.realpath(output_dir)
    if os.path.commonpath([os.path.abspath(final_path), os.path.abspath(output_dir)]) != os.path.abspath(output_dir):
        raise LongEditError(f"The output '{final_path}' leads outside ComfyUI's output directory ({root}).",
                            "use a relative filename_prefix without '..', e.g. 'LongEdit/video'.")
    folder = os.path.dirname(final_path)
    for path in (folder, final_path):
        real = os.path.realpath(path)
        if os.path.commonpath([real, root]) != root:
            raise LongEditError(
                f"The output '{final_path}' would be written to {real}, outside ComfyUI's output directory "
                f"({root}); a folder on the way is a symbolic link that leads out of it.",
                "pick a filename_prefix whose folders are real folders inside the output directory (or remove "
                "the link).")
    name = os.path.basename(final_path)
    if len(name.encode()) + _PARTIAL_EXTRA > NAME_MAX:
        raise LongEditError(
            f"The output name '{name[:40]}...' is {len(name.encode())} bytes long; a file name may have at most "
            f"{NAME_MAX - _PARTIAL_EXTRA} here (the counter and extension included).",
            "shorten the last part of filename_prefix to about 200 characters or fewer.")
    for part in os.path.dirname(os.path.relpath(final_path, output_dir)).split(os.sep):
        if len(part.encode()) > NAME_MAX:
            raise LongEditError(f"The folder name '{part[:40]}...' of filename_prefix is longer than {NAME_MAX} "
                                "bytes.", "shorten the folders of filename_prefix.")


def partial_path(final_path: str) -> str:
    """A hidden sibling of `final_path` for writing; same filesystem, so the rename is atomic."""
    folder, name = os.path.split(final_path)
    return os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.partial")


@contextmanager
def atomic_output(final_path: str) -> Iterator[str]:
    """Yield a temporary path; move it to `final_path` only if the block completes.

    An existing complete file at `final_path` is never replaced: ComfyUI's counter picks fresh names, and
    if one appeared meanwhile we refuse rather than overwrite it. On any error the partial output is
    removed, so a half-written video never looks like a finished one.
    """
    tmp = partial_path(final_path)
    try:
        yield tmp
        if os.path.exists(final_path):
            raise LongEditError(
                f"The output '{final_path}' appeared while writing; it was not overwritten.",
                "run again; a new file name will be chosen.",
            )
        os.replace(tmp, final_path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
