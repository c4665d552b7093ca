"""The step's keyframe record, from the sampling process to every actor.

The sampling process puts the record into Ray's object store once per step. Across hosts each actor reads it
from there. Among the actors of one host, one (the host's leader) reads it and broadcasts it to the others over
torch.distributed: NCCL when every actor of the host has a GPU of its own, gloo otherwise (CPU actors, or actors
sharing a GPU; only when asked for: there the object store's shared memory is the shorter way).

A host whose group broke (an actor lost, a collective failed or timed out) falls back to the object store for
the rest of the run; the record is always there, so a failed broadcast costs time, never a result.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import time
from datetime import timedelta
from typing import Any

import torch

AUTO, COLLECTIVE, OBJECT_STORE = "auto", "torch.distributed", "object store"
TRANSPORTS = (AUTO, COLLECTIVE, OBJECT_STORE)
FELL_BACK = "object store, after a failed broadcast"
# A collective waits this long for every actor of the host (one may still finish a chunk of the previous step).
COLLECTIVE_TIMEOUT_S = 300


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where an actor runs: its Ray node, that node's IP address, and its GPU (a device UUID; None on the CPU)."""
    node: str
    ip: str
    gpu: str | None


@dataclasses.dataclass(frozen=True)
class HostGroup:
    """An actor's part in its host's record broadcast: rank 0 reads the object store and sends."""
    node: str
    rank: int
    size: int
    backend: str  # "nccl" or "gloo"


def plan_host_groups(placements: list[Placement], transport: str) -> list[HostGroup | None]:
    """Per actor, its host group (None: it reads the object store). Hosts with one actor have no group. `auto`
    uses NCCL where every actor of a host has a GPU of its own and the object store elsewhere; `torch.distributed`
    also groups CPU actors and actors sharing a GPU, over gloo."""
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown record transport {transport!r}; one of {TRANSPORTS}")
    groups: list[HostGroup | None] = [None] * len(placements)
    if transport == OBJECT_STORE:
        return groups
    for node in dict.fromkeys(p.node for p in placements):
        members = [i for i, p in enumerate(placements) if p.node == node]
        gpus = [placements[i].gpu for i in members]
        own_gpus = None not in gpus and len(set(gpus)) == len(gpus)
        if len(members) < 2 or (transport == AUTO and not own_gpus):
            continue
        for rank, i in enumerate(members):
            groups[i] = HostGroup(node, rank, len(members), "nccl" if own_gpus else "gloo")
    return groups


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


def map_leaves(item: Any, leaf: type, fn) -> Any:
    """`item` rebuilt with fn(x) for every `leaf` instance x in its lists, tuples and dict values."""
    if isinstance(item, leaf):
        return fn(item)
    if isinstance(item, (list, tuple)):
        return type(item)(map_leaves(x, leaf, fn) for x in item)
    if isinstance(item, dict):
        return {k: map_leaves(v, leaf, fn) for k, v in item.items()}
    return item


def flatten(payload: Any) -> tuple[Any, list[torch.Tensor]]:
    """The payload with every tensor replaced by its TensorSpec (small, pickled), and the tensors in order."""
    tensors: list[torch.Tensor] = []

    def spec(tensor):
        tensors.append(tensor)
        return TensorSpec(tuple(tensor.shape), tensor.dtype)

    return map_leaves(payload, torch.Tensor, spec), tensors


def specs_of(skeleton: Any) -> list[TensorSpec]:
    """The TensorSpecs of a skeleton, in flatten's order."""
    specs: list[TensorSpec] = []
    map_leaves(skeleton, TensorSpec, specs.append)
    return specs


def unflatten(skeleton: Any, tensors: list[torch.Tensor]) -> Any:
    """flatten's inverse: the tensors back in place of their specs."""
    supply = iter(tensors)
    return map_leaves(skeleton, TensorSpec, lambda _: next(supply))


def rendezvous_address() -> str:
    """tcp://ip:port of a port free on this machine now (for a host group's leader)."""
    import ray

    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    return f"tcp://{ray.util.get_node_ip_address()}:{port}"


class RecordReceiver:
    """An actor's end: its host group (when it has one) and the last record it received."""

    def __init__(self):
        self.group: HostGroup | None = None

    def join(self, group: HostGroup, address: str) -> None:
        import torch.distributed as dist

        if group.backend == "nccl":
            # a collective with a lost peer raises after the timeout instead of ending this process
            os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
        dist.init_process_group(group.backend, init_method=address, world_size=group.size, rank=group.rank,
                                timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        self.group = group

    def receive(self, refs: list, broadcast: bool) -> tuple[Any, dict]:
        """The step's record: over the host group when `broadcast` (the leader reads `refs` and sends), else (or
        when the broadcast fails) from the object store. Returns it and {"seconds", "via"}."""
        import ray

        started, via = time.perf_counter(), OBJECT_STORE
        if broadcast and self.group is not None:
            try:
                payload = self._broadcast(refs)
                return payload, {"seconds": time.perf_counter() - started, "via": self.group.backend}
            except Exception as error:  # a lost peer, a timeout: this actor reads the object store from now on
                self.leave()
                via = FELL_BACK
                print(f"LongEdit: record broadcast failed ({error}); reading Ray's object store instead", flush=True)
        return ray.get(refs[0]), {"seconds": time.perf_counter() - started, "via": via}

    def _broadcast(self, refs: list) -> Any:
        import ray
        import torch.distributed as dist

        device = torch.device("cuda", torch.cuda.current_device()) if self.group.backend == "nccl" else None
        leader = self.group.rank == 0
        skeleton, tensors = flatten(ray.get(refs[0])) if leader else (None, [])
        box = [skeleton]
        dist.broadcast_object_list(box, src=0, device=device)
        if leader:
            for tensor in tensors:
                dist.broadcast(tensor.contiguous() if device is None else tensor.to(device), src=0)
            return unflatten(skeleton, tensors)
        received = []
        for spec in specs_of(box[0]):
            buffer = torch.empty(spec.shape, dtype=spec.dtype, device=device)
            dist.broadcast(buffer, src=0)
            received.append(buffer if device is None else buffer.cpu())
        return unflatten(box[0], received)

    def leave(self) -> None:
        import torch.distributed as dist

        self.group = None
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # a broken group may fail to tear down; it is not used again
                pass

