"""File locations: inputs must stay inside allowed roots; outputs appear atomically."""
from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from typing import Iterable, Iterator

from .errors import LongEditError


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
        raise LongEditError(f"'{path}' is a directory, not a video file.", "pick a video file.")
    return real


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
