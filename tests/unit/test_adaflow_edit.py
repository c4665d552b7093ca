"""AdaFlow keyframe editing core: DDIM inversion round trip, PnP injection, extended attention and AAS."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from longedit.core.adaflow_attention import PassLayout, aas_selection, adaflow_self_attention, extended_attention
from longedit.core.adaflow_edit import FeatureInjection, KeyframeEditor
from longedit.core.errors import LongEditError
from longedit.core.inversion import ddim_invert, ddim_sample
from longedit.kernels.aas_reference import extended_attention_reference


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def sd_like_sigmas(steps: int) -> np.ndarray:
    """Descending sigmas from 14.6 to 0.03 (SD's range), geometric, then 0."""
    return np.append(np.geomspace(14.6, 0.03, steps), 0.0)


def gaussian_toy(mean: torch.Tensor, std: float):
    """eps of the exact denoiser for data ~ N(mean, std^2): a deterministic model with a known ODE."""
    return lambda x, sigma: sigma * (x - mean) / (std ** 2 + sigma ** 2)


def test_inversion_then_ddim_sampling_returns_the_source():
    """Round trip on a toy model whose ODE is known: data ~ N(mean, 1), eps = sigma (x - mean) / (1 + sigma^2).

    DDIM inversion is first order: going up it evaluates eps at (x_i, sigma_{i+1}), coming down at
    (x_{i+1}, sigma_{i+1}); each step's mismatch is O(dsigma * d eps/dx), so the round trip error falls like
    1/steps. Over SD's sigma range (14.6 .. 0.03, geometric) this toy lands at 16.6% (relative L2) after 50
    steps and 4.8% after 200, the bounds below with a margin; the test also checks that 4x the steps
    divides the error by more than 3, i.e. the inversion converges at first order to the exact source.
    """
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(4, 6, 10, generator=g)  # shared by all frames, so chunks see the same model
    x0 = mean + torch.randn(4, 4, 6, 10, generator=g)
    eps = gaussian_toy(mean, 1.0)
    errors = {}
    for steps in (50, 200):
        sigmas = sd_like_sigmas(steps)
        inversion = ddim_invert(x0, sigmas, eps, frames_per_chunk=3)
        assert torch.equal(inversion.latents_at(steps), x0.half().float())
        errors[steps] = rel(ddim_sample(inversion.latents_at(0), sigmas, eps), x0)
    assert errors[50] < 0.2 and errors[200] < 0.06
    assert errors[200] < errors[50] / 3


def test_inversion_is_chunk_independent_and_on_disk(tmp_path, monkeypatch):
    import longedit.core.inversion as inv

    monkeypatch.setattr(inv, "ON_DISK_BYTES", 0)
    x0 = torch.randn(5, 4, 6, 10)
    sigmas = sd_like_sigmas(8)
    eps = gaussian_toy(torch.zeros(4, 6, 10), 1.0)
    a = ddim_invert(x0, sigmas, eps, frames_per_chunk=2, folder=str(tmp_path / "a"))
    b = ddim_invert(x0, sigmas, eps, frames_per_chunk=5)
    assert a.path and a.path.endswith(".npy") and isinstance(a.trajectory, np.memmap)
    assert np.array_equal(np.asarray(a.trajectory), b.trajectory)


def test_a_schedule_the_inversion_never_visited_is_an_error():
    inversion = ddim_invert(torch.randn(2, 4, 6, 10), sd_like_sigmas(10), gaussian_toy(0.0, 1.0), 2)
    assert inversion.step_of(float(inversion.sigmas[3])) == 3
    with pytest.raises(LongEditError, match="not in the inversion's schedule"):
        inversion.step_of(float(sd_like_sigmas(11)[3]))


def qkv(branches, frames, tokens, heads, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (branches * frames, tokens, heads * d)
    return [torch.randn(shape, generator=g) for _ in range(3)]


def test_pnp_injection_gives_edited_branches_the_source_q_and_k():
    frames, tokens, heads, d = 3, 10, 2, 8
    q, k, v = qkv(3, frames, tokens, heads, d)
    layout = PassLayout(frames=frames, branches=3, has_source=True, inject_qk=True, inject_conv=False)
    out = adaflow_self_attention(q, k, v, heads, layout, pnp_layer=True).view(3, frames, tokens, -1)
    qs, ks = q.view(3, frames, tokens, -1), k.view(3, frames, tokens, -1)
    vs = v.view(3, frames, tokens, -1)
    for b in (1, 2):  # source q/k, the branch's own v, extended over the keyframes
        assert torch.allclose(out[b], extended_attention(qs[0], ks[0].reshape(-1, heads * d),
                                                         vs[b].reshape(-1, heads * d), heads), atol=1e-5)
    off = adaflow_self_attention(q, k, v, heads, layout, pnp_layer=False).view(3, frames, tokens, -1)
    assert not torch.allclose(off[1], out[1])


def test_source_branch_attends_per_frame_and_edits_across_keyframes():
    frames, tokens, heads, d = 4, 6, 2, 8
    q, k, v = qkv(2, frames, tokens, heads, d, seed=1)
    layout = PassLayout(frames=frames, branches=2, has_source=True, inject_qk=False, inject_conv=False)
    calls = []

    def per_frame(q_, k_, v_, h_):
        calls.append(q_.shape)
        return torch.zeros_like(q_)

    out = adaflow_self_attention(q, k, v, heads, layout, pnp_layer=True, per_frame=per_frame).view(2, frames, tokens, -1)
    assert calls == [(frames, tokens, heads * d)] and out[0].abs().max() == 0
    exact = extended_attention_reference(q[frames:].double(), k[frames:].reshape(-1, heads * d).double(),
                                         v[frames:].reshape(-1, heads * d).double(), heads)
    assert rel(out[1], exact) < 1e-3


def test_aas_with_a_budget_of_all_keyframes_is_exact_extended_attention():
    frames, heads, d = 5, 2, 8
    levels = [(4, 6), (2, 3), (1, 2), (1, 1)]
    scores = torch.rand(frames, frames, 2 * 3)
    selection = aas_selection(scores, levels, 1, budget_frames=frames)
    for (h, w) in levels:
        tokens = h * w
        q, k, v = qkv(2, frames, tokens, heads, d, seed=tokens)
        layout = PassLayout(frames=frames, branches=2, has_source=True, inject_qk=False, inject_conv=False,
                            selection=selection)
        out = adaflow_self_attention(q, k, v, heads, layout, pnp_layer=False).view(2, frames, tokens, -1)
        exact = extended_attention_reference(q[frames:].double(), k[frames:].reshape(-1, heads * d).double(),
                                             v[frames:].reshape(-1, heads * d).double(), heads)
        assert rel(out[1], exact) <= 1e-3


def test_aas_keeps_the_best_ranked_tokens_at_every_level():
    levels = [(4, 6), (2, 3), (1, 2), (1, 1)]
    frames = 4
    scores = torch.rand(frames, frames, 6)
    scores[:, 2] += 10  # keyframe 2's tokens are everyone's best matches
    selection = aas_selection(scores, levels, 1, budget_frames=1)
    for (h, w) in levels:
        tokens = h * w
        sel = selection[tokens]
        assert sel.shape == (frames, tokens)
        assert torch.equal(sel, torch.arange(2 * tokens, 3 * tokens, dtype=torch.int32).expand(frames, -1))


def test_feature_injection_copies_the_source_features_only_when_on():
    conv = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Conv2d(3, 3, 1))
    layout = PassLayout(frames=2, branches=3, has_source=True, inject_qk=False, inject_conv=True)
    current = {"layout": layout}
    inject = FeatureInjection(conv, lambda: current["layout"])
    assert [n for n, _ in inject.named_parameters()] == [n for n, _ in conv.named_parameters()]
    h = torch.randn(6, 3, 4, 4)
    out = inject(h).view(3, 2, 3, 4, 4)
    assert torch.allclose(out[1], out[0]) and torch.allclose(out[2], out[0])
    current["layout"] = None
    assert torch.allclose(inject(h), conv(h))


def test_editor_lays_out_source_and_branches_and_restores_frame_order():
    frames, branches = 6, 2
    inversion = ddim_invert(torch.randn(frames, 4, 3, 5), sd_like_sigmas(4), gaussian_toy(0.0, 1.0), 6)
    editor = KeyframeEditor(inversion, None, 1.0, 1.0, kv_budget=20)
    seen = []

    def run(x_in, sigma, context, layout):
        seen.append((x_in.shape[0], layout.frames, layout.branches, layout.inject_qk))
        return x_in * 2  # a "denoiser" that keeps track of which rows went where

    x = torch.randn(branches * frames, 4, 3, 5)
    sigma = torch.full((branches * frames,), float(inversion.sigmas[1]))
    context = torch.zeros(branches * frames, 1, 1)
    out = editor(run, x, sigma, context, branches)
    assert torch.allclose(out, 2 * x)
    assert seen == [(3 * frames, frames, 3, True)]
    with pytest.raises(LongEditError, match="frames per branch"):
        editor(run, x[:-2], sigma[:-2], context[:-2], branches)
