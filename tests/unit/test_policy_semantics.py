"""Semantics that sit around the kernels: the memory plan against the bytes actually written, ISA's routing
policy (exact warm-up blocks and steps, context range, self vs cross), and the keyframe plan's
correspondences and AAS scores against a float64 transcription of AdaFlow's matching rule."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from longedit.core.errors import LongEditError
from longedit.core.adaflow.inversion import ddim_invert
from longedit.core.isa.policy import IsaAttention, IsaSettings, context_range
from longedit.core.adaflow.keyframes import AAS_LEVEL, AksParams, select_keyframes
from longedit.core.run_plan import GIB, SAMPLER_COPIES, GpuPlan, RunPlan, available_ram, check_resources, free_disk
from longedit.kernels import isa_attention


# ----------------------------------------------------------------------------------------- memory plan

@pytest.fixture(scope="module")
def written():
    """A real inversion and keyframe plan of a small video: the bytes they hold are what the plan predicts."""
    frames, shape, steps = 23, (4, 10, 14), 5
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(frames, *shape, generator=g)
    sigmas = np.append(np.geomspace(10.0, 0.1, steps), 0.0)
    inversion = ddim_invert(latents, sigmas, lambda x, s: 0.1 * x, frames_per_chunk=8)
    scenes = torch.randn(2, 8, *shape[1:], generator=g)
    features = torch.stack([scenes[int(f >= 15)] + 0.05 * torch.randn(8, *shape[1:], generator=g)
                            for f in range(frames)])
    plan = select_keyframes([features], latents, AksParams(candidates_per_clip=3))
    return frames, shape, steps, inversion, plan


def test_plan_bytes_are_the_bytes_written(written):
    frames, shape, steps, inversion, plan = written
    run = RunPlan(frames=frames, latent_shape=shape, steps=steps, clips=plan.clip_count, per_clip=plan.per_clip,
                  attention_tokens=sum(h * w for h, w in plan.levels))
    assert run.trajectory_bytes == inversion.trajectory.nbytes
    assert run.matches_bytes == sum(m.nbytes for m in plan.matches)
    assert run.disk_bytes == inversion.trajectory.nbytes + sum(m.nbytes for m in plan.matches)
    assert run.latent_bytes == torch.zeros(frames, *shape).nbytes  # the sampler's float32 batch


def test_disk_and_ram_checks_count_everything_with_their_headroom(written, tmp_path):
    frames, shape, steps, inversion, plan = written
    run = RunPlan(frames=frames, latent_shape=shape, steps=steps, clips=plan.clip_count, per_clip=plan.per_clip,
                  attention_tokens=sum(h * w for h, w in plan.levels))
    need = inversion.trajectory.nbytes + sum(m.nbytes for m in plan.matches)
    lots = 10 ** 12
    # room for the trajectory but not for the correspondences: refused
    with pytest.raises(LongEditError, match="on disk"):
        check_resources(run, str(tmp_path), ram=lots, disk=inversion.trajectory.nbytes + 1)
    # 5 % of the free disk stays free
    check_resources(run, str(tmp_path), ram=lots, disk=int(need / 0.95 * 1.001))
    with pytest.raises(LongEditError, match="on disk"):
        check_resources(run, str(tmp_path), ram=lots, disk=int(need / 0.95 * 0.999))
    # RAM: the sampler's copies of the float32 latent batch, 10 % headroom
    ram_need = SAMPLER_COPIES * torch.zeros(frames, *shape).nbytes
    check_resources(run, str(tmp_path), ram=int(ram_need / 0.9 * 1.001), disk=lots)
    with pytest.raises(LongEditError, match="of RAM"):
        check_resources(run, str(tmp_path), ram=int(ram_need / 0.9 * 0.999), disk=lots)


def test_describe_names_the_parts():
    gpu = GpuPlan(card_bytes=8 * GIB, reserved_bytes=GIB, weights_bytes=GIB, pass_bytes=GIB // 2)
    run = RunPlan(frames=1000, latent_shape=(4, 48, 84), steps=50, clips=None, chunk_frames=7, gpu=gpu)
    text = run.describe()
    assert "every frame a keyframe" in text and "chunks of 7" in text and "GPU ~1.50 GiB of a 8.0 GiB card" in text
    assert f"trajectory {51 * 1000 * 4 * 48 * 84 * 2 / GIB:.2f}" in text
    assert "chunks" not in RunPlan(frames=10, latent_shape=(4, 8, 8), steps=5).describe()


def test_free_disk_and_ram_are_read_from_the_system(tmp_path):
    folder = tmp_path / "new" / "dir"
    free = free_disk(str(folder))
    assert folder.is_dir() and free_disk(str(folder)) > 0
    st = os.statvfs(folder)
    assert abs(free - st.f_bavail * st.f_frsize) < 64 * 2**20

    def mem_available():
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024  # the kernel reports kB

    before = mem_available()
    got = available_ram()
    after = mem_available()
    # other processes move MemAvailable between the reads: bracket, with 4 MiB of slack
    assert min(before, after) - 4 * 2**20 <= got <= max(before, after) + 4 * 2**20


def test_plan_defaults_describe_the_default_run():
    """Without keyframes there are no correspondences; with them, the default candidate count is AKS's."""
    assert RunPlan(frames=100, latent_shape=(4, 8, 8), steps=10).matches_bytes == 0
    assert RunPlan(frames=100, latent_shape=(4, 8, 8), steps=10).per_clip == AksParams().candidates_per_clip


