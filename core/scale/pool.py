"""Ray actors, one per GPU, each holding the patched model once, that denoise a step's propagation chunks.

The host builds the model inside each actor from a picklable `build` callable (run once per actor); it returns
an object with `set_records(step, records)` (the step's keyframe-pass outputs that propagation reads) and
`denoise(group, current, sigma) -> denoised` (frames `group`, their latents, sigma per frame). The keyframe pass
itself runs where the sampler runs; its records go to every actor once per step (core/scale/transport: Ray's
object store, and torch.distributed among the actors of a host). Results come back to the sampler, which
updates its state frame by frame (core/adaflow/sampling).

Faults: an actor lost mid-step (process or machine gone) has its chunks rerun on the others; with none left
the run stops with a LongEditError. Any other failure, and Cancel (the host's `check` raising), kill every
actor before the exception goes on. Ray is imported here only, when a pool is made.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..errors import LongEditError
from . import shipping
from .queue import ChunkQueue
from .transport import AUTO, COLLECTIVE_TIMEOUT_S, TRANSPORTS, HostGroup, Placement, RecordReceiver, \
    plan_host_groups, rendezvous_address

POLL_S = 0.25  # how often Cancel is checked while waiting on the actors
PACK_DIR = Path(__file__).resolve().parents[2]
PACK_NAME = __name__.split(".")[0]  # the name the host imported the pack under (ComfyUI: its folder name)


def import_ray():
    try:
        import ray
    except ImportError as error:
        raise LongEditError("Spreading the edit over several GPUs needs Ray, which is not installed in this Python.",
                            "run `pip install longedit[ray]` (or `pip install ray`) in ComfyUI's Python "
                            "environment and restart ComfyUI; or set gpus to 1.") from error
    return ray


@dataclasses.dataclass(frozen=True)
class ScaleOptions:
    workers: int  # Ray actors, one per GPU (they share GPUs when the cluster has fewer)
    address: str = ""  # a running Ray cluster ("auto", "ray://host:10001", "host:6379"); "" starts a local one
    transport: str = AUTO  # how the keyframe record reaches the actors of one host (core/scale/transport)

    def __post_init__(self):
        if int(self.workers) < 1:
            raise LongEditError(f"gpus must be at least 1, got {self.workers}.", "set gpus to 1 or more.")
        if self.transport not in TRANSPORTS:
            raise LongEditError(f"Unknown way to send records: {self.transport!r}.",
                                f"use one of: {', '.join(TRANSPORTS)}.")


def import_path_for_workers() -> list[str]:
    """sys.path entries that let a worker process import everything the pack imports (ComfyUI's folder
    included); the pack itself is registered by `pack_importer`."""
    return [os.path.abspath(p or os.getcwd()) for p in sys.path if os.path.isdir(p or os.getcwd())]


def pack_importer(name: str = PACK_NAME, folder: str = str(PACK_DIR)) -> Callable[[], None]:
    """A worker's setup hook: import the pack from `folder` under the host's module `name`, as ComfyUI does, so
    that what the host pickles by reference (name.core..., name.nodes...) resolves there. ComfyUI imports a
    custom node under its folder's full path ('/.../custom_nodes/longedit'), which no sys.path entry can stand
    for. Nested, so that Ray sends it by value: the worker needs nothing importable to run it."""

    def register() -> None:
        import importlib.util
        import os
        import sys

        if name in sys.modules:
            return
        spec = importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)

    return register


@contextlib.contextmanager
def environment(**values: str):
    """Environment variables set while a local cluster starts (its processes inherit them), then restored."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def connect(options: ScaleOptions):
    """Ray, initialised: the cluster at options.address, or a local one sized for the workers (started once
    per process and kept: later runs reuse it)."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    path = os.pathsep.join(import_path_for_workers())
    runtime_env = {"env_vars": {"PYTHONPATH": path}, "worker_process_setup_hook": pack_importer()}
    if options.address:
        ray.init(address=options.address, runtime_env=runtime_env, include_dashboard=False, log_to_driver=True)
    else:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        with environment(PYTHONPATH=path):
            ray.init(num_cpus=int(options.workers), num_gpus=gpus, include_dashboard=False, log_to_driver=True,
                     runtime_env={"worker_process_setup_hook": runtime_env["worker_process_setup_hook"]})
    return ray


@dataclasses.dataclass(frozen=True)
class Prelude:
    """What a worker process does before it unpickles the host's model: the command line the host was started
    with, and functions (module, name) to call first; e.g. ComfyUI reads its options (--cpu, precision) from
    the command line once, when its module cli_args is first imported."""
    argv: tuple[str, ...] = ()
    calls: tuple[tuple[str, str], ...] = ()

    def run(self) -> None:
        import importlib

        saved = sys.argv
        sys.argv = list(self.argv) or saved
        try:
            for module, name in self.calls:  # name "": importing the module is the point
                loaded = importlib.import_module(module)
                if name:
                    getattr(loaded, name)()
        finally:
            sys.argv = saved


@dataclasses.dataclass(frozen=True)
class GpuBudget:
    """What an actor may allocate on its GPU. `share`: its part of the memory free there when it starts (actors
    sharing a GPU, Ray's fractional num_gpus). The sampling process runs each step's keyframe pass on its own GPU
    and still grows after the actors start: an actor on that GPU (`driver_gpu`, a device UUID) leaves it
    `driver_reserve` bytes."""

    share: float = 1.0
    driver_gpu: str | None = None
    driver_reserve: int = 0


# Of what is free for the actors, the part their allocators may take: the rest is for what no per-process cap
# counts (each actor's CUDA context, typically 0.5-1 GiB, not measured here; the caching allocator's
# fragmentation). Measured on one H200: two actors capped at half the card beside a sampling process holding
# 20.4 GiB filled it to 38 MiB and failed.
ACTOR_HEADROOM = 0.9


def actor_gpu_cap(free: int, share: float, reserve: int) -> int:
    """Bytes an actor may hold: its share of what is free on its GPU once the sampling process's reserve is set
    aside, less the headroom."""
    return int(ACTOR_HEADROOM * share * max(0, int(free) - int(reserve)))


def gpu_uuid() -> str | None:
    if not torch.cuda.is_available():
        return None
    return str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)


# glibc gives buffers of more than 128 KiB straight back to the system when freed, unless earlier frees raised
# that threshold: each step's keyframe record (~130 MB at 600 frames) was then faulted in afresh, page by page.
# Measured on one H200: an actor took 0.18-0.19 s per step to read it against 0.07 s when the model's unpickling
# had raised the threshold (a 2-core CPU box: 0.13 s against 0.03 s). Fixed thresholds keep that memory.
MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's most
TRIM_THRESHOLD_BYTES = 512 * 2**20  # freed heap an actor keeps for the next step's record
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


def keep_freed_host_memory() -> bool:
    """In this (actor) process, keep freed host memory for reuse (glibc only; elsewhere nothing changes).
    Returns whether both settings took."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD,
                                                                                    TRIM_THRESHOLD_BYTES))


