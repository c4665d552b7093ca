"""A sampling run spread over a local Ray cluster of 2 CPU workers (core/scale/pool) against one process and
against a float64 transcription of the whole-batch sampler: the same output, with a worker killed mid-step,
and a clear stop when every worker is lost or Cancel is pressed.

The model is a per-frame denoiser with a propagation term: a non-keyframe's estimate reads its clip's entry
in the step's keyframe record, so a worker that used a stale or missing record, or put a chunk in the wrong
frames, gives another output."""
import functools
import os
import sys
import time

import numpy as np
import pytest
import torch

if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
    import ray  # CI installs requirements-test.txt: Ray missing there is a failure, not a skip
else:
    ray = pytest.importorskip("ray")

from longedit.core.errors import LongEditError
from longedit.core.adaflow.sampling import euler_by_passes, passes_of_step
from longedit.core.scale.pool import Prelude, ScaleOptions, WarmPools, WorkerPool, connect
from longedit.core.scale.transport import AUTO, COLLECTIVE, FELL_BACK, OBJECT_STORE

CLIP_STARTS = np.array([0, 5, 11, 12, 19, 23])  # 5 clips of odd sizes (one of a single frame), 23 frames
FRAMES, STEPS, CHUNK = 23, 4, 3
PROPAGATION = 0.25


def clip_of(frames) -> np.ndarray:
    return np.searchsorted(CLIP_STARTS, frames, side="right") - 1


def keyframes_of(step: int) -> np.ndarray:
    """One keyframe per clip, a different one each step."""
    rng = np.random.default_rng(100 + step)
    return np.array([rng.integers(a, b) for a, b in zip(CLIP_STARTS[:-1], CLIP_STARTS[1:])])


def first_to_mark(marker: str) -> bool:
    """True for the one process that creates `marker` (atomically: two workers may reach their kill point at
    once, and only one may die)."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


class ToyModel:
    """What a worker holds: per-frame weights (the 'model') and the step's keyframe record."""

    def __init__(self, weights: np.ndarray, kill: dict | None = None):
        self.weights = torch.from_numpy(weights)
        self.kill = kill  # {"step", "frame", "marker"}: exit the process (once) on the chunk holding frame
        self.records, self.step = None, None

    def own(self, group, current, sigma):
        return torch.tanh(current * self.weights[torch.as_tensor(group)]) / (1 + sigma[:, None, None])

    def keyframe_pass(self, step, group, current, sigma):
        denoised = self.own(group, current, sigma)
        # keyframe of clip c is group[c]; nested and of two dtypes, as AdaFlow's (clips, {layer: rows}) record
        self.set_records(step, (len(group), {"rows": denoised.clone(), "half": denoised.half()}))
        return denoised

    def set_records(self, step, records):
        self.step, self.records = step, records

    def denoise(self, group, current, sigma):
        k = self.kill
        if k and self.step == k["step"] and k["frame"] in group and first_to_mark(k["marker"]):
            os._exit(1)  # the worker process dies mid-step, its chunks in flight unanswered
        clips, layers = self.records
        assert clips == len(CLIP_STARTS) - 1 and torch.equal(layers["half"], layers["rows"].half())
        record = layers["rows"][torch.as_tensor(clip_of(np.asarray(group)))]
        return self.own(group, current, sigma) + PROPAGATION * record * torch.cos(current)