# ------------------------------------------------------------------------------------------ ISA policy

N, HEADS, D = 80, 2, 16


def qkv(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, n, HEADS * D, generator=g) for _ in range(3)]


def isa_expected(q, k, v, start, end, s: IsaSettings):
    split = lambda t: t.view(1, -1, HEADS, D).transpose(1, 2)  # noqa: E731
    out = isa_attention(split(q), split(k), split(v), start, end, block_size=s.block_size, alpha_s=s.alpha_s,
                        alpha_f=s.alpha_f, alpha_ns=s.alpha_ns, backend="torch")
    return out.transpose(1, 2).reshape(q.shape)


SETTINGS = dict(block_size=16, alpha_s=0.25, alpha_f=0.25, alpha_ns=0.25, backend="torch")


def test_first_exact_blocks_of_every_forward_stay_exact_and_cross_attention_passes_through():
    s = IsaSettings(exact_blocks=2, **SETTINGS)
    policy = IsaAttention(s)
    exact_calls = []

    def exact(q, k, v, heads, mask=None, **kw):
        exact_calls.append(k.shape[1])
        return torch.zeros_like(q)

    q, k, v = qkv()
    cross_k = torch.randn(1, 7, HEADS * D)
    for forward in range(2):
        policy.begin_forward(None)
        exact_calls.clear()
        outs = []
        for i in range(5):  # self-attention layers, a cross-attention call after each
            outs.append(policy(exact, q, k, v, HEADS))
            policy(exact, q, cross_k, cross_k, HEADS)
        assert exact_calls == [N, 7, N, 7, 7, 7, 7], forward
        assert all(o.abs().max() == 0 for o in outs[:2])
        for o in outs[2:]:
            assert torch.allclose(o, isa_expected(q, k, v, N // 2, N, s), atol=1e-6)
    assert policy.counts == {"isa": 6, "exact_self": 4, "cross": 10}
    masked = policy(exact, q, k, v, HEADS, mask=torch.ones(N, N, dtype=torch.bool))
    assert masked.abs().max() == 0 and policy.counts["cross"] == 11


def test_the_first_exact_steps_stay_exact():
    s = IsaSettings(exact_steps=2, **SETTINGS)
    policy = IsaAttention(s)
    schedule = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.0])
    q, k, v = qkv(seed=1)
    exact = lambda q, k, v, heads, **kw: torch.zeros_like(q)  # noqa: E731
    for step, sigma in enumerate(schedule[:-1]):
        policy.begin_forward(None)
        options = {"sample_sigmas": schedule, "sigmas": sigma[None]}
        out = policy(exact, q, k, v, HEADS, transformer_options=options)
        assert (out.abs().max() == 0) == (step < 2), step


def test_previous_override_is_kept_for_what_isa_does_not_take():
    seen = []

    def previous(func, *args, **kwargs):
        seen.append(args[0].shape[1])
        return func(*args, **kwargs) + 1

    policy = IsaAttention(IsaSettings(exact_blocks=1, **SETTINGS), previous=previous)
    policy.begin_forward(None)
    q, k, v = qkv(seed=2)
    exact = lambda q, k, v, heads, **kw: torch.zeros_like(q)  # noqa: E731
    assert policy(exact, q, k, v, HEADS).eq(1).all()
    assert seen == [N]
    policy(exact, q, k, v, HEADS)
    assert seen == [N]


