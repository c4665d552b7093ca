"""One AdaFlow model call: the keyframe pass (source + edited branches, extended attention, PnP, AAS).

The sampler calls the model with all frames of one or more branches (cond / uncond). `KeyframeEditor`
turns that call into a keyframe pass: the step's keyframes of every branch go through the model together
with the source branch (the inverted latents at this sigma, source conditioning), laid out as
[source | branch 1 | branch 2 ...]; the outputs land in one preallocated batch in frame order. Frames
that are not keyframes (only with a keyframe plan) then run in chunks: with propagation on, every
self-attention layer hands them the output its keyframe pass recorded (kept off the GPU, see
adaflow_records), gathered through the precomputed token correspondences (AdaFlow's propagation, all
branches); without it, they attend within each frame. A host that keeps the sampler's state itself may make
the keyframe pass and the chunks separate calls (see adaflow_sampling).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from .attention import PassLayout, Propagation, aas_selection, as_index, pnp_active_steps
from .records import KeyframeRecords, record_rows
from ..errors import LongEditError
from .inversion import Inversion
from .keyframes import AAS_LEVEL, KeyframePlan
from .slimming import KeyframeSlimming

RunModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, PassLayout], torch.Tensor]


class KeyframeEditor:
    def __init__(self, inversion: Inversion, plan: KeyframePlan | None, pnp_attn_t: float, pnp_f_t: float,
                 kv_budget: int, chunk_frames: int = 16, propagate: bool = False,
                 slimming: KeyframeSlimming | None = None):
        if propagate and plan is None:
            raise LongEditError("Latent propagation needs a keyframe plan.",
                                "connect AdaFlow Keyframe Selection to AdaFlow Latent Propagation.")
        if plan is not None and plan.frame_count != inversion.frame_count:
            raise LongEditError(
                f"The keyframe plan covers {plan.frame_count} frames but the inversion {inversion.frame_count}.",
                "build Keyframe Selection and AdaFlow Invert from the same video latents.")
        self.inversion = inversion
        self.plan = plan
        self.attn_steps = pnp_active_steps(inversion.steps, pnp_attn_t)
        self.conv_steps = pnp_active_steps(inversion.steps, pnp_f_t)
        # how extended attention is slimmed; default: AAS with kv_budget (Keyframe Editing alone)
        self.slimming = (slimming or KeyframeSlimming(policy="aas", kv_budget=kv_budget)).validate()
        self.kv_budget = self.slimming.kv_budget
        self.chunk_frames = chunk_frames
        self.propagate = propagate
        # where the model runs; None: where the sampler's latents are. The host may keep the full-batch
        # latents in RAM: then only each pass's frames travel to this device, and each output back.
        self.device: torch.device | str | None = None
        # called with (frames done, frames) after the keyframe pass and after each chunk: the host checks
        # for Cancel there (a step over 10,000 frames takes minutes) and moves its progress bar
        self.on_progress: Callable[[int, int], None] | None = None
        self._selection_cache: tuple[int, dict] | None = None
        self.records: KeyframeRecords | None = None  # the latest keyframe pass's outputs, for propagation
        self.record_folder: str | None = None  # keep them in files here (RAM short) instead of RAM

    def keyframes(self, step: int) -> np.ndarray:
        if self.plan is None:
            return np.arange(self.inversion.frame_count)
        return self.plan.keyframes(step)

    def selection(self, step: int, device) -> dict[int, torch.Tensor] | None:
        """AAS subsets for this step's keyframes, or None when they fit the budget (full extended attention).
        Without a keyframe plan there is no DIFT ranking, so attention stays full; other policies never use it."""
        if self.slimming.policy != "aas" or self.plan is None or self.plan.clip_count <= self.kv_budget:
            return None
        if self._selection_cache is None or self._selection_cache[0] != step:
            plan = self.plan
            ids = np.arange(plan.clip_count) * plan.per_clip + plan.choice(step)
            scores = torch.from_numpy(np.ascontiguousarray(plan.aas_scores[np.ix_(ids, ids)])).to(device)
            self._selection_cache = (step, aas_selection(scores, plan.levels, AAS_LEVEL, self.kv_budget))
        return self._selection_cache[1]

    def __call__(self, run: RunModel, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                 branches: int, frames_idx: np.ndarray | None = None,
                 branch_ids: list[int] | None = None) -> torch.Tensor:
        """x [branches * n, c, h, w] in sampler space: the n frames `frames_idx` (default: all frames, in order)
        of each branch; returns the denoised batch of the same shape.

        A call holding the step's keyframes runs the keyframe pass (all keyframes of the step must be in it:
        they attend to each other); the other frames of the call run in chunks, taking the keyframe pass's
        record of this step, so a host that keeps the sampler's state itself may call the keyframes first and
        then chunks of other frames. `branch_ids` name the branches (ComfyUI: cond 0, uncond 1; default
        0..branches-1), so that calls that hold different branches of one step share one record."""
        call = np.arange(self.inversion.frame_count) if frames_idx is None else np.asarray(frames_idx)
        branch_ids = list(range(branches)) if branch_ids is None else [int(b) for b in branch_ids]
        if x.shape[0] != branches * len(call) or len(branch_ids) != branches:
            raise LongEditError(
                f"The sampler gave {x.shape[0] // max(branches, 1)} frames per branch, but the inversion has "
                f"{self.inversion.frame_count}.",
                "sample the LATENT that AdaFlow Invert output (same frames, same order).")
        step = self.inversion.step_of(float(sigma.flatten()[0]))
        out = torch.empty_like(x)
        keyframes = self.keyframes(step)
        is_key = np.isin(call, keyframes)
        if is_key.any():
            if is_key.sum() != len(keyframes):
                raise ValueError("a model call holds some of the step's keyframes but not all of them")
            self._keyframe_pass(run, x, sigma, context, call, np.nonzero(is_key)[0], step, branch_ids, out)
            self.report(len(keyframes), len(call))
        others = np.nonzero(~is_key)[0]
        if len(others) and self.propagate and (self.records is None or self.records.step != step):
            raise ValueError("a chunk of frames was called before its step's keyframe pass")
        chunk_frames = max(1, int(self.chunk_frames))  # hosts may size chunks from float byte estimates
        done = int(is_key.sum())
        for i0 in range(0, len(others), chunk_frames):
            local = others[i0:i0 + chunk_frames]
            self._pass(run, x, sigma, context, len(call), local, call[local], step, extended=False, out=out,
                       branch_pos=list(range(branches)), branch_ids=branch_ids)
            done += len(local)
            self.report(done, len(call))
        return out

    def _keyframe_pass(self, run: RunModel, x, sigma, context, call: np.ndarray, local: np.ndarray, step: int,
                       branch_ids: list[int], out: torch.Tensor) -> None:
        keyframes = call[local]
        if self.propagate:
            if self.records is None or self.records.clips != len(keyframes):
                device = self.compute_device(x)
                pin = torch.device(device).type == "cuda" and torch.cuda.is_available()
                self.records = KeyframeRecords(len(keyframes), pin=pin, folder=self.record_folder)
            self.records.begin(step)
        if self.plan is not None and len(branch_ids) > 1:
            # One branch at a time (with its own source rows): the keyframe pass, the one pass that grows with
            # the number of clips, then holds 2 x keyframes instead of (branches + 1) x keyframes; extended
            # attention never mixes branches, so this is the same computation. The source keyframes run once
            # per branch: a few frames per step.
            for b, branch in enumerate(branch_ids):
                record = self.records.writer([branch]) if self.propagate else None
                self._pass(run, x, sigma, context, len(call), local, keyframes, step, extended=True, out=out,
                           branch_pos=[b], record=record)
        else:
            record = self.records.writer(branch_ids) if self.propagate else None
            self._pass(run, x, sigma, context, len(call), local, keyframes, step, extended=True, out=out,
                       branch_pos=list(range(len(branch_ids))), record=record)

    def compute_device(self, x: torch.Tensor):
        return self.device if self.device is not None else x.device

    def report(self, done: int, frames: int) -> None:
        if self.on_progress is not None:
            self.on_progress(done, frames)

    def source_use(self, step: int, extended: bool) -> str:
        """What a pass needs of its source branch: 'full' (a whole forward beside the edited branches), 'feature'
        (only PnP's residual feature: the source runs apart and stops at that layer) or 'none'.

        The source branch's own prediction is never used; it matters only through what it injects. The keyframe
        pass always runs it whole (q/k injection, and the record's source row). In a chunk of non-keyframes
        with propagation every self-attention output is the recorded keyframes', so injected q/k are unused
        and only the residual feature counts, while PnP injects it (the first pnp_f_t of the steps): the
        source forward stops there, ~44% of a UNet forward on SD2.1. Without propagation the chunk's decoder
        self-attention takes the source's q/k at every layer from up_blocks[1] on, so the source runs whole
        while q/k injection is on. With nothing to inject, the source branch is skipped."""
        if extended:
            return "full"
        if step < self.attn_steps and not self.propagate:
            return "full"
        return "feature" if step < self.conv_steps else "none"

    def propagation(self, frames_idx: np.ndarray, step: int, branch_ids: list[int], device,
                    source: bool = True) -> Propagation:
        """Gather indices of a chunk of non-keyframes into the records of the clips it spans, at every level:
        frame f of clip c takes, for its token t, the output of token matches[f, t] of c's keyframe. The
        records' rows: the source's (unless `source` is False), then those of `branch_ids`."""
        plan = self.plan
        clips = plan.clip_of(frames_idx)
        spanned = np.unique(clips)
        position = np.searchsorted(spanned, clips)  # the clip's place among the records on the device
        slots = plan.choice(step)[clips]
        index = {}
        for level, (h, w) in enumerate(plan.levels):
            tokens = h * w
            matches = torch.from_numpy(np.asarray(plan.matches[level][frames_idx, slots])).to(device).long()
            index[tokens] = matches + torch.as_tensor(position * tokens, device=device)[:, None]
        recorded = self.records.for_clips([int(c) for c in spanned], branch_ids, device, source=source)
        return Propagation(recorded=recorded, index=index)

    def _pass(self, run: RunModel, x, sigma, context, rows_per_branch: int, local: np.ndarray,
              frames_idx: np.ndarray, step: int, extended: bool, out: torch.Tensor, branch_pos: list[int],
              record=None, branch_ids: list[int] | None = None) -> None:
        """One pass over `frames_idx` (at positions `local` of each branch's `rows_per_branch` rows of x) for the
        branches at positions `branch_pos` (ids `branch_ids`, for a chunk's propagation), with the source
        branch as `source_use` says: one model call [source | branches], or the source's call apart, or none."""
        k = len(frames_idx)
        device = self.compute_device(x)
        idx = as_index(local, x.device)
        rows = torch.cat([b * rows_per_branch + idx for b in branch_pos])
        source_context = self.inversion.source_context.to(device, context.dtype)
        if source_context.shape[1:] != context.shape[1:]:
            raise LongEditError(
                f"The source conditioning {tuple(source_context.shape[1:])} and the sampler's conditioning "
                f"{tuple(context.shape[1:])} differ in shape.", "use the same CLIP for both prompts.")
        use = self.source_use(step, extended)
        propagate = self.propagate and not extended
        layout = PassLayout(frames=k, branches=len(branch_pos) + (use == "full"), has_source=use == "full",
                            inject_qk=step < self.attn_steps, inject_conv=step < self.conv_steps,
                            selection=self.selection(step, device) if extended else None, extended=extended,
                            record=record,
                            propagate=(self.propagation(frames_idx, step, branch_ids, device, source=use == "full")
                                       if propagate else None),
                            isa=self.slimming if extended and self.slimming.policy == "isa" else None)
        source = self.inversion.latents_at(step, frames_idx).to(device, x.dtype) if use != "none" else None
        sigmas = sigma.flatten()[:1].to(device).expand(k)
        if use == "feature":
            layout.source_feature = self._source_feature(run, source, sigmas, source_context.expand(k, -1, -1),
                                                         layout.propagate, device)
        # The host may keep the conditioning on another device than the latents (ComfyUI moves it later).
        latents, contexts = [x[rows].to(device)], [context[rows.to(context.device)].to(device)]
        if use == "full":
            latents.insert(0, source)
            contexts.insert(0, source_context.expand(k, -1, -1))
        denoised = run(torch.cat(latents), sigmas.repeat(layout.branches), torch.cat(contexts), layout)
        out[rows] = denoised[k if use == "full" else 0:].to(out.device, out.dtype)

    def _source_feature(self, run: RunModel, source, sigmas, source_context, propagate: Propagation | None,
                        device) -> torch.Tensor:
        """The source branch's PnP residual feature for a chunk: its forward up to that layer, then stopped.
        `propagate`: the edited branches' (the same gathers, read from the record's source row)."""
        if propagate is not None:
            propagate = Propagation(recorded=propagate.recorded.with_rows(record_rows([], True, device)),
                                    index=propagate.index)
        layout = PassLayout(frames=len(source), branches=1, has_source=True, inject_qk=False, inject_conv=True,
                            extended=False, capture={}, propagate=propagate)
        try:
            run(source, sigmas, source_context, layout)
        except SourceFeatureReady:
            return layout.capture["feature"]
        raise RuntimeError("the source branch's forward never reached PnP's feature-injection layer "
                           "(FeatureInjection is not installed on this model)")


class SourceFeatureReady(Exception):
    """Raised by FeatureInjection in a source-only pass once the feature is captured: the rest of that
    forward is not needed (a control-flow signal; it never leaves KeyframeEditor)."""


class FeatureInjection(nn.Sequential):
    """PnP's residual-feature injection, as a drop-in for a decoder ResBlock's `out_layers` Sequential.

    It keeps the original child modules under the same names (so weight patches such as LoRAs still find
    them) and, while a pass with injection on is running, hands the source branch's features to the edited
    branches (TokenFlow/AdaFlow inject at up_blocks[1].resnets[1], before the skip connection). A chunk whose
    source branch runs apart stops its source-only call here (`capture`) and hands the edited call the
    captured feature (`source_feature`) without computing its own."""

    def __init__(self, original: nn.Sequential, current_layout: Callable[[], PassLayout | None]):
        super().__init__(*original)
        self._current_layout = current_layout

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        layout = self._current_layout()
        if layout is not None and layout.source_feature is not None:  # the source ran apart: take its feature
            feature = layout.source_feature
            return feature.repeat(layout.branches, *[1] * (feature.dim() - 1)).to(h.dtype)
        h = super().forward(h)
        if layout is not None and layout.capture is not None:  # a source-only pass: keep the feature, stop
            layout.capture["feature"] = h
            raise SourceFeatureReady
        if layout is None or not (layout.has_source and layout.inject_conv):
            return h
        grouped = h.view(layout.branches, layout.frames, *h.shape[1:])
        return torch.cat([grouped[:1]] * layout.branches).view_as(h)
