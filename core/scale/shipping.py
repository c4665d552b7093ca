"""The model's way to the Ray actors: its tensors' bytes out of band, the rest pickled.

Plain pickling turns every tensor storage into a torch.save'd bytes string inside the pickle: the sampling
process copies the weights into that string, Ray copies the string into its object store, and each actor
copies it out again and then unpickles a fourth copy (measured on this project's 2-core CI machine for 1.7 GB
of weights: 32 s to put, 31 s per actor to unpickle; on one H200 an SD2.1 actor took 29 s to start).

Here each storage travels as a pickle protocol 5 buffer: Ray keeps such buffers in its shared-memory object
store as they are, once per host, and an actor reads them without a copy; an actor's own copy is made once,
straight onto its GPU where the storage came from a GPU. Tensors are rebuilt by torch's own rebuild functions
(views, strides, Parameters, requires_grad, tensor subclasses), so only the storages' transport changes.
"""
from __future__ import annotations

import io
import pickle
import warnings
from typing import Any

import numpy as np
import torch

# Devices whose storages go out of band; others (meta, XLA, ...) keep torch's own pickling.
SHIPPED_DEVICES = ("cpu", "cuda")


def rebuild_storage(data, dtype: torch.dtype, device_type: str) -> torch.storage.TypedStorage:
    """A storage from its bytes (`data`: a buffer, read-only where Ray's object store holds it): a private copy
    on this process's GPU when it came from a GPU and one is here, else in host memory."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a read-only buffer: read only, then copied
        raw = torch.frombuffer(data, dtype=torch.uint8) if memoryview(data).nbytes else torch.empty(0, dtype=torch.uint8)
        if device_type == "cuda" and torch.cuda.is_available():
            raw = raw.to(torch.device("cuda", torch.cuda.current_device()))
        else:
            raw = raw.clone()  # own memory: writable, and independent of the object store's
        return torch.storage.TypedStorage(wrap_storage=raw.untyped_storage(), dtype=dtype, _internal=True)


def storage_bytes(storage: torch.storage.TypedStorage) -> np.ndarray:
    """The storage's bytes as a host array (a copy for a GPU storage)."""
    untyped = storage._untyped_storage.cpu()
    return torch.empty(0, dtype=torch.uint8).set_(untyped).numpy()


def storage_pickler(cloudpickle):
    """A CloudPickler (of Ray's cloudpickle, so that what must travel by value still does) that reduces tensor
    storages to out-of-band buffers."""

    class StoragePickler(cloudpickle.CloudPickler):
        def reducer_override(self, obj):
            if type(obj) is torch.storage.TypedStorage:
                device_type = obj._untyped_storage.device.type
                if device_type in SHIPPED_DEVICES:
                    return rebuild_storage, (pickle.PickleBuffer(storage_bytes(obj)), obj.dtype, device_type)
            return super().reducer_override(obj)

    return StoragePickler


def pack(obj: Any, cloudpickle=None) -> tuple[bytes, list[np.ndarray]]:
    """`obj` pickled with its tensors' bytes apart: (the pickle stream, one byte array per storage). Put the
    pair into Ray's object store as it is; `unpack` it where it arrives."""
    if cloudpickle is None:
        from ray import cloudpickle
    buffers: list[pickle.PickleBuffer] = []
    stream = io.BytesIO()
    storage_pickler(cloudpickle)(stream, protocol=5, buffer_callback=buffers.append).dump(obj)
    return stream.getvalue(), [np.frombuffer(b, dtype=np.uint8) for b in buffers]


def unpack(packed: tuple[bytes, list]) -> Any:
    stream, buffers = packed
    return pickle.loads(stream, buffers=buffers)
