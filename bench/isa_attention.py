"""Benchmark: ISA sparse attention against the dense backends, one table, same run (bf16, d = 128).

Shapes: 1x12x32,760 (Wan 480p, 81 frames, no context), 1x12x65,520 (in-context 2x, context = second half),
1x40x75,600 (Wan-14B 720p, no context), 1x40x151,200 (in-context 2x, context = second half).
Columns: cuDNN SDPA, FlashAttention SDPA, FlexAttention over ISA's own exact-block pattern (the dense-kernel
equivalent of its sparsity, without the pooled tokens; only where ISA's blocks are a uniform tiling), ISA as
the node runs it (one `isa_attention` call: the plan, then sharp query blocks by cuDNN over gathered tokens
and Taylor blocks by the Triton kernel; the plan and the attention timed alone in brackets), and ISA with
everything in the one Triton kernel; milliseconds (median of triton.testing.do_bench), the speedup of ISA
over the fastest dense backend, and the relative L2 error against exact attention (float32) on (a) Gaussian
q, k, v and (b) the structured generator documented in bench/isa_inputs.py (measured on 8,192 evenly spaced
query rows), with the share of the source queries' attention mass on context tokens in (b).

Times are taken on (a); cuDNN and ISA are also timed on (b), each against the other on the same inputs:
tensor-core kernels run measurably faster on less random data (power draw), so a speedup only compares
times taken on one input. A second table (printed first) times ISA on (b) at smaller alpha_f, with its
error there: the speed-error trade-off the node's alpha_f input controls.

Run:  python bench/isa_attention.py            (CUDA)
"""
from __future__ import annotations

import argparse
import os
import sys
import importlib.util

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from isa_inputs import context_mass, gaussian, structured  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = [(12, 32760, False), (12, 65520, True), (40, 75600, False), (40, 151200, True)]
D = 128


