"""Which actors broadcast the keyframe record among themselves, over what (core/scale/transport), and the record's
flattening into tensors for torch.distributed, against expectations written out by hand."""
import pytest
import torch

from longedit.core.scale.transport import (AUTO, COLLECTIVE, OBJECT_STORE, HostGroup, Placement, flatten,
                                           plan_host_groups, specs_of, unflatten)

# node a: 3 actors with a GPU each; b: 2 actors sharing one GPU; c: one actor; d: 2 CPU actors. Interleaved, as
# Ray may place them.
PLACEMENTS = [Placement("a", "10.0.0.1", "GPU-0"), Placement("b", "10.0.0.2", "GPU-7"),
              Placement("a", "10.0.0.1", "GPU-1"), Placement("c", "10.0.0.3", "GPU-0"),
              Placement("b", "10.0.0.2", "GPU-7"), Placement("d", "10.0.0.4", None),
              Placement("a", "10.0.0.1", "GPU-2"), Placement("d", "10.0.0.4", None)]


def test_auto_groups_only_actors_with_a_gpu_of_their_own_over_nccl():
    assert plan_host_groups(PLACEMENTS, AUTO) == [
        HostGroup("a", 0, 3, "nccl"), None, HostGroup("a", 1, 3, "nccl"), None, None, None,
        HostGroup("a", 2, 3, "nccl"), None]


def test_torch_distributed_also_groups_shared_gpus_and_cpus_over_gloo():
    assert plan_host_groups(PLACEMENTS, COLLECTIVE) == [
        HostGroup("a", 0, 3, "nccl"), HostGroup("b", 0, 2, "gloo"), HostGroup("a", 1, 3, "nccl"), None,
        HostGroup("b", 1, 2, "gloo"), HostGroup("d", 0, 2, "gloo"), HostGroup("a", 2, 3, "nccl"),
        HostGroup("d", 1, 2, "gloo")]


def test_a_gpu_shared_by_two_of_three_actors_makes_the_host_gloo():
    placements = [Placement("a", "ip", "GPU-0"), Placement("a", "ip", "GPU-1"), Placement("a", "ip", "GPU-1")]
    assert plan_host_groups(placements, AUTO) == [None] * 3
    assert [g.backend for g in plan_host_groups(placements, COLLECTIVE)] == ["gloo"] * 3


def test_the_object_store_groups_nobody_and_an_unknown_transport_is_refused():
    assert plan_host_groups(PLACEMENTS, OBJECT_STORE) == [None] * len(PLACEMENTS)
    with pytest.raises(ValueError, match="unknown record transport"):
        plan_host_groups(PLACEMENTS, "nccl")


def test_a_record_flattens_to_its_tensors_in_order_and_back():
    g = torch.Generator().manual_seed(3)
    layers = {("down", 1): torch.randn(4, 3, 7, 5, generator=g).half(), "mid": torch.randn(4, 3, 2, 9, generator=g),
              ("up", 0): [torch.arange(6, dtype=torch.int64), (torch.ones(1, dtype=torch.bool), 2.5)]}
    payload = (4, layers)
    skeleton, tensors = flatten(payload)
    expected = [layers[("down", 1)], layers["mid"], layers[("up", 0)][0], layers[("up", 0)][1][0]]
    assert len(tensors) == 4 and all(t is e for t, e in zip(tensors, expected))
    assert [(s.shape, s.dtype) for s in specs_of(skeleton)] == [(tuple(e.shape), e.dtype) for e in expected]
    assert skeleton[0] == 4 and skeleton[1][("up", 0)][1][1] == 2.5
    copies = [t.clone() for t in tensors]
    rebuilt = unflatten(skeleton, copies)
    assert rebuilt[0] == 4 and list(rebuilt[1]) == list(layers)
    assert rebuilt[1]["mid"] is copies[1] and rebuilt[1][("up", 0)][1][0] is copies[3]
    assert isinstance(rebuilt[1][("up", 0)], list) and isinstance(rebuilt[1][("up", 0)][1], tuple)
