"""AdaFlow's step driven end to end through KeyframeEditor, against a float64 transcription of the method.

A small UNet-like model (five self-attention layers on three token grids, encoder / middle / decoder, plus
one residual block whose output PnP replaces) runs every step of a 34-frame video in three clips (one of
19 frames) with three keyframe candidates per clip and a budget of two keyframes, so that AAS is active.
Its self-attention calls `adaflow_self_attention` and its residual block is a `FeatureInjection`, as the
UNet's are under ComfyUI. The expected output comes from the same model run in float64 with the method
written out here from its description (TokenFlow / AdaFlow), sharing nothing with core/ except the plan
and trajectory data:
- batch [source | uncond | cond] of the step's keyframes, one per clip; the source is the inverted latent
  at this step with the source conditioning;
- decoder self-attention takes the source's q and k during the first int(steps * pnp_attn_t) steps; the
  injected residual block hands the source's features to the edited branches during int(steps * pnp_f_t);
- every edited keyframe attends to the tokens of all keyframes of its branch, or, with more clips than the
  budget, to the budget * T tokens of highest DIFT score for it (scores at the second level; a finer token
  takes its parent's score, a coarser one the mean of its children);
- every other frame takes, at every layer and in every branch, the recorded keyframe output of its clip
  at the token its correspondences name for this step's candidate.
The clips, candidates, correspondences (different for every candidate slot and level) and AAS scores are
random, so that any index mix-up changes the numbers.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from longedit.core.adaflow.attention import PassLayout, aas_selection, adaflow_self_attention
from longedit.core.adaflow.edit import FeatureInjection, KeyframeEditor
from longedit.core.errors import LongEditError
from longedit.core.adaflow.inversion import Inversion
from longedit.core.adaflow.keyframes import AAS_LEVEL, AksParams, KeyframePlan, attention_levels

LATENT = (6, 10)
LEVELS = attention_levels(*LATENT, count=3)  # (6, 10), (3, 5), (2, 3): odd grids below the first
CLIP_STARTS = (0, 19, 26, 34)  # the first clip is longer than 16 frames
FRAMES = CLIP_STARTS[-1]
PER_CLIP = 3
BUDGET = 2  # three clips > two: AAS keeps two keyframes' worth of tokens
SIGMAS = np.array([6.0, 3.0, 1.5, 0.8, 0.4, 0.1, 0.0])
STEPS = len(SIGMAS) - 1
PNP_ATTN_T, PNP_F_T = 0.5, 0.34  # q/k injection in steps 0-2, residual injection in steps 0-1
CHANNELS, WIDTH, HEADS, CTX_TOKENS, CTX_DIM = 4, 16, 2, 3, 5
BRANCHES = 2  # uncond, cond (the sampler's batch); the source branch is added by the editor
# (name, level, PnP layer): encoder, middle, decoder; PnP acts on the decoder's self-attention only
LAYERS = (("enc0", 0, False), ("enc1", 1, False), ("mid", 2, False), ("dec1", 1, True), ("dec0", 0, True))


# ----------------------------------------------------------------------------------------------- fixtures

def random_plan(seed: int = 0) -> KeyframePlan:
    rng = np.random.default_rng(seed)
    clips = len(CLIP_STARTS) - 1
    candidates = np.stack([np.sort(rng.choice(np.arange(a, b), PER_CLIP, replace=False))
                           for a, b in zip(CLIP_STARTS[:-1], CLIP_STARTS[1:])])
    matches = [rng.integers(0, h * w, size=(FRAMES, PER_CLIP, h * w)).astype(np.int32) for h, w in LEVELS]
    tokens = LEVELS[AAS_LEVEL][0] * LEVELS[AAS_LEVEL][1]
    n = clips * PER_CLIP
    # distinct scores, exact in float16 (k / 2048), so that every top-k is unambiguous
    scores = np.stack([rng.permutation(2048)[:n * tokens] for _ in range(n)]).reshape(n, n, tokens) / 2048
    return KeyframePlan(frame_count=FRAMES, latent_size=LATENT, levels=LEVELS,
                        clip_starts=np.asarray(CLIP_STARTS), candidates=candidates, matches=matches,
                        aas_scores=scores.astype(np.float16), fingerprint=np.zeros((FRAMES, CHANNELS), np.float32),
                        params=AksParams(candidates_per_clip=PER_CLIP, seed=seed + 7))


def random_inversion(seed: int = 1) -> Inversion:
    rng = np.random.default_rng(seed)
    trajectory = rng.standard_normal((STEPS + 1, FRAMES, CHANNELS, *LATENT)).astype(np.float16)
    context = torch.from_numpy(rng.standard_normal((1, CTX_TOKENS, CTX_DIM)))
    return Inversion(sigmas=SIGMAS, trajectory=trajectory, source_context=context.float())


class TinyUNet:
    """Encoder / middle / decoder self-attention layers on three grids, skips, one injectable residual block.

    `forward` takes the attention and the residual block as functions, so that the same weights run once
    through the code under test (float32) and once through the float64 transcription."""

    def __init__(self, seed: int = 2):
        g = torch.Generator().manual_seed(seed)

        def rand(rows, cols, gain=1.0):
            return torch.randn(rows, cols, generator=g, dtype=torch.float64) * gain / math.sqrt(rows)

        self.w_in, self.w_ctx, self.w_sigma = rand(CHANNELS, WIDTH), rand(CTX_DIM, WIDTH), rand(1, WIDTH)
        # q and k with gain 2: peaked attention, so a wrong key set moves the output clearly
        self.layers = {name: (rand(WIDTH, WIDTH, 2), rand(WIDTH, WIDTH, 2), rand(WIDTH, WIDTH), rand(WIDTH, WIDTH))
                       for name, _, _ in LAYERS}
        self.w_out = rand(WIDTH, CHANNELS)
        self.res_w, self.res_b = rand(WIDTH, WIDTH), rand(1, WIDTH)[0]

    def residual_block(self) -> torch.nn.Sequential:
        linear = torch.nn.Linear(WIDTH, WIDTH)
        with torch.no_grad():
            linear.weight.copy_(self.res_w.T)
            linear.bias.copy_(self.res_b)
        return torch.nn.Sequential(linear, torch.nn.Tanh())

    def forward(self, x, sigma, context, attend, inject):
        dtype = x.dtype
        cast = lambda t: t.to(dtype)  # noqa: E731
        n = x.shape[0]
        h = (x.flatten(2).transpose(1, 2) @ cast(self.w_in) + (context.mean(1) @ cast(self.w_ctx))[:, None]
             + sigma.to(dtype)[:, None, None] * cast(self.w_sigma))

        def block(name, level, pnp, h):
            wq, wk, wv, wo = (cast(w) for w in self.layers[name])
            out = attend(name, level, pnp, (h @ wq).contiguous(), (h @ wk).contiguous(), (h @ wv).contiguous())
            return h + out @ wo

        def grid(h, level):
            return h.transpose(1, 2).reshape(n, WIDTH, *LEVELS[level])

        def down(h, level):  # level -> level + 1
            return F.avg_pool2d(grid(h, level), 2, ceil_mode=True).flatten(2).transpose(1, 2)

        def up(h, level):  # level -> level - 1, nearest
            fh, fw = LEVELS[level - 1]
            g = grid(h, level)[:, :, torch.arange(fh) // 2][:, :, :, torch.arange(fw) // 2]
            return g.flatten(2).transpose(1, 2)

        enc0 = block("enc0", 0, False, h)
        enc1 = block("enc1", 1, False, down(enc0, 0))
        mid = block("mid", 2, False, down(enc1, 1))
        h = block("dec1", 1, True, up(mid, 2) + enc1)
        h = inject(h)
        h = block("dec0", 0, True, up(h, 1) + enc0)
        return x + (h @ cast(self.w_out)).transpose(1, 2).reshape(x.shape)


def run_under_test(model: TinyUNet):
    """The `run` a host hands KeyframeEditor: attention through adaflow_self_attention, PnP's residual
    injection through FeatureInjection, both reading the pass's layout."""
    current = {"layout": None}
    injection = FeatureInjection(model.residual_block(), lambda: current["layout"])

    def run(x_in, sigma, context, layout):
        current["layout"] = layout

        def attend(name, level, pnp, q, k, v):
            return adaflow_self_attention(q, k, v, HEADS, layout, pnp, layer=name)

        try:
            return model.forward(x_in, sigma, context, attend, injection)
        finally:
            current["layout"] = None

    return run