@pytest.mark.parametrize("layout", ["none", "second half", "last N latent frames"])
def test_context_range_is_what_the_user_declared(layout):
    s = IsaSettings(context=layout, context_frames=3, **SETTINGS)
    n = 77
    expected = {"none": (77, 77), "second half": (38, 77), "last N latent frames": (77 - 3 * 9, 77)}[layout]
    assert context_range(n, s, 9) == expected
    policy = IsaAttention(s)
    policy.begin_forward(9)
    q, k, v = qkv(n, seed=3)
    out = policy(lambda *a, **kw: None, q, k, v, HEADS)
    assert torch.allclose(out, isa_expected(q, k, v, *expected, s), atol=1e-6)
    if layout != "none":  # the range matters: another one gives another output
        assert not torch.allclose(out, isa_expected(q, k, v, n, n, s), atol=1e-4)


def test_context_errors_and_settings_validation():
    s = IsaSettings(context="last N latent frames", context_frames=3)
    with pytest.raises(LongEditError, match="token grid"):
        context_range(100, s, None)
    with pytest.raises(LongEditError, match="longer than the sequence"):
        context_range(26, s, 9)
    assert context_range(27, s, 9) == (0, 27)
    for bad in (dict(context="thirds"), dict(backend="cuda"), dict(block_size=8), dict(block_size=48)):
        with pytest.raises(LongEditError):
            IsaSettings(**bad).validate()
    IsaSettings(block_size=16).validate()
    IsaSettings(block_size=64).validate()


def test_triton_backend_needs_triton(monkeypatch):
    import longedit.core.isa.policy as policy

    monkeypatch.setattr(policy, "HAVE_TRITON", False)
    with pytest.raises(LongEditError, match="Triton is not installed"):
        IsaSettings(backend="triton").validate()
    IsaSettings(backend="auto").validate()
    IsaSettings(backend="torch").validate()


def test_settings_defaults_are_the_papers():
    """b = 64, alpha_s = 1/8, alpha_f = 1/2, alpha_ns = 1/16 (DESIGN.md section 4, the kernels' defaults)."""
    s = IsaSettings()
    assert (s.block_size, s.alpha_s, s.alpha_f, s.alpha_ns) == (64, 0.15, 0.5, 0.0625)
    assert (s.exact_steps, s.exact_blocks, s.context, s.backend) == (0, 0, "second half", "auto")