def reference(x: np.ndarray, sigmas: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The whole-batch Euler sampler in float64: each step's keyframes first, the others from their record."""
    for i in range(len(sigmas) - 1):
        own = np.tanh(x * weights) / (1 + sigmas[i])
        keys = keyframes_of(i)
        denoised = own + PROPAGATION * own[keys][clip_of(np.arange(FRAMES))] * np.cos(x)
        denoised[keys] = own[keys]
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


def sample(model: ToyModel, x0: np.ndarray, sigmas: np.ndarray, pool: WorkerPool | None = None, check=None):
    def denoise(group, current, sigma):  # the sampler's own pass: here only the keyframe pass, or all of them
        step = int(np.nonzero(sigmas == float(sigma[0]))[0][0])
        if np.array_equal(group, keyframes_of(step)):
            return model.keyframe_pass(step, group, current, sigma)
        return model.denoise(group, current, sigma)

    spread = None
    if pool is not None:
        spread = lambda step, groups, inputs: pool.denoise_chunks(step, model.records, groups, inputs, check)
    x = torch.from_numpy(x0.copy())
    return euler_by_passes(x, torch.from_numpy(sigmas), denoise,
                           lambda i: passes_of_step(FRAMES, keyframes_of(i), CHUNK), spread=spread)


@pytest.fixture(scope="module")
def cluster():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    connect(ScaleOptions(workers=2))
    yield ray
    ray.shutdown()


@pytest.fixture
def problem():
    rng = np.random.default_rng(7)
    return rng.normal(size=(FRAMES, 1, 1)) + rng.normal(size=(FRAMES, 3, 5)) * 0.1, \
        rng.normal(size=(FRAMES, 3, 5)) * 4, np.append(np.geomspace(14.6, 0.3, STEPS), 0.0)


# how the records travel between CPU workers of one machine: auto keeps to the object store there
VIA = {AUTO: "object store", COLLECTIVE: "gloo", OBJECT_STORE: "object store"}


@pytest.mark.parametrize("transport", [AUTO, COLLECTIVE])
def test_two_workers_give_the_one_process_output_bit_for_bit(cluster, problem, transport):
    weights, x0, sigmas = problem
    one = sample(ToyModel(weights), x0, sigmas)
    assert np.allclose(one.numpy(), reference(x0, sigmas, weights), rtol=0, atol=1e-12)
    pool = WorkerPool(ScaleOptions(workers=2, transport=transport), functools.partial(ToyModel, weights))
    try:
        assert len(set(pool.pids)) == 2 and os.getpid() not in pool.pids
        spread = sample(ToyModel(weights), x0, sigmas, pool)
        receipts = pool.record_receipts()
    finally:
        pool.close()
    assert torch.equal(spread, one)
    # every worker got every step's record once, the way asked for
    assert sorted(r["step"] for r in receipts) == sorted(list(range(STEPS)) * 2)
    assert {r["via"] for r in receipts} == {VIA[transport]}


@pytest.mark.parametrize("transport", [AUTO, COLLECTIVE])
def test_a_worker_killed_mid_step_has_its_chunks_rerun_on_the_other(cluster, problem, tmp_path, transport):
    weights, x0, sigmas = problem
    one = sample(ToyModel(weights), x0, sigmas)
    marker = tmp_path / "killed"
    kill = {"step": 2, "frame": int(np.setdiff1d(np.arange(FRAMES), keyframes_of(2))[7]), "marker": str(marker)}
    pool = WorkerPool(ScaleOptions(workers=2, transport=transport), functools.partial(ToyModel, weights, kill))
    try:
        spread = sample(ToyModel(weights), x0, sigmas, pool)
        assert marker.exists() and len(pool.lost) == 1  # one worker really died, in step 2
        receipts = pool.record_receipts()
    finally:
        pool.close()
    assert torch.equal(spread, one)
    # before the loss both got the record as asked; after it the survivor reads the object store (told to: it
    # does not first try a broadcast to the dead one)
    assert {r["via"] for r in receipts if r["step"] < 2} == {VIA[transport]}
    assert [r["via"] for r in receipts if r["step"] > 2] == ["object store"] * (STEPS - 3)


class GradToy(ToyModel):
    """Weights that require grad, as a loaded checkpoint's parameters may: a worker must compute without autograd
    (the host samples in inference mode), or it keeps every activation of the forward and sends back graphs."""

    def __init__(self, weights):
        super().__init__(weights)
        self.weights.requires_grad_()

    def denoise(self, group, current, sigma):
        denoised = super().denoise(group, current, sigma)
        assert not denoised.requires_grad, "a worker's chunk ran with autograd"
        return denoised

    def grad_mode(self, k):
        return torch.is_grad_enabled(), torch.is_inference_mode_enabled()


def test_workers_compute_without_autograd(cluster, problem):
    weights, x0, sigmas = problem
    pool = WorkerPool(ScaleOptions(workers=2), functools.partial(GradToy, weights))
    try:
        spread = sample(ToyModel(weights), x0, sigmas, pool)
        modes = dict(pool.map_chunks("grad_mode", 3, lambda k: (k,)))
    finally:
        pool.close()
    assert not spread.requires_grad and torch.equal(spread, sample(ToyModel(weights), x0, sigmas))
    assert modes == {k: (False, True) for k in range(3)}


@pytest.mark.parametrize("dead_rank", [0, 1])
def test_a_group_broken_unnoticed_falls_back_to_the_object_store(cluster, problem, dead_rank):
    """A worker dies between steps (the host does not know yet): the survivor's broadcast fails, and it reads the
    step's record from the object store instead, whether the dead one was to send (rank 0) or to receive."""
    weights, x0, sigmas = problem
    pool = WorkerPool(ScaleOptions(workers=2, transport=COLLECTIVE), functools.partial(ToyModel, weights))
    try:
        ranks = [g.rank for g in pool.host_groups]
        dead, alive = pool.actors[ranks.index(dead_rank)], pool.actors[ranks.index(1 - dead_rank)]
        ray.kill(dead, no_restart=True)
        record = (5, {"rows": torch.randn(5, 3, 5, dtype=torch.float64), "half": torch.zeros(5, 3, 5).half()})
        how = ray.get(alive.receive_records.remote(0, [ray.put(record)], True), timeout=60)
        assert how["via"] == FELL_BACK
        records = ray.get(alive.call.remote("__getattribute__", "records"))
        assert torch.equal(records[1]["rows"], record[1]["rows"])
    finally:
        pool.close()


def test_with_every_worker_lost_the_run_stops_with_a_clear_error(cluster, problem, tmp_path):
    weights, x0, sigmas = problem
    frame = int(np.setdiff1d(np.arange(FRAMES), keyframes_of(1))[0])
    pool = WorkerPool(ScaleOptions(workers=1),
                      functools.partial(ToyModel, weights, {"step": 1, "frame": frame, "marker": str(tmp_path / "k")}))
    with pytest.raises(LongEditError, match="All 1 Ray workers were lost during step 2"):
        sample(ToyModel(weights), x0, sigmas, pool)
    assert pool.actors == []


def test_cancel_stops_every_worker(cluster, problem):
    weights, x0, sigmas = problem

    class Cancelled(Exception):
        pass

    polls = []

    def check():
        polls.append(1)
        if len(polls) == 3:
            raise Cancelled

    pool = WorkerPool(ScaleOptions(workers=2), functools.partial(ToyModel, weights))
    actors = list(pool.actors)
    with pytest.raises(Cancelled):
        sample(ToyModel(weights), x0, sigmas, pool, check)
    assert pool.actors == []
    for actor in actors:  # killed, not merely left idle (ray.kill is asynchronous: dead within 30 s)
        deadline = time.monotonic() + 30
        while True:
            try:
                ray.get(actor.ready.remote(), timeout=30)
            except ray.exceptions.RayActorError:
                break
            assert time.monotonic() < deadline, "a worker still runs 30 s after Cancel"
            time.sleep(0.5)


class SlowToLoad:
    """A model that takes minutes to load (a large checkpoint shipped to a slow machine): says where it runs, then
    sleeps."""

    def __init__(self, folder: str):
        open(os.path.join(folder, str(os.getpid())), "w").close()
        time.sleep(120)


def process_gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.5)
    return False


