"""AAS subset attention: reference vs float64 maths, full budget vs exact extended attention, Triton twin."""
import os

import pytest
import torch

from longedit.kernels import HAVE_TRITON
from longedit.kernels.aas_reference import extended_attention_reference, subset_attention_reference


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def inputs(frames, tokens, heads, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(frames, tokens, heads * d, generator=g).to(dtype)
    k = torch.randn(frames * tokens, heads * d, generator=g).to(dtype)
    v = torch.randn(frames * tokens, heads * d, generator=g).to(dtype)
    return q, k, v


def dense64(q, k, v, selection, heads):
    frames, tokens, width = q.shape
    d = width // heads
    out = torch.empty(frames, tokens, width, dtype=torch.float64)
    for i in range(frames):
        ks = k[selection[i].long()].double().view(-1, heads, d).transpose(0, 1)
        vs = v[selection[i].long()].double().view(-1, heads, d).transpose(0, 1)
        qi = q[i].double().view(tokens, heads, d).transpose(0, 1)
        w = torch.softmax(qi @ ks.transpose(1, 2) / d ** 0.5, dim=-1)
        out[i] = (w @ vs).transpose(0, 1).reshape(tokens, width)
    return out


def random_selection(frames, rows, keep, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(rows, generator=g)[:keep] for _ in range(frames)]).to(torch.int32)


@pytest.mark.parametrize("frames, tokens, heads, d, keep", [(1, 1, 1, 8, 1), (3, 37, 2, 40, 50), (5, 66, 5, 64, 97)])
def test_reference_matches_float64(frames, tokens, heads, d, keep):
    q, k, v = inputs(frames, tokens, heads, d)
    sel = random_selection(frames, frames * tokens, keep)
    assert rel(subset_attention_reference(q, k, v, sel, heads, frames_per_chunk=2), dense64(q, k, v, sel, heads)) < 1e-5


@pytest.mark.parametrize("frames, tokens, heads, d", [(4, 24, 2, 32), (7, 66, 5, 64)])
def test_full_budget_equals_exact_extended_attention(frames, tokens, heads, d):
    q, k, v = inputs(frames, tokens, heads, d, seed=1)
    everything = torch.arange(frames * tokens, dtype=torch.int32).expand(frames, -1)
    exact = extended_attention_reference(q.double(), k.double(), v.double(), heads)
    assert rel(subset_attention_reference(q, k, v, everything, heads), exact) < 1e-3
    # the order of the selected tokens does not matter
    shuffled = torch.stack([row[torch.randperm(row.numel())] for row in everything])
    assert rel(subset_attention_reference(q, k, v, shuffled, heads), exact) < 1e-3


needs_interpreter = pytest.mark.skipif(not HAVE_TRITON or os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="needs triton with TRITON_INTERPRET=1 (CPU); CUDA is checked in tests/gpu")


@needs_interpreter
@pytest.mark.parametrize("frames, tokens, heads, d, keep", [(1, 1, 1, 16, 1), (3, 37, 2, 40, 70), (2, 66, 3, 64, 130),
                                                            (2, 20, 1, 128, 33)])
def test_triton_matches_reference_in_the_interpreter(frames, tokens, heads, d, keep):
    from longedit.kernels.aas import subset_attention_triton

    q, k, v = inputs(frames, tokens, heads, d, seed=2)
    sel = random_selection(frames, frames * tokens, keep, seed=3)
    out = subset_attention_triton(q, k, v, sel, heads)
    assert rel(out, dense64(q, k, v, sel, heads)) < 1e-4
