"""File inputs stay inside the allowed directories; chunk sizes follow free memory."""
import os

import pytest

from longedit.core.errors import LongEditError
from longedit.core.memory import MAX_CHUNK_FRAMES, frames_per_chunk
from longedit.core.video.paths import atomic_output, resolve_inside


@pytest.fixture
def roots(tmp_path):
    inp, out, other = tmp_path / "input", tmp_path / "output", tmp_path / "private"
    for d in (inp, out, other):
        d.mkdir()
    (inp / "a.mp4").write_bytes(b"x")
    (other / "secret.mp4").write_bytes(b"x")
    return inp, out, other


def test_inside_relative_and_absolute(roots):
    inp, out, _ = roots
    assert resolve_inside("a.mp4", [inp, out], base=str(inp)) == os.path.realpath(inp / "a.mp4")
    assert resolve_inside(str(inp / "a.mp4"), [inp, out]) == os.path.realpath(inp / "a.mp4")


@pytest.mark.parametrize("make_path", [
    lambda inp, other: "../private/secret.mp4",
    lambda inp, other: str(other / "secret.mp4"),
])
def test_escapes_are_refused(roots, make_path):
    inp, out, other = roots
    with pytest.raises(LongEditError, match="outside the directories"):
        resolve_inside(make_path(inp, other), [inp, out], base=str(inp))


def test_symlink_out_of_the_input_directory_is_refused(roots):
    inp, out, other = roots
    (inp / "link.mp4").symlink_to(other / "secret.mp4")
    with pytest.raises(LongEditError, match="outside the directories"):
        resolve_inside("link.mp4", [inp, out], base=str(inp))


def test_missing_and_directory(roots):
    inp, out, _ = roots
    with pytest.raises(LongEditError, match="does not exist"):
        resolve_inside("b.mp4", [inp], base=str(inp))
    (inp / "folder").mkdir()
    with pytest.raises(LongEditError, match="directory"):
        resolve_inside("folder", [inp], base=str(inp))


def test_atomic_output_moves_only_on_success(tmp_path):
    target = tmp_path / "final.bin"
    with atomic_output(str(target)) as tmp:
        open(tmp, "wb").write(b"done")
        assert not target.exists()
    assert target.read_bytes() == b"done"
    with pytest.raises(KeyError):
        with atomic_output(str(tmp_path / "other.bin")) as tmp:
            open(tmp, "wb").write(b"half")
            raise KeyError("boom")
    assert sorted(os.listdir(tmp_path)) == ["final.bin"]


def test_chunk_follows_free_memory_within_bounds():
    mib = 2**20
    assert frames_per_chunk(10000 * mib, 100 * mib, mib) == MAX_CHUNK_FRAMES
    assert frames_per_chunk(1000 * mib, 100 * mib, mib) == 7  # 75% of 1000 MiB / 100 MiB
    assert frames_per_chunk(10 * mib, 100 * mib, mib) == 1  # never zero
    assert frames_per_chunk(10**12, 1, 64 * mib) == 4  # host buffer bound (256 MiB)
