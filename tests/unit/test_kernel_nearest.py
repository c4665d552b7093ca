"""The nearest-neighbour kernel against its float32 reference and against a dense float64 arg-max."""
import os

import pytest
import torch

from longedit.kernels import HAVE_TRITON
from longedit.kernels.nearest_reference import nearest_reference


def dense(query, keys):
    s = query.double() @ keys.double().transpose(1, 2)
    score, index = s.max(dim=2)
    return index.to(torch.int32), score


def normalised(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    return torch.nn.functional.normalize(x, dim=-1).to(dtype)


@pytest.mark.parametrize("b, m, n, d", [(1, 1, 1, 3), (2, 37, 53, 7), (1, 130, 257, 64), (3, 65, 1000, 128)])
@pytest.mark.parametrize("chunks", [(1024, 4096), (16, 7)])
def test_reference_matches_dense_float64(b, m, n, d, chunks):
    q, k = normalised(b, m, d, seed=1), normalised(b, n, d, seed=2)
    index, score = nearest_reference(q, k, *chunks)
    ref_index, ref_score = dense(q, k)
    assert torch.equal(index, ref_index)
    assert torch.allclose(score.double(), ref_score, atol=1e-5)


def test_reference_ties_go_to_the_lowest_index():
    q = torch.ones(1, 2, 4)
    k = torch.ones(1, 9, 4)
    index, _ = nearest_reference(q, k, chunk_n=2)
    assert index.tolist() == [[0, 0]]


needs_triton = pytest.mark.skipif(not HAVE_TRITON or os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="the interpreter check needs triton and TRITON_INTERPRET=1 (set by conftest "
                                         "on machines without CUDA; the gpu tier checks the compiled kernel)")


@needs_triton
@pytest.mark.parametrize("b, m, n, d", [(1, 1, 1, 3), (2, 37, 53, 7), (1, 70, 130, 64), (2, 65, 77, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_reference_in_the_interpreter(b, m, n, d, dtype):
    from longedit.kernels.nearest import nearest_triton

    q, k = normalised(b, m, d, dtype=dtype, seed=3), normalised(b, n, d, dtype=dtype, seed=4)
    index, score = nearest_triton(q, k)
    ref_index, ref_score = nearest_reference(q, k)
    assert torch.allclose(score, ref_score, atol=1e-3 if dtype == torch.float16 else 1e-5)
    # Indices agree wherever the best match is not a near-tie at this precision.
    s = q.float() @ k.float().transpose(1, 2)
    top2 = s.topk(min(2, n), dim=2).values
    clear = (top2[..., 0] - top2[..., -1] > 1e-2) if n > 1 else torch.ones_like(index, dtype=torch.bool)
    assert torch.equal(index[clear], ref_index[clear])
    assert clear.float().mean() > 0.5