class ChunkWorker:
    """The body of one Ray actor: a stage's model (loaded per stage, `load`; dropped between stages, `unload`, so
    that a warm actor holds no GPU memory but its CUDA context) and the latest step's records."""

    def __init__(self, prelude: Prelude):
        keep_freed_host_memory()
        prelude.run()
        self.real_mem_get_info = torch.cuda.mem_get_info if torch.cuda.is_available() else None
        self.model = None
        self.step = None
        self.receiver = RecordReceiver()
        self.memory = MemoryLog(None)

    def load(self, build: tuple[bytes, list], budget: GpuBudget = GpuBudget()) -> int:
        """Build a stage's model from shipping.pack's pair (unpacked after the prelude: it imports ComfyUI's
        modules), within this stage's GPU budget; returns the process id."""
        self.unload()
        cap = keep_to_gpu_budget(budget, self.real_mem_get_info) if torch.cuda.is_available() else None
        self.model = shipping.unpack(build)()
        self.memory = MemoryLog(cap)
        return os.getpid()

    def unload(self) -> bool:
        """Drop the model and its records; give the GPU memory back. Returns whether a model was held."""
        held = self.model is not None
        self.model, self.step = None, None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return held

    def ready(self) -> int:
        return os.getpid()

    def placement(self) -> Placement:
        import ray

        return Placement(ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), gpu_uuid())

    def rendezvous(self) -> str:
        return rendezvous_address()

    def join(self, group: HostGroup, address: str) -> None:
        self.receiver.join(group, address)

    def leave(self) -> None:
        self.receiver.leave()

    def receive_records(self, step: int, records: list, broadcast: bool) -> dict:
        """The step's record (`records`: [ObjectRef]), over this host's group when `broadcast`; returns how."""
        payload, how = self.receiver.receive(records, broadcast)
        self.model.set_records(step, payload)
        self.step = step
        return dict(how, step=step)

    def gpu_peak(self) -> int:
        """Peak bytes torch allocated on this actor's GPU (0 on the CPU): for benchmarks."""
        return self.memory.peak()

    def memory_report(self) -> dict:
        """This actor's GPU cap, what the built model holds, and each chunk's frames and peak: for benchmarks."""
        return dataclasses.asdict(self.memory)

    def call(self, method: str, *args):
        """Another stage's work on the built model (e.g. 'invert' for a chunk of the inversion)."""
        with torch.inference_mode():
            return getattr(self.model, method)(*args)

    def denoise(self, step: int, records: list, group: np.ndarray, current: torch.Tensor,
                sigma: torch.Tensor) -> torch.Tensor:
        """`records` is [ObjectRef] (a list, so Ray leaves it unresolved): read here only when receive_records
        did not bring this step's record (it failed)."""
        if step != self.step:
            import ray

            self.model.set_records(step, ray.get(records[0]) if records else None)
            self.step = step
        # Inference mode, as the host samples: with autograd on, every activation of the forward is kept (measured
        # on one H200: a 38-frame SD2.1 chunk peaked at 53.6 GiB, ~5x a host chunk of 64 frames).
        with self.memory.chunk(len(group)), torch.inference_mode():
            return self.model.denoise(group, current, sigma).cpu()