def sampler_inputs(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BRANCHES * FRAMES, CHANNELS, *LATENT, generator=g)
    ctx = torch.randn(BRANCHES, CTX_TOKENS, CTX_DIM, generator=g)  # uncond, cond
    context = ctx.repeat_interleave(FRAMES, dim=0)
    return x, context


# ------------------------------------------------------------------------------ float64 transcription

def softmax_attention64(q, k, v):
    """q [M, H*d], k, v [S, H*d] -> [M, H*d]: softmax(q k^T / sqrt(d)) v per head, in float64."""
    d = q.shape[1] // HEADS
    out = torch.empty(q.shape, dtype=torch.float64)
    for h in range(HEADS):
        cols = slice(h * d, (h + 1) * d)
        logits = q[:, cols].double() @ k[:, cols].double().T / math.sqrt(d)
        weights = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
        out[:, cols] = (weights / weights.sum(dim=1, keepdim=True)) @ v[:, cols].double()
    return out


def keyframe_slots(plan: KeyframePlan, step: int) -> np.ndarray:
    """The design's rotation: clip c uses candidate (offset_c + step) mod P, offsets drawn from the seed."""
    offsets = np.random.default_rng(plan.params.seed).integers(0, PER_CLIP, size=len(CLIP_STARTS) - 1)
    return (offsets + step) % PER_CLIP


