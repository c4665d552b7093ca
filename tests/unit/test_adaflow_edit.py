"""AdaFlow keyframe editing core: DDIM inversion round trip, PnP injection, extended attention and AAS."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from longedit.core.adaflow.attention import PassLayout, aas_selection, adaflow_self_attention, extended_attention
from longedit.core.adaflow.edit import FeatureInjection, KeyframeEditor
from longedit.core.errors import LongEditError
from longedit.core.adaflow.inversion import ddim_invert, ddim_sample, inversion_grid
from longedit.kernels.aas_reference import extended_attention_reference


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def sd_like_sigmas(steps: int) -> np.ndarray:
    """Descending sigmas from 14.6 to 0.03 (SD's range), geometric, then 0."""
    return np.append(np.geomspace(14.6, 0.03, steps), 0.0)


def gaussian_toy(mean: torch.Tensor, std: float):
    """eps of the exact denoiser for data ~ N(mean, std^2): a deterministic model with a known ODE."""
    return lambda x, sigma: sigma * (x - mean) / (std ** 2 + sigma ** 2)


def sd_alphas_cumprod() -> np.ndarray:
    """SD's training schedule in float64: scaled_linear betas 0.00085 .. 0.012 over 1000 steps."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    return np.cumprod(1 - betas)


def ddim_timesteps(steps: int) -> np.ndarray:
    """DDIMScheduler.set_timesteps with steps_offset=1 ("leading"): descending, e.g. 981, 961, ..., 1."""
    return (np.arange(steps) * (1000 // steps))[::-1] + 1


def sampler_sigmas(steps: int) -> np.ndarray:
    """The sampler's schedule for those timesteps in sigma space, ending at 0 (what ddim_uniform gives)."""
    a = sd_alphas_cumprod()[ddim_timesteps(steps)]
    return np.append(np.sqrt((1 - a) / a), 0.0)


def sd_grid(inversion_steps: int, steps: int) -> np.ndarray:
    a0 = sd_alphas_cumprod()[0]
    return inversion_grid(sampler_sigmas(steps), sampler_sigmas(inversion_steps), float(np.sqrt((1 - a0) / a0)))


def reference_invert(x0: np.ndarray, eps_vp, inversion_steps: int) -> dict[int, np.ndarray]:
    """float64 transcription of the authors' DDIM inversion (TokenFlow/AdaFlow preprocess.py), in VP scale:
    from alpha_bar_0 (final_alpha_cumprod with set_alpha_to_one False) up the DDIM timesteps, eps evaluated
    at the next timestep on the previous latent. Returns {timestep: VP latent}."""
    ac = sd_alphas_cumprod()
    x, a_prev, out = x0.copy(), ac[0], {}
    for t in ddim_timesteps(inversion_steps)[::-1]:
        e = eps_vp(x, t)
        x0_hat = (x - np.sqrt(1 - a_prev) * e) / np.sqrt(a_prev)
        x = np.sqrt(ac[t]) * x0_hat + np.sqrt(1 - ac[t]) * e
        out[int(t)], a_prev = x, ac[t]
    return out


def reference_sample(x: np.ndarray, eps_vp, steps: int) -> np.ndarray:
    """float64 transcription of the reference's deterministic DDIM sampling, down to alpha_bar_0."""
    ac = sd_alphas_cumprod()
    ts = ddim_timesteps(steps)
    for i, t in enumerate(ts):
        a_next = ac[ts[i + 1]] if i + 1 < len(ts) else ac[0]
        e = eps_vp(x, t)
        x = np.sqrt(a_next) * (x - np.sqrt(1 - ac[t]) * e) / np.sqrt(ac[t]) + np.sqrt(1 - a_next) * e
    return x


def vp_toy(weight: np.ndarray, bias: np.ndarray):
    """A nonlinear eps network of (VP latent, timestep), and the same network wrapped the way ComfyUI wraps a
    UNet: sampler-space x at sigma -> network(x / sqrt(1 + sigma^2), t(sigma))."""
    ac = sd_alphas_cumprod()
    sig = np.sqrt((1 - ac) / ac)

    def eps_vp(x, t):
        return np.tanh(np.einsum("oc,nchw->nohw", weight, x) + bias * (t / 1000.0))

    def eps_sampler(x: torch.Tensor, sigma: float) -> torch.Tensor:
        t = int(np.argmin(np.abs(sig - sigma)))  # ComfyUI's discrete sigma -> timestep
        return torch.from_numpy(eps_vp(x.double().numpy() / np.sqrt(1 + sigma ** 2), t)).float()

    return eps_vp, eps_sampler


def test_inversion_reproduces_the_reference_scheme_at_every_kept_step():
    """The trajectory equals a float64 transcription of the authors' inversion (100 steps, latents kept at the
    50 sampling timesteps), on a nonlinear eps network wrapped as ComfyUI wraps a UNet; several frames in
    uneven chunks. Bound: the trajectory is stored in float16 (2^-11 relative rounding) and computed in
    float32 (~1e-7 per op over 100 steps): 1e-3 relative per kept step. The scheme this replaced (eps at
    sigma_next on the latent as is, clean latent at sigma 0) misses by ~10% at the top."""
    g = np.random.default_rng(0)
    weight, bias = g.standard_normal((4, 4)) * 0.8, g.standard_normal((1, 4, 1, 1))
    eps_vp, eps_sampler = vp_toy(weight, bias)
    x0 = g.standard_normal((5, 4, 6, 10))
    ours = ddim_invert(torch.from_numpy(x0).float(), sampler_sigmas(50), eps_sampler, frames_per_chunk=2,
                       grid=sd_grid(100, 50))
    reference = reference_invert(x0, eps_vp, 100)
    ac = sd_alphas_cumprod()
    worst = 0.0
    for step, t in enumerate(ddim_timesteps(50)):
        expected = torch.from_numpy(reference[int(t)] / np.sqrt(ac[t]))  # VP -> sampler space
        err = rel(ours.latents_at(step), expected)
        worst = max(worst, err)
        assert err <= 1e-3, (step, int(t), err)
    print(f"inversion vs float64 reference scheme: worst kept step {worst:.2e} relative")
    assert torch.equal(ours.latents_at(50), torch.from_numpy(x0).half().float())
    # the start latent: add_noise(x0, eps_top, 981), eps_top the noise that takes x0 to t=991
    eps_top = (reference[991] - np.sqrt(ac[991]) * x0) / np.sqrt(1 - ac[991])
    start = (np.sqrt(ac[981]) * x0 + np.sqrt(1 - ac[981]) * eps_top) / np.sqrt(ac[981])
    assert rel(ours.start_latents(), torch.from_numpy(start)) <= 1e-3


def test_inversion_then_ddim_sampling_returns_the_source():
    """Invert (50 and 100 steps) then sample 50 DDIM steps with the sampler's Euler-in-sigma step, on the
    exact denoiser of data ~ N(mean, 1) over SD's schedule. Bound: the reference scheme's own round trip on
    the same toy (float64 transcription of the authors' inversion and sampling, printed), plus the float16
    rounding of the stored start latent (2^-11), plus the last step's difference (ours ends at sigma 0, the
    reference at alpha_bar_0: sigma_0 * eps ~ sigma_0^2 * |x - mean|). DDIM is first order both ways, so even
    the reference misses by ~3% (50 inversion steps) and ~1.8% (100); the scale it returns, <out, x0> /
    <x0, x0>, is within 1% of 1 at AdaFlow's 100 steps (the scheme this replaced: 16.6% off, scale 0.88)."""
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(4, 6, 10, generator=g)  # shared by all frames, so chunks see the same model
    x0 = mean + torch.randn(4, 4, 6, 10, generator=g)
    eps = gaussian_toy(mean, 1.0)
    ac = sd_alphas_cumprod()
    sigma0_sq = (1 - ac[0]) / ac[0]

    def eps_vp(x, t):  # the same model in the reference's VP terms
        sigma = np.sqrt((1 - ac[t]) / ac[t])
        return eps(torch.from_numpy(x / np.sqrt(ac[t])), sigma).numpy()

    for inversion_steps in (50, 100):
        inversion = ddim_invert(x0, sampler_sigmas(50), eps, frames_per_chunk=3, grid=sd_grid(inversion_steps, 50))
        assert torch.equal(inversion.latents_at(50), x0.half().float())
        out = ddim_sample(inversion.start_latents(), sampler_sigmas(50), eps)
        ours, scale = rel(out, x0), ((out * x0).sum() / (x0 * x0).sum()).item()
        inverted = reference_invert(x0.double().numpy(), eps_vp, inversion_steps)
        top = max(inverted)
        eps_top = (inverted[top] - np.sqrt(ac[top]) * x0.double().numpy()) / np.sqrt(1 - ac[top])
        noisy = np.sqrt(ac[981]) * x0.double().numpy() + np.sqrt(1 - ac[981]) * eps_top
        reference = rel(torch.from_numpy(reference_sample(noisy, eps_vp, 50)), x0)
        print(f"round trip, {inversion_steps} inversion steps: ours {ours:.4%} (scale {scale:.4f}), "
              f"reference scheme {reference:.4%}")
        assert ours <= reference + 2 ** -11 + sigma0_sq
        if inversion_steps == 100:
            assert abs(scale - 1) <= 0.01


def test_the_clean_latent_sits_at_the_first_grid_sigma():
    """One step from a clean latent at sigma_c = 0.5 (alpha_bar 0.8) to sigma 1 (alpha_bar 0.5), written out
    in the reference's VP terms in float64: the UNet must see x0 itself (the VP latent) at t(sigma=1), and
    the result is sqrt(0.5) x0_hat + sqrt(0.5) eps. A large sigma_c so that treating the clean latent as
    sigma 0 shows (at SD's 0.029 it moves the trajectory by only 4e-4, under float16 storage)."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(3, 4, 5, 7, generator=g, dtype=torch.float64)
    w = torch.randn(4, 4, generator=g, dtype=torch.float64)
    seen = []

    def eps(x, sigma):  # a nonlinear network of the VP latent the UNet sees (x * c_in)
        vp = x.double() / np.sqrt(1 + sigma ** 2)
        seen.append(vp)
        return torch.tanh(torch.einsum("oc,nchw->nohw", w, vp) * (1 + sigma))

    ours = ddim_invert(x0.float(), np.array([1.0, 0.0]), eps, frames_per_chunk=3, grid=np.array([0.5, 1.0]))
    assert rel(seen[0], x0) < 1e-6
    e = torch.tanh(torch.einsum("oc,nchw->nohw", w, x0) * 2.0)
    x0_hat = (x0 - np.sqrt(0.2) * e) / np.sqrt(0.8)
    expected_vp = np.sqrt(0.5) * x0_hat + np.sqrt(0.5) * e
    assert rel(ours.latents_at(0), expected_vp / np.sqrt(0.5)) <= 1e-3


def test_inversion_grid_holds_every_sampler_sigma_once():
    grid = sd_grid(100, 50)
    assert len(grid) == 101 and grid[0] == pytest.approx(0.02916, rel=1e-3) and np.all(np.diff(grid) > 0)
    assert set(np.round(sampler_sigmas(50)[:-1], 9)) <= set(np.round(grid, 9))
    odd = sd_grid(7, 5)  # 1000 // 7 and 1000 // 5 timesteps interleave: the union, no duplicates
    assert len(odd) == 1 + len(set(ddim_timesteps(7)) | set(ddim_timesteps(5)))


def test_inversion_is_chunk_independent_and_on_disk(tmp_path, monkeypatch):
    import longedit.core.adaflow.inversion as inv

    monkeypatch.setattr(inv, "ON_DISK_BYTES", 0)
    x0 = torch.randn(5, 4, 6, 10)
    sigmas = sampler_sigmas(8)
    eps = gaussian_toy(torch.zeros(4, 6, 10), 1.0)
    a = ddim_invert(x0, sigmas, eps, frames_per_chunk=2, folder=str(tmp_path / "a"), grid=sd_grid(16, 8))
    b = ddim_invert(x0, sigmas, eps, frames_per_chunk=5, grid=sd_grid(16, 8))
    assert a.path and a.path.endswith(".npy") and isinstance(a.trajectory, np.memmap)
    assert isinstance(a.start, np.memmap)
    assert np.array_equal(np.asarray(a.trajectory), b.trajectory)
    assert np.array_equal(np.asarray(a.start), b.start)


def test_a_schedule_the_inversion_never_visited_is_an_error():
    inversion = ddim_invert(torch.randn(2, 4, 6, 10), sd_like_sigmas(10), gaussian_toy(0.0, 1.0), 2)
    assert inversion.step_of(float(inversion.sigmas[3])) == 3
    with pytest.raises(LongEditError, match="not in the inversion's schedule"):
        inversion.step_of(float(sd_like_sigmas(11)[3]))
    with pytest.raises(LongEditError, match="not on the inversion grid"):
        ddim_invert(torch.randn(2, 4, 6, 10), sampler_sigmas(10), gaussian_toy(0.0, 1.0), 2,
                    grid=sampler_sigmas(7)[::-1])


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
