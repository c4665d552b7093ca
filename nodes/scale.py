"""Spread Edit over GPUs: MODEL -> MODEL option that runs AdaFlow's keyframe features, inversion and each sampling
step's propagation chunks on Ray actors.

The node only sets options on a clone. AdaFlow Keyframe Selection and Invert read them and run chunks of frames
(DIFT features, the inversion walk) on the actors; the pass-by-pass sampler (adaflow_edit.sample_by_passes)
starts one actor per GPU holding the patched model, runs each step's keyframe pass itself and sends the step's
keyframe record and the other frames' chunks to the actors (core/scale)."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..core.adaflow.records import KeyframeRecords
from ..core.scale.pool import Prelude, ScaleOptions, WarmPools, WorkerPool, import_ray
from ..core.scale.transport import AUTO, TRANSPORTS

SCALE_KEY = "longedit_scale"


def scale_options(model_options: dict) -> ScaleOptions | None:
    return (model_options or {}).get("transformer_options", {}).get(SCALE_KEY)


def with_scale(model, gpus: int, ray_address: str = "", records_via: str = AUTO):
    """A clone of `model` whose AdaFlow sampling spreads over `gpus` Ray actors (1: the clone is unchanged)."""
    options = ScaleOptions(workers=int(gpus), address=ray_address.strip(), transport=records_via)
    patched = model.clone()
    if options.workers > 1 or options.address:
        import_ray()  # say now, not at sampling, that Ray is missing
        patched.model_options.setdefault("transformer_options", {})[SCALE_KEY] = options
    return patched


class ChunkModel:
    """Built inside each Ray actor, once: the patched model, the processed conditioning and the sampler's model
    options, unpickled together (the AdaFlow hooks and the model share state), on this actor's device."""

    def __init__(self, patcher, conds: dict, cfg: float, options: dict, seed, config_key: str):
        import comfy.samplers

        patcher.model.to(patcher.load_device)
        holder = options["transformer_options"][config_key]
        driver = holder()
        # this actor's own AdaFlow state: same settings, its own editor (records, caches)
        self.state = {"settings": driver["settings"], "editor": None, "latent_out": driver["latent_out"]}
        options["transformer_options"][config_key] = self.holder
        self.guider = comfy.samplers.CFGGuider(patcher)
        self.guider.model_options = options
        self.guider.inner_model, self.guider.conds, self.guider.cfg = patcher.model, conds, cfg
        self.options, self.seed = options, seed

    def holder(self) -> dict:
        return self.state

    def set_records(self, step: int, records) -> None:
        from .adaflow_edit import editor_for

        editor = editor_for(self.state)
        if records is None:
            editor.records = None
            return
        clips, layers = records
        editor.records = KeyframeRecords(clips)
        editor.records.layers = layers
        editor.records.step = step

    def denoise(self, group, current: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.state["call_frames"] = group
        try:
            return self.guider(current, sigma, model_options=self.options, seed=self.seed)
        finally:
            self.state["call_frames"] = None


class InvertModel:
    """Built inside each Ray actor, once: the MODEL (weights as the sampling process had them loaded, LoRAs
    applied) and the source conditioning, for chunks of AdaFlow's inversion."""

    def __init__(self, patcher, context: torch.Tensor):
        patcher.model.to(patcher.load_device)
        self.patcher, self.context = patcher, context

    def invert(self, walk, x0: torch.Tensor):
        """A chunk's walk up the inversion grid, re-split to this actor's free memory: (trajectory rows, start)."""
        import comfy.model_management as mm
        import numpy as np

        from ..core.memory import frames_per_chunk
        from .adaflow_invert import make_eps

        device = self.patcher.load_device
        chunk = frames_per_chunk(mm.get_free_memory(device), self.patcher.memory_required([1, *x0.shape[1:]]), 1)
        rows = np.empty((walk.steps + 1, *x0.shape), dtype=np.float16)
        start = np.empty(tuple(x0.shape), dtype=np.float16)
        eps = make_eps(self.patcher, self.context)
        for i in range(0, len(x0), chunk):
            part = slice(i, i + chunk)
            walk.frames(x0[part].to(device), eps, into=(rows[:, part], start[part]))
        return rows, start


class FeatureModel:
    """Built inside each Ray actor, once: the MODEL's DIFT featurizer, for chunks of AdaFlow Keyframe Selection."""

    def __init__(self, patcher, context: torch.Tensor, timestep: int):
        from .adaflow_keyframes import make_featurizer

        patcher.model.to(patcher.load_device)
        self.patcher, self.featurize = make_featurizer(patcher, context, timestep)

    def features(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """A chunk's ensemble-averaged features (float16, on the host), re-split to this actor's free memory."""
        import comfy.model_management as mm

        from ..core.adaflow.dift import ensemble_features
        from ..core.memory import frames_per_chunk

        per_frame = self.patcher.memory_required([noise.shape[0], *x0.shape[1:]])
        chunk = frames_per_chunk(mm.get_free_memory(self.patcher.load_device), per_frame, 1)
        return torch.cat([ensemble_features(self.featurize, x0[i:i + chunk], noise).cpu()
                          for i in range(0, len(x0), chunk)])


def stage_spread(options: ScaleOptions, build, method: str, stage: str, check):
    """A stage's `spread` (core: ddim_invert's, dift_feature_chunks'): its chunks run `method` on Ray actors that
    load `build` with the first chunk and are kept warm after the last. `check` raises on Cancel."""

    def spread(inputs_of, count: int):
        pool = acquire_pool(options, build, check=check)
        completed = False
        try:
            yield from pool.map_chunks(method, count, inputs_of, check, stage)
            completed = True
        finally:
            finish_pool(pool, completed)

    return spread


def features_spread(options: ScaleOptions, model, context: torch.Tensor, timestep: int, check):
    import functools

    run = stage_spread(options, functools.partial(FeatureModel, model, context, timestep), "features",
                       "keyframe selection", check)
    return lambda chunks, inputs_of: run(inputs_of, len(chunks))


def inversion_spread(options: ScaleOptions, model, context: torch.Tensor, check):
    """AdaFlow Invert's chunks on Ray actors (core/adaflow/inversion.ddim_invert's `spread`); the actors start
    with the first chunk and stop with the last. `check` raises on Cancel."""
    import functools

    run = stage_spread(options, functools.partial(InvertModel, model, context), "invert", "the inversion", check)
    return lambda walk, chunks, latents_of: run(lambda k: (walk, latents_of(k)), len(chunks))


def records_payload(editor):
    """What the actors need of the step's keyframe pass: its record (clips, layer -> [clips, rows, T, C])."""
    records = editor.records
    return None if records is None else (records.clips, records.layers)


def comfy_prelude() -> Prelude:
    """ComfyUI's command line (--cpu, precision, attention flags) for the workers' own ComfyUI import."""
    import sys

    import comfy.options

    if not comfy.options.args_parsing:
        return Prelude()
    return Prelude(argv=tuple(sys.argv), calls=(("comfy.options", "enable_args_parsing"), ("comfy.cli_args", "")))


def start_pool(options: ScaleOptions, guider, model_options: dict, seed, config_key: str,
               driver_peak: int = 0, check=None) -> WorkerPool:
    """`driver_peak`: the sampling process's planned GPU peak; what it does not hold yet is kept free of actors
    on its GPU. `check` raises on Cancel (also while the actors load)."""
    import functools

    import torch

    build = functools.partial(ChunkModel, guider.model_patcher, guider.conds, guider.cfg, model_options, seed,
                              config_key)
    held = torch.cuda.memory_reserved() if torch.cuda.is_available() else 0
    return acquire_pool(options, build, driver_reserve=max(0, int(driver_peak) - held), check=check)


# Pools whose stage completed stay up this long, holding no model, for the next stage or run (in one edit the
# stages follow each other within seconds; re-queueing an edit with a new prompt reruns only the sampling).
# Process-wide, as ComfyUI's loaded models are.
WARM_IDLE_S = 180
WARM_POOLS = WarmPools(WARM_IDLE_S)


def acquire_pool(options: ScaleOptions, build, driver_reserve: int = 0, check=None) -> WorkerPool:
    """Actors holding `build`'s model: a warm pool's when one has these options, else new ones."""
    prelude = comfy_prelude()
    pool = WARM_POOLS.take(options, prelude)
    if pool is None:
        return WorkerPool(options, build, prelude, driver_reserve, check)
    pool.load(build, driver_reserve, check)
    return pool


def finish_pool(pool: WorkerPool, completed: bool) -> None:
    """After a stage: the actors are kept warm when it completed; stopped after Cancel or a failure."""
    if completed:
        WARM_POOLS.keep(pool)
    else:
        pool.close()


class SpreadOverGpus(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LongEditSpreadOverGpus",
            display_name="Spread Edit over GPUs (Ray)",
            category="LongEdit/scale",
            description=(
                "Runs an AdaFlow edit on several GPUs or machines: each sampling step's keyframe pass runs here, "
                "then the other frames' chunks run on Ray actors, one per GPU, each holding this model once; the "
                "results come back in frame order. On the MODEL that AdaFlow Keyframe Selection and Invert take, it "
                "spreads their chunks of frames (DIFT features, inversion) over the actors too. The output is the "
                "one-GPU output. After a stage the actors stay up for 3 minutes without the model, so the next "
                "stage or run starts in seconds; after Cancel or an error they stop. Needs Ray "
                "(pip install longedit[ray]) and, for sampling, a keyframe plan (AdaFlow Keyframe Selection)."),
            inputs=[
                io.Model.Input("model", tooltip="The MODEL patched by AdaFlow Keyframe Editing (and Latent "
                                                "Propagation): put this node after them, before the sampler. "
                                                "A second one on the MODEL going into Keyframe Selection and "
                                                "Invert spreads their work."),
                io.Int.Input("gpus", default=2, min=1, max=4096,
                             tooltip="Number of GPUs (one Ray actor each). With fewer GPUs than actors, actors "
                                     "share them. 1: sample in this process, as without this node."),
                io.String.Input("ray_address", default="",
                                tooltip="A running Ray cluster to use (e.g. 'auto', 'ray://head:10001'); empty "
                                        "starts a local cluster on this machine's GPUs. Every node of a cluster "
                                        "needs this ComfyUI and LongEdit at the same paths."),
                io.Combo.Input("records_via", options=list(TRANSPORTS), default=AUTO, optional=True,
                               tooltip="How each step's keyframe record reaches the actors of one machine. auto: "
                                       "torch.distributed (NCCL) where each actor has a GPU of its own, else "
                                       "Ray's object store. torch.distributed: also over gloo (CPU, shared GPUs). "
                                       "object store: always Ray's. Across machines it is always the object "
                                       "store; the output is the same either way."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="A clone with the option set; the input MODEL "
                                                                   "is unchanged.")],
        )

    @classmethod
    def execute(cls, model, gpus, ray_address="", records_via=AUTO) -> io.NodeOutput:
        return io.NodeOutput(with_scale(model, gpus, ray_address, records_via))
