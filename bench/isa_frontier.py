"""Benchmark: ISA's speed-error frontier over its ratios at the two in-context shapes.

For 1x12x65,520 and 1x40x151,200 (context = second half, bf16, d 128) on the structured inputs (b) of
bench/isa_inputs.py, every (alpha_f, alpha_ns) of a small grid at alpha_s 0.125: one `isa_attention` call
timed (median of triton.testing.do_bench), its speedup over the fastest dense SDPA backend timed on the same
inputs, and its relative L2 error against exact float32 attention on 8,192 evenly spaced query rows.
The node's defaults are alpha_f 0.5, alpha_ns 0.0625; this shows what the other settings trade.

Run:  python bench/isa_frontier.py      (CUDA)
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from isa_attention import bench, exact, import_pack, rel, sample_rows, sdpa  # noqa: E402
from isa_inputs import structured  # noqa: E402

SHAPES = [(12, 65520), (40, 151200)]
ALPHA_F = (0.5, 0.4375, 0.40625, 0.375)
ALPHA_NS = (0.0625, 0.09375, 0.125)


def main() -> int:
    import_pack()
    from longedit.kernels import isa_attention

    backends = torch.nn.attention.SDPBackend
    rows = []
    for heads, n in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (t.to(torch.bfloat16) for t in structured(heads, n, True, g, "cuda"))
        ctx = (n // 2, n)
        picked = sample_rows(n)
        ref = exact(q, k, v, picked)
        fastest = min(bench(sdpa(backends.CUDNN_ATTENTION), q, k, v), bench(sdpa(backends.FLASH_ATTENTION), q, k, v))
        for alpha_f in ALPHA_F:
            for alpha_ns in ALPHA_NS:
                ratios = dict(alpha_f=alpha_f, alpha_ns=alpha_ns)
                ms = bench(lambda: isa_attention(q, k, v, *ctx, **ratios))
                err = rel(isa_attention(q, k, v, *ctx, **ratios), ref, picked)
                rows.append(f"1x{heads}x{n:,} | {alpha_f} | {alpha_ns} | {ms:.1f} | {fastest:.1f} | "
                            f"{fastest / ms:.2f}x | {err:.2e}")
                print(rows[-1], flush=True)
        del q, k, v, ref
        torch.cuda.empty_cache()
    print(f"\nISA speed-error frontier on the structured inputs (b), alpha_s 0.125, b 64, bf16, d 128, "
          f"{torch.cuda.get_device_name()}")
    print("shape | alpha_f | alpha_ns | ISA ms | fastest dense ms | speedup | rel L2 err (b)")
    print("--- | --- | --- | --- | --- | --- | ---")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