def test_cancel_while_the_workers_load_the_model_stops_them(cluster, tmp_path):
    class Cancelled(Exception):
        pass

    def check():  # Cancel, pressed once both workers are loading
        if len(os.listdir(tmp_path)) == 2:
            raise Cancelled

    started = time.monotonic()
    with pytest.raises(Cancelled):
        WorkerPool(ScaleOptions(workers=2), functools.partial(SlowToLoad, str(tmp_path)), check=check)
    assert time.monotonic() - started < 100, "Cancel waited for the model to load"
    pids = [int(name) for name in os.listdir(tmp_path)]
    assert len(pids) == 2 and all(process_gone_within(pid, 30) for pid in pids)


class FailsToLoad:
    def __init__(self):
        raise FileNotFoundError("model.safetensors")


def test_a_model_that_fails_to_load_in_the_workers_stops_with_a_clear_error(cluster):
    with pytest.raises(LongEditError, match="(?s)could not load the model.*FileNotFoundError: model.safetensors") as caught:
        WorkerPool(ScaleOptions(workers=2), FailsToLoad, check=lambda: None)
    assert "same paths" in caught.value.fix


# ------------------------------------------------------------------------------------- the inversion, spread
def toy_eps(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Elementwise, so that a frame's walk does not depend on the chunk it is in."""
    return torch.tanh(0.7 * x) * (1 + 0.1 * sigma) + 0.05 * x


class ToyInverter:
    """What a worker holds for the inversion; `kill` (a marker path): exit the process on its second chunk, once."""

    def __init__(self, kill: str | None = None):
        self.kill, self.chunks = kill, 0

    def invert(self, walk, x0):
        self.chunks += 1
        if self.kill and self.chunks == 2 and first_to_mark(self.kill):
            os._exit(1)
        return walk.frames(x0, toy_eps)


def invert(latents, pool=None, check=None):
    from longedit.core.adaflow.inversion import ddim_invert

    sigmas = np.append(np.geomspace(9.0, 0.2, STEPS), 0.0)
    grid = np.concatenate([[0.03], np.geomspace(0.1, 9.0, 11), sigmas[-2::-1]])
    grid = np.unique(grid)
    spread = None if pool is None else (
        lambda walk, chunks, latents_of: pool.map_chunks("invert", len(chunks), lambda k: (walk, latents_of(k)),
                                                         check, "the inversion"))
    return ddim_invert(latents, sigmas, toy_eps, CHUNK, grid=grid, spread=spread)


@pytest.mark.parametrize("killed", [False, True])
def test_the_inversion_spread_over_workers_is_the_one_process_inversion(cluster, tmp_path, killed):
    """Chunks of frames walk the inversion grid on 2 workers (one killed after its first chunk, whose second
    chunk then runs on the other): trajectory and start latents equal the one-process inversion's bit for bit,
    every frame in its own row."""
    latents = torch.from_numpy(np.random.default_rng(3).normal(size=(FRAMES, 3, 5)).astype(np.float32))
    one = invert(latents)
    marker = tmp_path / "killed"
    pool = WorkerPool(ScaleOptions(workers=2), functools.partial(ToyInverter, str(marker) if killed else None))
    try:
        spread = invert(latents, pool)
        assert marker.exists() == killed and len(pool.lost) == int(killed)
    finally:
        pool.close()
    assert np.array_equal(spread.trajectory, one.trajectory) and np.array_equal(spread.start, one.start)
    assert not np.array_equal(one.trajectory[:, 0], one.trajectory[:, 1])  # frames differ: a mix-up would show


def test_the_inversion_stops_with_a_clear_error_when_every_worker_is_lost(cluster, tmp_path):
    latents = torch.zeros(FRAMES, 3, 5)
    pool = WorkerPool(ScaleOptions(workers=1), functools.partial(ToyInverter, str(tmp_path / "k")))
    with pytest.raises(LongEditError, match="All 1 Ray workers were lost during the inversion"):
        invert(latents, pool)
    assert pool.actors == []


# ------------------------------------------------------------------------------- warm pools, between stages
def held_models(pool) -> list[bool]:
    """Whether each actor holds a model (asking drops it: call last)."""
    return ray.get([a.unload.remote() for a in pool.actors])


def test_a_kept_pool_runs_the_next_stage_in_the_same_workers_without_the_last_stage_model(cluster, problem):
    weights, x0, sigmas = problem
    warm = WarmPools(idle_s=120)
    options = ScaleOptions(workers=2)
    try:
        pool = WorkerPool(options, functools.partial(ToyModel, weights))
        pids = list(pool.pids)
        assert torch.equal(sample(ToyModel(weights), x0, sigmas, pool), sample(ToyModel(weights), x0, sigmas))
        warm.keep(pool)
        assert warm.take(ScaleOptions(workers=2, transport=OBJECT_STORE), Prelude()) is None  # other options
        assert warm.take(ScaleOptions(workers=3), Prelude()) is None
        assert warm.take(options, Prelude(argv=("main.py", "--cpu"))) is None  # another command line
        taken = warm.take(options, Prelude())
        assert taken is pool and warm.take(options, Prelude()) is None  # taken: no longer kept
        assert held_models(taken) == [False, False]  # the sampling model was dropped when kept
        latents = torch.from_numpy(np.random.default_rng(4).normal(size=(FRAMES, 3, 5)).astype(np.float32))
        taken.load(ToyInverter)  # the next stage, in the same processes
        assert taken.pids == pids
        spread, one = invert(latents, taken), invert(latents)
        assert np.array_equal(spread.trajectory, one.trajectory) and np.array_equal(spread.start, one.start)
        # and a sampling stage again after it: a stage's records do not outlive it
        taken.load(functools.partial(ToyModel, weights))
        assert torch.equal(sample(ToyModel(weights), x0, sigmas, taken), sample(ToyModel(weights), x0, sigmas))
        assert taken.pids == pids and held_models(taken) == [True, True]
    finally:
        warm.close_all()
        pool.close()


def test_a_warm_pool_stops_after_its_idle_time(cluster):
    warm = WarmPools(idle_s=1.0)
    pool = WorkerPool(ScaleOptions(workers=2), ToyFeaturizer)
    pids = list(pool.pids)
    warm.keep(pool)
    assert all(process_gone_within(pid, 30) for pid in pids)
    assert pool.actors == [] and warm.take(ScaleOptions(workers=2), Prelude()) is None


def test_a_pool_that_lost_a_worker_is_stopped_not_kept(cluster, problem, tmp_path):
    weights, x0, sigmas = problem
    warm = WarmPools(idle_s=120)
    kill = {"step": 1, "frame": int(np.setdiff1d(np.arange(FRAMES), keyframes_of(1))[3]),
            "marker": str(tmp_path / "killed")}
    pool = WorkerPool(ScaleOptions(workers=2), functools.partial(ToyModel, weights, kill))
    pids = list(pool.pids)
    sample(ToyModel(weights), x0, sigmas, pool)
    assert len(pool.lost) == 1
    warm.keep(pool)
    assert pool.actors == [] and warm.take(ScaleOptions(workers=2), Prelude()) is None
    assert all(process_gone_within(pid, 30) for pid in pids)  # the survivor too


def test_a_warm_pool_whose_worker_died_meanwhile_is_not_used(cluster):
    import signal

    warm = WarmPools(idle_s=120)
    pool = WorkerPool(ScaleOptions(workers=2), ToyFeaturizer)
    pids = list(pool.pids)
    warm.keep(pool)
    os.kill(pids[1], signal.SIGKILL)  # e.g. the machine's OOM killer, while the pool waited
    assert process_gone_within(pids[1], 30)
    assert warm.take(ScaleOptions(workers=2), Prelude()) is None
    assert pool.actors == [] and process_gone_within(pids[0], 30)


# ------------------------------------------------------------------------- keyframe selection's features, spread
def toy_featurize(x, noise):
    """Per sample: a feature map from the noised latent (what DIFT's UNet call is, in shape)."""
    return torch.tanh(x + 0.3 * noise).repeat(1, 2, 1, 1)


class ToyFeaturizer:
    def features(self, x0, noise):
        from longedit.core.adaflow.dift import ensemble_features

        return ensemble_features(toy_featurize, x0, noise)


def test_keyframe_features_spread_over_workers_come_back_in_frame_order(cluster):
    """DIFT features of chunks of frames computed on 2 workers are yielded in frame order (what keyframe
    selection streams through), equal to the one-process features."""
    from longedit.core.adaflow.dift import dift_feature_chunks

    latents = torch.from_numpy(np.random.default_rng(5).normal(size=(FRAMES, 2, 3, 5)).astype(np.float32))
    one = list(dift_feature_chunks(latents, toy_featurize, 3, 0, CHUNK))
    pool = WorkerPool(ScaleOptions(workers=2), ToyFeaturizer)
    try:
        on_workers = lambda chunks, inputs: pool.map_chunks("features", len(chunks), inputs)  # noqa: E731
        spread = list(dift_feature_chunks(latents, toy_featurize, 3, 0, CHUNK, spread=on_workers))
    finally:
        pool.close()
    assert [len(p) for p in spread] == [len(p) for p in one] and torch.equal(torch.cat(spread), torch.cat(one))
    assert not torch.equal(one[0][0], one[0][1])


def test_results_arriving_out_of_order_are_yielded_in_order_as_soon_as_they_can_be():
    from longedit.core.adaflow.dift import in_order

    arrived = []

    def results():
        for k in (2, 0, 3, 1, 4):
            arrived.append(k)
            yield k, f"chunk {k}"

    out = []
    for value in in_order(results()):
        out.append((value, list(arrived)))
    assert [v for v, _ in out] == [f"chunk {k}" for k in range(5)]
    # chunk 0 goes out as soon as it arrives (second), 1 brings 1, 2 and 3 with it
    assert [len(seen) for _, seen in out] == [2, 4, 4, 4, 5]


def test_a_worker_imports_the_pack_under_a_custom_node_path_name(tmp_path):
    """ComfyUI imports a custom node under its folder's full path; a fresh process (a worker: nothing of the pack
    importable) runs the setup hook, sent by value as Ray sends it, and resolves that name's submodules."""
    import subprocess

    from longedit.core.scale.pool import PACK_DIR, pack_importer

    name = str(tmp_path / "ComfyUI" / "custom_nodes" / "longedit")
    hook = tmp_path / "hook.pickle"
    hook.write_bytes(ray.cloudpickle.dumps(pack_importer(name, str(PACK_DIR))))
    check = (f"import pickle, importlib, sys; pickle.load(open({str(hook)!r}, 'rb'))(); "
             f"errors = importlib.import_module({name!r} + '.core.errors'); "
             f"assert errors.__file__.startswith({str(PACK_DIR)!r}); print(errors.LongEditError.__module__)")
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=tmp_path,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == name + ".core.errors"