@dataclasses.dataclass
class MemoryLog:
    """An actor's GPU memory (bytes; all 0 on the CPU): its cap (None: the whole GPU), what it held once the model
    was built, and per chunk (frames, held before, peak during); the first and last chunks are kept."""
    cap: int | None
    built: int = 0
    chunks: list = dataclasses.field(default_factory=list)
    highest: int = 0
    KEEP = 16

    def __post_init__(self):
        self.built = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0

    def peak(self) -> int:
        now = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
        return max(self.highest, now)

    @contextlib.contextmanager
    def chunk(self, frames: int):
        if not torch.cuda.is_available():
            yield
            return
        self.highest = self.peak()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        try:
            yield
        finally:
            self.chunks.append((frames, before, torch.cuda.max_memory_allocated()))
            if len(self.chunks) > 2 * self.KEEP:
                del self.chunks[self.KEEP]


def keep_to_gpu_budget(budget: GpuBudget, real_mem_get_info=None) -> int | None:
    """Cap this actor's allocations at its budget, and make it see free memory within it (hosts size their chunks
    from free memory; two processes reading the same free figure at once would both take it). Returns the cap
    (None: a GPU of its own). `real_mem_get_info`: CUDA's own, for a stage after the first (the cap is set again
    from what is free now)."""
    real = real_mem_get_info or torch.cuda.mem_get_info
    reserve = budget.driver_reserve if budget.driver_gpu is not None and budget.driver_gpu == gpu_uuid() else 0
    if budget.share >= 1 and reserve == 0:
        if torch.cuda.mem_get_info is not real:  # an earlier stage's cap
            torch.cuda.mem_get_info = real
            torch.cuda.set_per_process_memory_fraction(1.0)
        return None  # a GPU of its own
    free, total = real()
    cap = actor_gpu_cap(free, budget.share, reserve)
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))

    def mem_get_info(device=None):
        free, _ = real(device)
        return min(free, max(0, cap - torch.cuda.memory_reserved(device))), cap

    torch.cuda.mem_get_info = mem_get_info
    return cap


