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


@pytest.mark.parametrize("frames, tokens, heads, d, keep", [(3, 37, 2, 40, 70), (20, 4032, 5, 64, 20 * 1008),
                                                            (8, 1008, 10, 64, 3000), (4, 252, 8, 128, 900)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_subset_attention_matches_reference(frames, tokens, heads, d, keep, dtype):
    from longedit.kernels.aas import subset_attention_triton
    from longedit.kernels.aas_reference import subset_attention_reference

    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(frames, tokens, heads * d, device="cuda", generator=g).to(dtype)
    k = torch.randn(frames * tokens, heads * d, device="cuda", generator=g).to(dtype)
    v = torch.randn(frames * tokens, heads * d, device="cuda", generator=g).to(dtype)
    sel = torch.stack([torch.randperm(frames * tokens, device="cuda", generator=g)[:keep] for _ in range(frames)])
    out = subset_attention_triton(q, k, v, sel.int(), heads)
    ref = subset_attention_reference(q.float(), k.float(), v.float(), sel, heads)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < (1e-2 if dtype == torch.bfloat16 else 2e-3), err