def import_pack():
    spec = importlib.util.spec_from_file_location("longedit", os.path.join(REPO, "__init__.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["longedit"] = module
    spec.loader.exec_module(module)


REFERENCE_ROWS = 8192
TRADE_OFF_ALPHA_F = (0.5, 0.375, 0.25)  # the node's default first


def sample_rows(n: int) -> torch.Tensor:
    """Evenly spaced query rows (source and context alike) on which errors are measured: exact float32
    attention for every row of the largest shape would take longer than the rest of the benchmark."""
    return torch.linspace(0, n - 1, min(n, REFERENCE_ROWS), device="cuda").long()


def exact(q, k, v, rows):
    """Exact attention of the sampled query rows over all keys, in float32."""
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION):
        return F.scaled_dot_product_attention(q[:, :, rows].float(), k.float(), v.float())


def rel(a, b, rows) -> float:
    """Relative L2 error of a's sampled rows against the exact b."""
    return ((a[:, :, rows].float() - b).norm() / b.norm()).item()


def sdpa(backend):
    def run(q, k, v):
        with torch.nn.attention.sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return run


def flex_runner(plan, n: int, block: int):
    """FlexAttention with a BlockMask of ISA's exact blocks (every kept block for sharp query blocks, the near
    blocks for Taylor blocks); None where no equivalent BlockMask exists."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention
    except ImportError:
        return None
    layout = plan.layout
    if any(s[0] % block for s in layout.segments):
        return None  # ISA's blocks do not line up with a uniform tiling of the sequence
    batch, heads, nb = plan.exact_query.shape
    indices = torch.zeros(batch, heads, nb, plan.n_kept, dtype=torch.int32, device=plan.kept_blocks.device)
    counts = torch.zeros(batch, heads, nb, dtype=torch.int32, device=plan.kept_blocks.device)
    sharp_index = plan.sharp_blocks.unsqueeze(-1).expand(-1, -1, -1, plan.n_kept)
    indices.scatter_(2, sharp_index, plan.kept_blocks.unsqueeze(2).expand_as(sharp_index).to(torch.int32))
    counts.scatter_(2, plan.sharp_blocks, plan.n_kept)
    near_blocks = plan.kept_blocks.unsqueeze(2).expand(-1, -1, plan.taylor_blocks.shape[-1], -1).gather(-1, plan.near_slots)
    taylor_index = plan.taylor_blocks.unsqueeze(-1).expand(-1, -1, -1, plan.n_near)
    indices[..., :plan.n_near].scatter_(2, taylor_index, near_blocks.to(torch.int32))
    counts.scatter_(2, plan.taylor_blocks, plan.n_near)
    mask = BlockMask.from_kv_blocks(counts, indices, BLOCK_SIZE=block, seq_lengths=(n, n))
    compiled = torch.compile(flex_attention, dynamic=False)
    options = {"BLOCK_M": block, "BLOCK_N": block}  # the kernel's tiles must divide the mask's blocks
    return lambda q, k, v: compiled(q, k, v, block_mask=mask, kernel_options=options)


def bench(fn, *args) -> float:
    import triton.testing

    return triton.testing.do_bench(lambda: fn(*args), warmup=25, rep=100, return_mode="median")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-flex", action="store_true")
    args = ap.parse_args()
    import_pack()
    from longedit.kernels.isa import isa_attention_triton
    from longedit.kernels import isa_attention, plan_isa_fast
    from longedit.kernels.isa_split import isa_attention_split

    backends = torch.nn.attention.SDPBackend
    rows, trade_rows = [], []
    for heads, n, context in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        ctx = (n // 2, n) if context else (n, n)
        cells, errors = {}, {}
        for kind, make in (("gauss", lambda: gaussian(heads, n, g, "cuda")),
                           ("struct", lambda: structured(heads, n, context, g, "cuda"))):
            q, k, v = (t.to(torch.bfloat16) for t in make())
            picked = sample_rows(n)
            ref = exact(q, k, v, picked)
            plan = plan_isa_fast(q, k, v, *ctx)
            errors[kind] = rel(isa_attention_split(q, k, v, plan), ref, picked)
            errors[kind + "_triton"] = rel(isa_attention_triton(q, k, v, plan), ref, picked)
            cells[kind + "_cudnn"] = bench(sdpa(backends.CUDNN_ATTENTION), q, k, v)
            cells[kind + "_flash"] = bench(sdpa(backends.FLASH_ATTENTION), q, k, v)
            cells[kind + "_fastest"] = min(cells[kind + "_cudnn"], cells[kind + "_flash"])
            cells[kind + "_isa"] = bench(lambda: isa_attention(q, k, v, *ctx))
            if kind == "struct":
                errors["mass"] = context_mass(q, k, ctx[0]) if context else 0.0
                for alpha_f in TRADE_OFF_ALPHA_F if context else ():
                    ms = bench(lambda: isa_attention(q, k, v, *ctx, alpha_f=alpha_f))
                    err = rel(isa_attention(q, k, v, *ctx, alpha_f=alpha_f), ref, picked)
                    trade_rows.append((heads, n, alpha_f, ms, cells["struct_fastest"] / ms, err))
            if kind == "gauss":
                cells["isa_plan"] = bench(lambda: plan_isa_fast(q, k, v, *ctx))
                cells["isa_attn"] = bench(isa_attention_split, q, k, v, plan)
                cells["isa_triton"] = bench(lambda: isa_attention(q, k, v, *ctx, backend="triton"))
                try:
                    flex = None if args.no_flex else flex_runner(plan, n, 64)
                    cells["flex"] = bench(flex, q, k, v) if flex is not None else None
                except Exception as e:  # compilation limits on very long sequences
                    print(f"flex failed at {n}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    cells["flex"] = None
            del q, k, v, ref, plan
            torch.cuda.empty_cache()
        fastest = cells["gauss_fastest"]
        isa_ms, triton_ms = cells["gauss_isa"], cells["isa_triton"]
        flex = f"{cells['flex']:.1f}" if cells["flex"] is not None else "n/a"
        rows.append(f"1x{heads}x{n:,}{' (ctx 2nd half)' if context else ''} | {cells['gauss_cudnn']:.1f} | "
                    f"{cells['gauss_flash']:.1f} | {flex} | {isa_ms:.1f} ({cells['isa_plan']:.1f} / "
                    f"{cells['isa_attn']:.1f}) | {fastest / isa_ms:.2f}x | {triton_ms:.1f} ({fastest / triton_ms:.2f}x) | "
                    f"{cells['struct_cudnn']:.1f} / {cells['struct_isa']:.1f} | "
                    f"{cells['struct_fastest'] / cells['struct_isa']:.2f}x | {errors['gauss']:.2e} | "
                    f"{errors['struct']:.2e} | {errors['mass']:.1%}")
        print(rows[-1] + f"  (one-kernel errors: {errors['gauss_triton']:.2e} / {errors['struct_triton']:.2e})", flush=True)
    print("\nISA at other alpha_f (share of query blocks on exact attention; alpha_s 0.125, alpha_ns 0.0625), "
          "timed and measured on the structured inputs (b), against the fastest dense backend on the same inputs")
    print("shape | alpha_f | ISA ms | speedup vs fastest dense | rel L2 err (b)")
    print("--- | --- | --- | --- | ---")
    for heads, n, alpha_f, ms, speedup, err in trade_rows:
        print(f"1x{heads}x{n:,} | {alpha_f} | {ms:.1f} | {speedup:.2f}x | {err:.2e}")
    print(f"\nISA (alpha_s 0.125, alpha_f 0.5, alpha_ns 0.0625, b 64) vs dense attention, bf16, d 128, "
          f"{torch.cuda.get_device_name()}")
    print("Timed on Gaussian inputs (a), except the two (b) columns: cuDNN and ISA timed on the structured inputs.")
    print("shape | cuDNN ms | Flash ms | Flex (ISA blocks) ms | ISA ms, one call (plan alone / attention alone) "
          "| ISA speedup vs fastest dense | ISA one Triton kernel ms (speedup) | (b) cuDNN / ISA ms | (b) ISA speedup "
          "| rel L2 err (a) Gaussian | rel L2 err (b) structured | (b) context attention mass")
    print("--- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | ---")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
