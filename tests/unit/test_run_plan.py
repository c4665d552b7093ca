"""The memory plan: sizes grow linearly with frames; runs that cannot fit are refused with the numbers."""
import pytest

from longedit.core.errors import LongEditError
from longedit.core.run_plan import GIB, RunPlan, check_resources


def plan(frames: int) -> RunPlan:
    return RunPlan(frames=frames, latent_shape=(4, 48, 84), steps=50, clips=frames // 400 + 1, per_clip=3,
                   attention_tokens=48 * 84 + 24 * 42 + 12 * 21 + 6 * 11)


def test_sizes_are_linear_in_frames_and_match_the_layouts():
    small, large = plan(1000), plan(10000)
    assert large.disk_bytes == 10 * small.disk_bytes and large.ram_bytes == 10 * small.ram_bytes
    assert small.trajectory_bytes == 51 * 1000 * 4 * 48 * 84 * 2  # float16, every sigma
    assert small.matches_bytes == 1000 * 3 * 5358 * 4  # int32, frames x candidates x tokens
    assert "10000 frames, 26 keyframes per step, 50 steps" in large.describe()


def test_a_run_that_does_not_fit_is_refused_with_the_numbers(tmp_path):
    p = plan(10000)  # ~15 GiB of trajectory at 384x672, 50 steps
    check_resources(p, str(tmp_path), ram=64 * GIB, disk=100 * GIB)
    with pytest.raises(LongEditError, match=r"needs ~15\.9 GiB on disk .* but 10\.0 GiB are free"):
        check_resources(p, str(tmp_path), ram=64 * GIB, disk=10 * GIB)
    with pytest.raises(LongEditError, match=r"needs ~9\.6 GiB of RAM but 1\.0 GiB are available"):
        check_resources(p, str(tmp_path), ram=1 * GIB, disk=100 * GIB)
