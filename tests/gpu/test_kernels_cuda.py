"""Compiled Triton kernels on CUDA against their float32 references, over odd and realistic shapes."""
import pytest
import torch

from longedit.kernels.nearest import nearest_triton
from longedit.kernels.nearest_reference import nearest_reference


@pytest.mark.parametrize("b, m, n, d", [(1, 1, 1, 3), (2, 37, 53, 7), (3, 4032, 4032, 64), (2, 1008, 3000, 1280)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nearest_matches_reference(b, m, n, d, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(b, m, d, device="cuda", generator=g), dim=-1).to(dtype)
    k = torch.nn.functional.normalize(torch.randn(b, n, d, device="cuda", generator=g), dim=-1).to(dtype)
    index, score = nearest_triton(q, k)
    ref_index, ref_score = nearest_reference(q, k)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert torch.allclose(score, ref_score, atol=tol)
    s = q.float() @ k.float().transpose(1, 2)
    top2 = s.topk(min(2, n), dim=2).values
    clear = (top2[..., 0] - top2[..., -1] > 4 * tol) if n > 1 else torch.ones_like(index, dtype=torch.bool)
    assert torch.equal(index[clear], ref_index[clear])