def dispatch_frames(frames_left: int, workers: int, memory_chunk: int, per_worker: int = 4) -> int:
    """Frames per chunk sent to an actor: what the memory allows, but small enough that every actor gets about
    `per_worker` chunks per step, so a step's end is not one actor finishing a large last chunk alone."""
    return max(1, min(int(memory_chunk), -(-int(frames_left) // (max(1, workers) * per_worker))))


def actor_resources(ray, workers: int) -> dict:
    """One CPU per actor; a GPU each, or an equal share when the cluster has fewer GPUs than actors."""
    gpus = float(ray.cluster_resources().get("GPU", 0))
    return {"num_cpus": 1, "num_gpus": 0 if gpus == 0 else min(1.0, gpus / workers)}


class WorkerPool:
    def __init__(self, options: ScaleOptions, build: Callable[[], Any] | None = None, prelude: Prelude = Prelude(),
                 driver_reserve: int = 0, check: Callable[[], None] | None = None):
        """Start `options.workers` actors, each running `prelude` (ComfyUI's command line), and `load` `build` into
        them when given."""
        self.ray = connect(options)
        self.options, self.prelude = options, prelude
        actor = self.ray.remote(max_restarts=0, max_task_retries=0, **actor_resources(self.ray, options.workers))(
            ChunkWorker)
        self.actors = [actor.remote(prelude) for _ in range(int(options.workers))]
        self.lost: list[int] = []
        self.pids: list[int] = []
        self.host_groups: list[HostGroup | None] | None = None  # formed once the actors have loaded a model
        self.broken_hosts: set[str] = set()  # hosts whose group lost an actor: they read the object store
        self.receipts: list = []  # receive_records answers not read yet
        if build is not None:
            self.load(build, driver_reserve, check)

    def load(self, build: Callable[[], Any], driver_reserve: int = 0, check: Callable[[], None] | None = None):
        """Build a stage's model in every actor, replacing the previous stage's. `build` is pickled here (by value
        where it must be), once whatever the actor count, its tensors' bytes out of band (core/scale/shipping).
        `driver_reserve`: bytes this process still needs on its GPU (its keyframe passes), kept free of actors.
        `check` raises on Cancel: it is called while the actors load, and stops them."""
        shared = self.ray.put(shipping.pack(build, self.ray.cloudpickle))
        share = actor_resources(self.ray, self.options.workers)["num_gpus"]
        budget = GpuBudget(share=share if share > 0 else 1.0, driver_gpu=gpu_uuid(), driver_reserve=driver_reserve)
        started = time.monotonic()
        logging.info(f"LongEdit: {len(self.actors)} Ray actors are loading the model")
        try:
            self.pids = self.wait_for([a.load.remote(shared, budget) for a in self.actors], check)
        except BaseException as error:
            self.close()
            if isinstance(error, self.ray.exceptions.RayError):
                raise LongEditError(f"The Ray workers could not load the model: {error}",
                                    "check the workers' log (ray logs) and that every node of the cluster has "
                                    "this ComfyUI and LongEdit at the same paths.") from error
            raise  # Cancel, or Ctrl-C
        logging.info(f"LongEdit: {len(self.actors)} Ray actors ready in {time.monotonic() - started:.1f} s")
        self.receipts = []
        if self.host_groups is None:
            self.host_groups = self.form_host_groups(self.options.transport)

    def unload(self) -> None:
        """Every actor drops its model (between stages: they stay up holding no GPU memory but their CUDA
        contexts). Not waited for: the next `answers` or `load` comes after it in each actor's queue."""
        for actor in self.actors:
            actor.unload.remote()

    def answers(self, timeout: float = 30) -> bool:
        """Whether every actor is up and answering (a warm pool's, before it is used again)."""
        try:
            return bool(self.actors) and len(self.ray.get([a.ready.remote() for a in self.actors],
                                                           timeout=timeout)) == len(self.actors)
        except Exception:
            return False

    def wait_for(self, refs: list, check: Callable[[], None] | None) -> list:
        """ray.get(refs), calling `check` (Cancel) every POLL_S meanwhile: actors take seconds to minutes to load
        a model."""
        pending = list(refs)
        while pending:
            _, pending = self.ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
            if check is not None:
                check()
        return self.ray.get(refs)

    def form_host_groups(self, transport: str) -> list[HostGroup | None]:
        """Each host's actors join a torch.distributed group for the records (core/scale/transport); a host whose
        group cannot form reads the object store."""
        groups = plan_host_groups(self.ray.get([a.placement.remote() for a in self.actors]), transport)
        for node in dict.fromkeys(g.node for g in groups if g is not None):
            members = [i for i, g in enumerate(groups) if g is not None and g.node == node]
            try:
                address = self.ray.get(self.actors[members[0]].rendezvous.remote())
                self.ray.get([self.actors[i].join.remote(groups[i], address) for i in members],
                             timeout=COLLECTIVE_TIMEOUT_S)
            except Exception as error:
                print(f"LongEdit: the actors on Ray node {node} could not form a torch.distributed group ({error}); "
                      "they read the keyframe records from Ray's object store.", flush=True)
                for i in members:
                    self.actors[i].leave.remote()
                    groups[i] = None
        return groups

    @property
    def live(self) -> list[int]:
        return [i for i in range(len(self.actors)) if i not in self.lost]

    def denoise_chunks(self, step: int, records: Any, groups: list[np.ndarray],
                       inputs: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
                       check: Callable[[], None] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Denoise every group on the actors; yields (group index, denoised) once per group, as they finish.
        `inputs(k)` gives group k's current latents and sigmas (read when the group is sent, again when resent)."""
        shared = [self.ray.put(records)] if records is not None else []
        if shared:
            self.receipts += [self.actors[i].receive_records.remote(step, shared, self.broadcasts(i))
                              for i in self.live]
        yield from self._spread(len(groups), lambda actor, k: actor.denoise.remote(step, shared, groups[k], *inputs(k)),
                                check, f"step {step + 1}")

    def map_chunks(self, method: str, count: int, inputs: Callable[[int], tuple],
                   check: Callable[[], None] | None = None, stage: str = "this stage") -> Iterator[tuple[int, Any]]:
        """The built model's `method(*inputs(k))` for k < count on the actors; yields (k, result) once per k, as
        they finish (a lost actor's chunks are rerun on the others)."""
        yield from self._spread(count, lambda actor, k: actor.call.remote(method, *inputs(k)), check, stage)

    def _spread(self, count: int, send: Callable[[Any, int], Any], check: Callable[[], None] | None,
                stage: str) -> Iterator[tuple[int, Any]]:
        ray = self.ray
        queue = ChunkQueue(count, self.live)
        pending: dict = {}  # ObjectRef -> (chunk index, actor index)
        try:
            while not queue.finished:
                for k, a in queue.hand_out():
                    pending[send(self.actors[a], k)] = (k, a)
                if not pending:
                    raise LongEditError(f"All {len(self.actors)} Ray workers were lost during {stage}.",
                                        "check the workers' log (ray logs: out of memory? node down?), then run "
                                        "the edit again: it resumes from the last completed step.")
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
                if check is not None:
                    check()
                for ref in ready:
                    k, a = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayActorError:
                        self.lose(queue, a, pending)
                        continue
                    if queue.complete(k, a):
                        yield k, result
        except BaseException:
            self.close()
            raise

    def broadcasts(self, actor: int) -> bool:
        group = self.host_groups[actor]
        return group is not None and group.node not in self.broken_hosts

    def record_receipts(self) -> list[dict]:
        """How each actor got each step's record so far ({"step", "seconds", "via"}), for those answered."""
        ready, self.receipts = self.ray.wait(self.receipts, num_returns=len(self.receipts), timeout=0) \
            if self.receipts else ([], [])
        done = []
        for ref in ready:
            with contextlib.suppress(Exception):  # a lost actor's; its chunks' loss is handled where they fail
                done.append(self.ray.get(ref))
        return done

    def lose(self, queue: ChunkQueue, actor: int, pending: dict) -> None:
        """An actor died: its chunks go to the others; its other answers in flight are dropped; its host's group
        is not used again."""
        if actor not in self.lost:
            self.lost.append(actor)
        if self.host_groups[actor] is not None:
            self.broken_hosts.add(self.host_groups[actor].node)
        queue.lose(actor)
        for ref in [r for r, (_, a) in pending.items() if a == actor]:
            del pending[ref]

    def gpu_peaks(self) -> list[int]:
        """Each live actor's peak GPU allocation so far."""
        return self.ray.get([self.actors[i].gpu_peak.remote() for i in self.live])

    def memory_reports(self) -> list[dict]:
        """Each live actor's MemoryLog (benchmarks)."""
        return self.ray.get([self.actors[i].memory_report.remote() for i in self.live])

    def close(self) -> None:
        """Stop every actor (Cancel, failure, or the end of the run): their GPU memory is freed now."""
        for actor in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(actor, no_restart=True)
        self.actors = []  # `lost` stays: which actors died during the run


class WarmPools:
    """Pools kept between stages and runs, their actors up but holding no model, for `idle_s` seconds: the next
    stage with the same options and command line loads its model into running actors instead of starting new
    ones (a process, ComfyUI's import, a CUDA context each: ~10 s on one H200). One pool per key; after `idle_s`
    unused, its actors stop."""

    def __init__(self, idle_s: float):
        self.idle_s = idle_s
        self.kept: dict = {}  # (options, prelude) -> (pool, its stop timer)
        self.lock = threading.Lock()

    def take(self, options: ScaleOptions, prelude: Prelude) -> WorkerPool | None:
        """The warm pool for these options, if its actors all still answer (else it is stopped): no longer kept."""
        with self.lock:
            entry = self.kept.pop((options, prelude), None)
        if entry is None:
            return None
        pool, timer = entry
        timer.cancel()
        if pool.answers():
            return pool
        pool.close()
        return None

    def keep(self, pool: WorkerPool) -> None:
        """After a completed stage: the actors drop their model and wait for the next stage. A pool that lost an
        actor is stopped instead (one that dies while kept is found by `take`)."""
        if pool.lost or not pool.actors:
            pool.close()
            return
        pool.unload()
        key = (pool.options, pool.prelude)
        timer = threading.Timer(self.idle_s, self.expire, args=(key, pool))
        timer.daemon = True
        with self.lock:
            old = self.kept.pop(key, None)
            self.kept[key] = (pool, timer)
        if old is not None:
            old[1].cancel()
            old[0].close()
        timer.start()

    def expire(self, key, pool: WorkerPool) -> None:
        with self.lock:
            if self.kept.get(key, (None,))[0] is not pool:
                return  # taken (or replaced) meanwhile
            del self.kept[key]
        pool.close()

    def close_all(self) -> None:
        with self.lock:
            entries, self.kept = list(self.kept.values()), {}
        for pool, timer in entries:
            timer.cancel()
            pool.close()
