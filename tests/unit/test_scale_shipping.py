"""The model's way to the actors (core/scale/shipping): every tensor comes back as torch's own pickling gives it
(type, dtype, shape, strides, offset, requires_grad, bits), its bytes travel beside the pickle stream rather
than in it, and what an actor unpacks owns its memory (Ray hands it read-only shared-memory buffers)."""
import os
import pickle

import numpy as np
import pytest
import torch

if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
    import ray  # CI installs requirements-test.txt: Ray missing there is a failure, not a skip
else:
    ray = pytest.importorskip("ray")

from longedit.core.scale import shipping


def cloudpickler():
    return ray.cloudpickle


def sample_objects(seed: int) -> dict:
    """Tensors of every kind a model holds, odd sizes, on fresh random values."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(7, 13, generator=g)
    module = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.BatchNorm1d(3)).train(False)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        module[1].running_mean.copy_(torch.randn(3, generator=g))
    weird = torch.randn(4, 3, generator=g)
    weird[0, 0], weird[1, 1], weird[2, 2] = float("nan"), float("inf"), -0.0
    shared = torch.randn(9, generator=g).half()
    return {
        "param": torch.nn.Parameter(torch.randn(3, 11, generator=g)),
        "frozen": torch.nn.Parameter(torch.randn(2, 2, generator=g), requires_grad=False),
        "bf16": torch.randn(6, 5, generator=g).to(torch.bfloat16),
        "transposed": base.t(),  # non-contiguous
        "offset": base[2:5, 3:],  # a view with a storage offset
        "int8": torch.randint(-128, 127, (17,), generator=g, dtype=torch.int8),
        "bool": torch.rand(5, 2, generator=g) > 0.5,
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(3.25, dtype=torch.float64),
        "specials": weird,
        "module": module,
        "same": [shared, shared],  # one object twice
        "plain": {"text": "kept", "number": 7},
    }


def tensors_of(obj, path=""):
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, torch.nn.Module):
        yield from ((f"{path}.{k}", v) for k, v in obj.state_dict(keep_vars=True).items())
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors_of(v, f"{path}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors_of(v, f"{path}[{i}]")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0:
        return b.numel() == 0
    if a.dtype == torch.bool:
        return torch.equal(a, b)
    return torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))


def read_only(buffers):
    """As Ray hands them to an actor: read-only arrays over memory the actor does not own."""
    copies = [np.frombuffer(bytes(memoryview(b)), dtype=np.uint8) for b in buffers]
    assert all(not c.flags.writeable for c in copies if c.size)
    return copies


@pytest.mark.parametrize("seed", [0, 1])
def test_every_tensor_comes_back_as_torch_pickles_it(seed):
    original = sample_objects(seed)
    expected = pickle.loads(pickle.dumps(original))  # torch's own pickling: the reference
    got = shipping.unpack(shipping.pack(original, cloudpickler()))
    pairs_expected, pairs_got = list(tensors_of(expected)), list(tensors_of(got))
    assert [p for p, _ in pairs_got] == [p for p, _ in pairs_expected] and len(pairs_got) == 19
    for (path, want), (_, have) in zip(pairs_expected, pairs_got):
        assert type(have) is type(want), path
        assert (have.dtype, have.shape, have.stride(), have.storage_offset(), have.requires_grad) == \
            (want.dtype, want.shape, want.stride(), want.storage_offset(), want.requires_grad), path
        assert same_bits(have, want), path
    assert got["same"][0] is got["same"][1]  # pickle's memo still holds: one object stays one
    assert got["plain"] == original["plain"]
    x = torch.randn(2, 5)
    assert torch.equal(got["module"](x), original["module"](x))


def test_the_weights_travel_beside_the_stream_not_in_it():
    weights = torch.nn.Linear(1024, 1023)  # 4 MiB of weights, a vector of odd length
    stream, buffers = shipping.pack({"model": weights, "note": "x" * 100}, cloudpickler())
    weight_bytes = sum(t.untyped_storage().nbytes() for t in weights.state_dict().values())
    assert sum(b.nbytes for b in buffers) == weight_bytes  # each storage once, whole
    assert len(stream) < 4096  # what plain pickling would carry: the 4 MiB itself
    assert len(pickle.dumps(weights)) > weight_bytes


def test_what_an_actor_unpacks_owns_its_memory():
    original = {"w": torch.nn.Parameter(torch.randn(8, 3)), "b": torch.arange(5, dtype=torch.int16)}
    stream, buffers = shipping.pack(original, cloudpickler())
    arrived = read_only(buffers)
    got = shipping.unpack((stream, arrived))
    before = [a.copy() for a in arrived]
    with torch.no_grad():
        got["w"].add_(1.0)  # writable, even though what arrived is read-only
        got["b"][0] = 99
    assert torch.equal(got["w"], original["w"] + 1.0) and int(got["b"][0]) == 99
    assert all(np.array_equal(a, b) for a, b in zip(arrived, before))  # the object store's bytes untouched
    del arrived, before
    assert torch.equal(got["b"][1:], original["b"][1:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_tensors_come_back_on_the_actors_gpu():
    original = {"w": torch.randn(33, 7, device="cuda").half(), "cpu": torch.randn(4)}
    got = shipping.unpack((lambda s, b: (s, read_only(b)))(*shipping.pack(original, cloudpickler())))
    assert got["w"].device.type == "cuda" and got["cpu"].device.type == "cpu"
    assert same_bits(got["w"].cpu(), original["w"].cpu()) and same_bits(got["cpu"], original["cpu"])