def level_scores(plan: KeyframePlan, ids: np.ndarray) -> dict[int, np.ndarray]:
    """AAS scores [K, K, h, w] at every level: measured at AAS_LEVEL, a finer token takes its parent's
    score, a coarser token the mean of its (up to 2 x 2) children."""
    k = len(ids)
    measured = plan.aas_scores[np.ix_(ids, ids)].astype(np.float64).reshape(k, k, *LEVELS[AAS_LEVEL])
    maps = {AAS_LEVEL: measured}
    for level in range(AAS_LEVEL - 1, -1, -1):
        h, w = LEVELS[level]
        parent = maps[level + 1]
        maps[level] = np.array([[parent[:, :, i // 2, j // 2] for j in range(w)] for i in range(h)]).transpose(2, 3, 0, 1)
    for level in range(AAS_LEVEL + 1, len(LEVELS)):
        h, w = LEVELS[level]
        child = maps[level - 1]
        maps[level] = np.array([[child[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(axis=(2, 3)) for j in range(w)]
                                for i in range(h)]).transpose(2, 3, 0, 1)
    return maps


def kept_tokens(maps: dict[int, np.ndarray], budget: int) -> dict[int, list[np.ndarray]]:
    """Per level, per query keyframe a: the budget * T tokens (of K * T, index b * T + t) of highest score."""
    kept = {}
    for level, m in maps.items():
        k, t = m.shape[0], m.shape[2] * m.shape[3]
        keep = budget * t
        kept[level] = []
        for a in range(k):
            flat = m[a].reshape(k * t)
            order = np.argsort(-flat, kind="stable")
            assert flat[order[keep - 1]] > flat[order[keep]], "ambiguous top-k: the fixture must avoid ties"
            kept[level].append(np.sort(order[:keep]))
    return kept


def reference_step(model: TinyUNet, plan: KeyframePlan, inversion: Inversion, x, context, step: int,
                   propagate: bool, budget: int = BUDGET, pnp_attn_t: float = PNP_ATTN_T,
                   pnp_f_t: float = PNP_F_T) -> torch.Tensor:
    """Float64 expected output of one editor call at `step` (all frames, both branches). As TokenFlow and
    AdaFlow run it: every pass is one batch [source | uncond | cond], the source branch whole."""
    clips = len(CLIP_STARTS) - 1
    slots = keyframe_slots(plan, step)
    keyframes = plan.candidates[np.arange(clips), slots]
    qk_on = step < int(STEPS * pnp_attn_t)
    features_on = step < int(STEPS * pnp_f_t)
    nb = BRANCHES + 1
    sigma = float(SIGMAS[step])
    kept = kept_tokens(level_scores(plan, np.arange(clips) * PER_CLIP + slots), budget) if clips > budget else None
    source_context = inversion.source_context.double()

    def batch(frames):
        source = torch.from_numpy(inversion.trajectory[step][frames].astype(np.float64))
        xs = [source] + [x[b * FRAMES + frames].double() for b in range(BRANCHES)]
        cs = [source_context.expand(len(frames), -1, -1)] + [context[b * FRAMES + frames].double() for b in range(BRANCHES)]
        return torch.cat(xs), torch.full((nb * len(frames),), sigma, dtype=torch.float64), torch.cat(cs)

    def inject(h):
        h = torch.tanh(h @ model.res_w + model.res_b)
        if features_on:
            g = h.view(nb, -1, *h.shape[1:]).clone()
            g[1:] = g[0]
            h = g.view_as(h)
        return h

    recorded = {}

    def keyframe_attention(name, level, pnp, q, k, v):
        t = q.shape[1]
        q, k, v = (a.view(nb, clips, t, WIDTH) for a in (q, k, v))
        out = torch.empty(nb, clips, t, WIDTH, dtype=torch.float64)
        for a in range(clips):
            out[0, a] = softmax_attention64(q[0, a], k[0, a], v[0, a])
        for b in range(1, nb):
            qb, kb = (q[0], k[0]) if (pnp and qk_on) else (q[b], k[b])
            keys, values = kb.reshape(clips * t, WIDTH), v[b].reshape(clips * t, WIDTH)
            for a in range(clips):
                sel = torch.from_numpy(kept[level][a]) if kept is not None else torch.arange(clips * t)
                out[b, a] = softmax_attention64(qb[a], keys[sel], values[sel])
        recorded[name] = out
        return out.view(nb * clips, t, WIDTH)

    expected = torch.empty(BRANCHES * FRAMES, CHANNELS, *LATENT, dtype=torch.float64)
    xk, sk, ck = batch(keyframes)
    den = model.forward(xk, sk, ck, keyframe_attention, inject)
    for b in range(BRANCHES):
        expected[b * FRAMES + keyframes] = den[(b + 1) * clips:(b + 2) * clips]

    others = np.setdiff1d(np.arange(FRAMES), keyframes)
    clip_of = np.searchsorted(np.asarray(CLIP_STARTS), others, side="right") - 1
    n = len(others)

    def other_attention(name, level, pnp, q, k, v):
        t = q.shape[1]
        if propagate:  # frame f, token j <- its clip's keyframe output at the matched token, every branch
            out = torch.empty(nb, n, t, WIDTH, dtype=torch.float64)
            for i, f in enumerate(others):
                c = clip_of[i]
                out[:, i] = recorded[name][:, c, torch.from_numpy(plan.matches[level][f, slots[c]].astype(np.int64))]
            return out.view(nb * n, t, WIDTH)
        q, k, v = (a.view(nb, n, t, WIDTH) for a in (q, k, v))
        out = torch.empty(nb, n, t, WIDTH, dtype=torch.float64)
        for b in range(nb):
            qb, kb = (q[0], k[0]) if (b > 0 and pnp and qk_on) else (q[b], k[b])
            for i in range(n):
                out[b, i] = softmax_attention64(qb[i], kb[i], v[b, i])
        return out.view(nb * n, t, WIDTH)

    xo, so, co = batch(others)
    den = model.forward(xo, so, co, other_attention, inject)
    for b in range(BRANCHES):
        expected[b * FRAMES + others] = den[(b + 1) * n:(b + 2) * n]
    return expected


# ------------------------------------------------------------------------------------------------ tests

# Float32 through five layers of width 16 (sums of <= 180 terms, softmax of O(10) logits) against float64:
# errors are a few float32 ulps (1.2e-7) times the depth and fan-in, ~1e-6 relative; 2e-5 leaves room.
TOLERANCE = 2e-5


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def setup():
    return TinyUNet(), random_plan(), random_inversion(), *sampler_inputs()


def test_fixture_exercises_what_the_semantics_depend_on(setup):
    """The fixture itself: several candidate slots in use, differing per clip and per step; AAS active."""
    _, plan, _, _, _ = setup
    slots = np.stack([keyframe_slots(plan, s) for s in range(STEPS)])
    assert len(set(slots[0].tolist())) > 1 and not np.array_equal(slots[0], slots[1])
    assert len(CLIP_STARTS) - 1 > BUDGET and CLIP_STARTS[1] - CLIP_STARTS[0] > 16
    assert 0 < int(STEPS * PNP_F_T) < int(STEPS * PNP_ATTN_T) < STEPS


@pytest.mark.parametrize("propagate", [True, False])
@pytest.mark.parametrize("step", range(STEPS))
def test_every_step_matches_the_float64_transcription(setup, step, propagate):
    model, plan, inversion, x, context = setup
    editor = KeyframeEditor(inversion, plan, PNP_ATTN_T, PNP_F_T, kv_budget=BUDGET, chunk_frames=5,
                            propagate=propagate)
    sigma = torch.full((BRANCHES * FRAMES,), float(SIGMAS[step]))
    got = editor(run_under_test(model), x, sigma, context, BRANCHES)
    expected = reference_step(model, plan, inversion, x, context, step, propagate)
    for b in range(BRANCHES):
        rows = slice(b * FRAMES, (b + 1) * FRAMES)
        assert rel_error(got[rows], expected[rows]) < TOLERANCE, f"branch {b}"


def test_a_budget_of_all_keyframes_is_full_extended_attention(setup):
    model, plan, inversion, x, context = setup
    clips = len(CLIP_STARTS) - 1
    editor = KeyframeEditor(inversion, plan, PNP_ATTN_T, PNP_F_T, kv_budget=clips, chunk_frames=7, propagate=True)
    step = 1
    got = editor(run_under_test(model), x, torch.full((BRANCHES * FRAMES,), float(SIGMAS[step])), context, BRANCHES)
    expected = reference_step(model, plan, inversion, x, context, step, propagate=True, budget=clips)
    assert rel_error(got, expected) < TOLERANCE


def test_the_checks_would_see_a_wrong_step(setup):
    """Sanity of the comparison: the transcription of a neighbouring step differs far beyond the tolerance,
    so the tolerance cannot hide an off-by-one step in PnP, the source latents or the candidate choice."""
    model, plan, inversion, x, context = setup
    a = reference_step(model, plan, inversion, x, context, 2, True)
    b = reference_step(model, plan, inversion, x, context, 3, True)
    assert rel_error(a.float(), b) > 100 * TOLERANCE


def test_aas_selection_keeps_the_top_tokens_at_every_level_on_odd_grids():
    """aas_selection against the rule on grids of odd sizes (5x7 -> 3x4 -> 2x2 -> 1x1). A finer level has
    ties (four children share a score), so the check is tie-aware: every kept token scores at least the
    threshold, every token above it is kept, and exactly budget * T are kept."""
    levels = attention_levels(5, 7, 4)
    k, budget = 5, 2
    rng = np.random.default_rng(11)
    for level_of_scores in (1, 2):
        h, w = levels[level_of_scores]
        scores = rng.random((k, k, h * w))
        sel = aas_selection(torch.from_numpy(scores).float(), levels, level_of_scores, budget)
        maps = {level_of_scores: scores.reshape(k, k, h, w)}
        for level in range(level_of_scores - 1, -1, -1):
            fh, fw = levels[level]
            maps[level] = maps[level + 1][:, :, np.arange(fh) // 2][:, :, :, np.arange(fw) // 2]
        for level in range(level_of_scores + 1, len(levels)):
            ch, cw = levels[level]
            child = maps[level - 1]
            maps[level] = np.array([[child[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(axis=(2, 3))
                                     for j in range(cw)] for i in range(ch)]).transpose(2, 3, 0, 1)
        for level, (lh, lw) in enumerate(levels):
            t = lh * lw
            got = sel[t].numpy()
            assert got.shape == (k, budget * t)
            for a in range(k):
                flat = maps[level][a].reshape(-1).astype(np.float32)
                threshold = np.sort(flat)[::-1][budget * t - 1]
                kept = set(got[a].tolist())
                assert len(kept) == budget * t and list(got[a]) == sorted(got[a])
                assert all(flat[i] >= threshold for i in kept), (level_of_scores, level, a)
                assert set(np.nonzero(flat > threshold)[0].tolist()) <= kept, (level_of_scores, level, a)


def test_the_step_choice_rotates_through_every_candidate():
    """Over P consecutive steps every candidate of every clip is the keyframe exactly once, and each step's
    keyframe is one of its clip's candidates."""
    plan = random_plan(4)
    for start in (0, 5):
        seen = np.stack([plan.keyframes(s) for s in range(start, start + PER_CLIP)])
        for c in range(len(CLIP_STARTS) - 1):
            assert sorted(seen[:, c].tolist()) == sorted(plan.candidates[c].tolist())
    assert np.array_equal(plan.keyframes(2), plan.candidates[np.arange(3), keyframe_slots(plan, 2)])


def test_source_batch_uses_this_steps_latents_and_each_layer_records_its_own_output(setup):
    """What the keyframe pass hands the model, seen from inside: the source rows are the trajectory at this
    step (not the next), and every layer's record is that layer's output."""
    model, plan, inversion, x, context = setup
    step = 2
    editor = KeyframeEditor(inversion, plan, PNP_ATTN_T, PNP_F_T, kv_budget=BUDGET, chunk_frames=50, propagate=True)
    calls = []
    inner = run_under_test(model)

    def spy(x_in, sigma, ctx, layout):
        out = inner(x_in, sigma, ctx, layout)
        calls.append((x_in.clone(), layout))
        return out

    editor(spy, x, torch.full((BRANCHES * FRAMES,), float(SIGMAS[step])), context, BRANCHES)
    # the keyframe pass runs one CFG branch at a time ([source | branch b]), then one chunk of the rest
    assert len(calls) == BRANCHES + 1
    keyframes = plan.candidates[np.arange(3), keyframe_slots(plan, step)]
    for x_key, _ in calls[:BRANCHES]:
        assert torch.equal(x_key[:3], torch.from_numpy(inversion.trajectory[step][keyframes]).float())
    record = calls[0][1].record.records.layers  # the joint record [source | branch 0 | branch 1], per clip
    assert set(record) == {name for name, _, _ in LAYERS}
    outs = [record[name] for name, _, _ in LAYERS]
    assert all(not torch.equal(a, b) for i, a in enumerate(outs) for b in outs[i + 1:] if a.shape == b.shape)


def test_a_float_chunk_size_from_a_host_estimate_is_accepted(setup):
    """ComfyUI's memory_required is a float, so a chunk size derived from it can be one (seen on the
    reference tier when device memory bounds the chunk): the editor runs the same chunks as with the int."""
    model, plan, inversion, x, context = setup
    sigma = torch.full((BRANCHES * FRAMES,), float(SIGMAS[1]))
    outs = []
    for chunk in (3, 3.7):
        editor = KeyframeEditor(inversion, plan, PNP_ATTN_T, PNP_F_T, kv_budget=BUDGET, propagate=True)
        editor.chunk_frames = chunk
        calls = []
        inner = run_under_test(model)
        outs.append(editor(lambda *a: calls.append(a[0].shape[0]) or inner(*a), x, sigma, context, BRANCHES))
        chunks = calls[BRANCHES:]  # after the per-branch keyframe passes: per chunk, source apart, then branches
        assert chunks[:-2] == [3, 3 * BRANCHES] * (len(chunks) // 2 - 1)
    assert torch.equal(outs[0], outs[1])


# (pnp_attn_t, pnp_f_t): AdaFlow's defaults (equal), and residual injection outlasting q/k injection (the fixture's
# own has it the other way round), so that each source use below occurs with and without propagation
FRACTIONS = [(0.5, 0.5), (0.17, 0.5)]


@pytest.mark.parametrize("propagate", [True, False])
@pytest.mark.parametrize("fractions", FRACTIONS)
def test_the_source_branch_runs_only_as_far_as_its_injections_reach(setup, fractions, propagate):
    """A chunk's source branch feeds the edited branches only through PnP: its own prediction is never used.
    So it runs whole only while a chunk's attention takes its q/k (no propagation), runs alone up to the
    residual-injection layer while that is on, and not at all after; every step still equals the float64
    transcription of the whole [source | uncond | cond] batch."""
    model, plan, inversion, x, context = setup
    attn_t, f_t = fractions
    for step in range(STEPS):
        editor = KeyframeEditor(inversion, plan, attn_t, f_t, kv_budget=BUDGET, chunk_frames=40, propagate=propagate)
        sigma = torch.full((BRANCHES * FRAMES,), float(SIGMAS[step]))
        inner, layers = run_under_test(model), []

        def spy(x_in, sigma_in, ctx, layout):
            def attend(name, level, pnp, q, k, v):
                layers[-1][1].append(name)
                return adaflow_self_attention(q, k, v, HEADS, layout, pnp, layer=name)
            layers.append((x_in.shape[0], []))
            return spy_model(x_in, sigma_in, ctx, layout, attend)

        current = {"layout": None}
        injection = FeatureInjection(model.residual_block(), lambda: current["layout"])

        def spy_model(x_in, sigma_in, ctx, layout, attend):
            current["layout"] = layout
            try:
                return model.forward(x_in, sigma_in, ctx, attend, injection)
            finally:
                current["layout"] = None

        got = editor(spy, x, sigma, context, BRANCHES)
        expected = reference_step(model, plan, inversion, x, context, step, propagate, pnp_attn_t=attn_t, pnp_f_t=f_t)
        assert rel_error(got, expected) < TOLERANCE, f"step {step}"
        n = FRAMES - (len(CLIP_STARTS) - 1)  # the one chunk of non-keyframes
        qk_on, features_on = step < int(STEPS * attn_t), step < int(STEPS * f_t)
        everything = [name for name, _, _ in LAYERS]
        up_to_injection = everything[:4]  # enc0, enc1, mid, dec1: the residual injection follows dec1
        if qk_on and not propagate:
            assert layers[BRANCHES:] == [(n * (BRANCHES + 1), everything)]
        elif features_on:
            assert layers[BRANCHES:] == [(n, up_to_injection), (n * BRANCHES, everything)]
        else:
            assert layers[BRANCHES:] == [(n * BRANCHES, everything)]


def test_without_a_source_branch_every_branch_attends_across_its_keyframes():
    """The layout without a source (no PnP possible): each branch's keyframes attend to all of that branch's
    keyframe tokens, against the float64 transcription."""
    frames, tokens, heads_width, branches = 3, 5, HEADS * 8, 2
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(branches * frames, tokens, heads_width, generator=g) for _ in range(3))
    layout = PassLayout(frames=frames, branches=branches, has_source=False, inject_qk=True, inject_conv=False)
    out = adaflow_self_attention(q, k, v, HEADS, layout, pnp_layer=True).view(branches, frames, tokens, -1)
    for b in range(branches):
        rows = slice(b * frames, (b + 1) * frames)
        keys, values = k[rows].reshape(-1, heads_width), v[rows].reshape(-1, heads_width)
        for f in range(frames):
            expected = softmax_attention64(q[b * frames + f], keys, values)
            assert rel_error(out[b, f], expected) < TOLERANCE
    with pytest.raises(ValueError, match="batch 5 is not 2 branches x 3 frames"):
        adaflow_self_attention(q[:5], k[:5], v[:5], HEADS, layout, pnp_layer=True)


def test_an_editor_reused_for_a_second_run_ranks_for_each_step_again(setup):
    """ComfyUI keeps the editor on the patched MODEL: a second sampling run comes back to the early steps,
    and AAS must rank for those steps' keyframes, not reuse the last step's selection."""
    model, plan, inversion, x, context = setup
    editor = KeyframeEditor(inversion, plan, PNP_ATTN_T, PNP_F_T, kv_budget=BUDGET, chunk_frames=9, propagate=True)
    for step in (3, 1):
        sigma = torch.full((BRANCHES * FRAMES,), float(SIGMAS[step]))
        got = editor(run_under_test(model), x, sigma, context, BRANCHES)
    expected = reference_step(model, plan, inversion, x, context, 1, True)
    assert rel_error(got, expected) < TOLERANCE


def test_bad_sampler_inputs_are_refused_with_the_sizes(setup):
    model, plan, inversion, x, context = setup
    editor = KeyframeEditor(inversion, plan, PNP_ATTN_T, PNP_F_T, kv_budget=BUDGET, propagate=True)
    sigma = torch.full((BRANCHES * FRAMES,), float(SIGMAS[1]))
    with pytest.raises(LongEditError, match=f"gave {FRAMES - 1} frames per branch, but the inversion has {FRAMES}"):
        editor(run_under_test(model), x[:-2], sigma[:-2], context[:-2], BRANCHES)
    narrow = context[:, :, :CTX_DIM - 1]
    with pytest.raises(LongEditError, match=rf"source conditioning \({CTX_TOKENS}, {CTX_DIM}\) and the sampler's "
                                            rf"conditioning \({CTX_TOKENS}, {CTX_DIM - 1}\) differ"):
        editor(run_under_test(model), x, sigma, narrow, BRANCHES)
    wide = torch.cat([context, context[:, :, :1]], dim=2)
    with pytest.raises(LongEditError, match=rf"conditioning \({CTX_TOKENS}, {CTX_DIM + 1}\) differ"):
        editor(run_under_test(model), x, sigma, wide, BRANCHES)