def test_head_first_layouts_in_and_out():
    s = IsaSettings(**SETTINGS)
    policy = IsaAttention(s)
    policy.begin_forward(None)
    q, k, v = qkv(seed=4)
    split = lambda t: t.view(1, -1, HEADS, D).transpose(1, 2)  # noqa: E731
    expected = isa_expected(q, k, v, N // 2, N, s)
    out = policy(None, split(q), split(k), split(v), HEADS, skip_reshape=True)
    assert torch.allclose(out, expected, atol=1e-6)
    out = policy(None, split(q), split(k), split(v), HEADS, skip_reshape=True, skip_output_reshape=True)
    assert torch.allclose(out, split(expected), atol=1e-6)


# ---------------------------------------------------------------------------------- keyframe plan data

def normalised_tokens64(features: torch.Tensor, size) -> torch.Tensor:
    """AdaFlow's matching tokens: features resized (bilinear) to the attention grid, unit length per token."""
    f = F.interpolate(features.double(), size=size, mode="bilinear", align_corners=False)
    t = f.flatten(2).transpose(1, 2)
    return t / t.norm(dim=-1, keepdim=True)


def test_correspondences_and_aas_scores_follow_the_matching_rule(written):
    """matches[level][f, p, t]: the candidate-p token most similar (cosine) to frame f's token t, within f's
    clip; aas_scores[a, b, j]: the best cosine of candidate b's token j among candidate a's tokens."""
    frames, shape, steps, inversion, plan = written
    g = torch.Generator().manual_seed(0)
    torch.randn(frames, *shape, generator=g)  # replay the fixture's draws to recover its features
    scenes = torch.randn(2, 8, *shape[1:], generator=g)
    features = torch.stack([scenes[int(f >= 15)] + 0.05 * torch.randn(8, *shape[1:], generator=g)
                            for f in range(frames)])
    assert plan.clip_count >= 2 and plan.clip_starts[1] == 15
    for level, size in enumerate(plan.levels):
        tokens = normalised_tokens64(features, size)
        for f in range(frames):
            clip = plan.clip_of(np.array([f]))[0]
            for p, cand in enumerate(plan.candidates[clip]):
                cos = tokens[f] @ tokens[cand].T  # [T, T]
                chosen = cos.gather(1, torch.from_numpy(plan.matches[level][f, p]).long()[:, None])[:, 0]
                assert torch.all(chosen >= cos.max(dim=1).values - 1e-5), (level, f, p)
    aas_tokens = normalised_tokens64(features[plan.candidates.reshape(-1)], plan.levels[AAS_LEVEL])
    n = len(aas_tokens)
    expected = torch.stack([torch.stack([(aas_tokens[a] @ aas_tokens[b].T).max(dim=0).values for b in range(n)])
                            for a in range(n)])
    assert np.allclose(plan.aas_scores.astype(np.float64), expected.numpy(), atol=2e-3)  # float16 storage
    assert not np.allclose(plan.aas_scores.astype(np.float64), expected.transpose(0, 1).numpy(), atol=2e-3)


def test_a_swap_of_small_latents_is_caught_by_the_fingerprint(written):
    """The fingerprint tolerance is relative to the latents' own scale: latents a thousand times smaller,
    two frames swapped, are still refused (a tolerance with an absolute floor would let them through)."""
    frames, shape, steps, inversion, plan = written
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(frames, *shape, generator=g)  # the fixture's latents
    small = replace_latents_scale(plan, latents, 1e-3)
    small.check_latents(latents * 1e-3)
    with pytest.raises(LongEditError, match="first at frame 3"):
        small.check_latents((latents * 1e-3)[[0, 1, 2, 4, 3, *range(5, frames)]])


def replace_latents_scale(plan, latents, scale):
    from dataclasses import replace

    from longedit.core.adaflow.keyframes import latent_fingerprint

    return replace(plan, fingerprint=latent_fingerprint(latents * scale))


def test_stored_bytes_and_the_plan_description_count_what_is_held(written):
    frames, shape, steps, inversion, plan = written
    held = sum(m.nbytes for m in plan.matches) + plan.aas_scores.nbytes + plan.fingerprint.nbytes
    assert plan.stored_bytes() == held
    run = RunPlan(frames=frames, latent_shape=shape, steps=steps, clips=plan.clip_count, per_clip=plan.per_clip,
                  attention_tokens=sum(h * w for h, w in plan.levels))
    assert f"correspondences {sum(m.nbytes for m in plan.matches) / GIB:.2f})" in run.describe()


def test_no_frames_is_refused():
    with pytest.raises(LongEditError, match="no frames"):
        select_keyframes([], torch.zeros(0, 4, 8, 8))


def test_a_positional_mask_marks_the_call_as_not_isa():
    policy = IsaAttention(IsaSettings(**SETTINGS))
    policy.begin_forward(None)
    q, k, v = qkv(seed=5)
    exact = lambda q, k, v, heads, mask=None, **kw: torch.zeros_like(q)  # noqa: E731
    out = policy(exact, q, k, v, HEADS, torch.ones(N, N, dtype=torch.bool))
    assert out.abs().max() == 0 and policy.counts["cross"] == 1 and policy.counts["isa"] == 0


def test_inversion_disk_refusal_states_the_sizes(monkeypatch, tmp_path):
    import longedit.core.adaflow.inversion as inv

    monkeypatch.setattr(inv, "free_disk", lambda folder: 10 * 2**30)
    with pytest.raises(LongEditError, match=r"needs 20\.0 GiB in .* where 10\.0 GiB are free"):
        inv.check_disk(str(tmp_path), 20 * 2**30)


def test_aks_defaults_are_the_reference_configs():
    """AdaFlow's config: similarity_mean_threshold 0.75, similarity_region_threshold 0.6, max_batch_size 400."""
    p = AksParams()
    assert (p.tau_mean, p.tau_region, p.max_clip_length) == (0.75, 0.6, 400)
