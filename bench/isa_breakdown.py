"""Benchmark: where ISA's time goes at the two in-context shapes, and the Triton kernel's launch settings.

For 1x12x65,520 and 1x40x151,200 (context = second half, bf16, d 128, default ratios, Gaussian inputs as
bench/isa_attention.py times them) it times, each as the median of triton.testing.do_bench:
  * the plan, whole and stage by stage (pooling, context pre-selection, kept coarse scores, sharpness
    routing, near-block top-k);
  * the sharp rows: packing the sharp query blocks, packing the kept K and V tokens, cuDNN over them,
    writing the result back; and the whole `sharp_rows` call;
  * the Taylor rows in Triton for every setting in the sweep (KV blocks per softmax step, pooled tokens per
    step, warps, pipeline stages), with the useful TFLOP/s;
  * the split path (sharp rows, then Taylor rows), and the whole `isa_attention` call (plan with Triton
    pooling + split path), against cuDNN SDPA on the full sequence.

Run:  python bench/isa_breakdown.py [--quick]     (CUDA)
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from isa_attention import bench, import_pack  # noqa: E402
from isa_inputs import gaussian  # noqa: E402

SHAPES = [(12, 65520), (40, 151200)]
SWEEP = {"TMA": (False, True), "PAIR": (1, 2), "BLOCK_P": (32, 64, 128), "num_warps": (4, 8),
         "num_stages": (2, 3, 4)}
QUICK = {"TMA": (False, True), "PAIR": (1,), "BLOCK_P": (64,), "num_warps": (4, 8), "num_stages": (2, 3, 4)}


def configs(quick: bool):
    sweep = QUICK if quick else SWEEP
    for values in itertools.product(*sweep.values()):
        yield dict(zip(sweep, values))


def graph_time(fn) -> float | None:
    """Milliseconds of fn's GPU work alone: fn captured once in a CUDA graph and replayed, so no host-side
    launch time is counted (None if fn cannot be captured)."""
    try:
        fn()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return bench(graph.replay)
    except Exception as e:  # e.g. a host round trip inside fn
        print(f"graph capture failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smaller launch-settings sweep")
    args = ap.parse_args()
    import_pack()
    from longedit.kernels import isa_attention, plan_isa_fast
    from longedit.kernels import isa_reference as ref
    from longedit.kernels.isa import isa_attention_triton, pool_qkv_triton
    from longedit.kernels.isa_split import (dense_attention, gather_kept_tokens, isa_attention_split,
                                            copy_row_blocks, packed_starts, sharp_rows)

    stage_rows, sweep_rows = [], []
    for heads, n in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (t.to(torch.bfloat16) for t in gaussian(heads, n, g, "cuda"))
        ctx = (n // 2, n)
        plan = ref.plan_isa(q, k, v, *ctx)
        layout, kept, size = plan.layout, plan.kept_blocks, plan.layout.block_size
        pq, pk = ref.pool_blocks(q, layout), ref.pool_blocks(k, layout)
        kept_scores = ref.coarse_scores(pq, ref.gather_blocks(pk, kept))
        log_counts = layout.count.float().log()[kept]
        sharpness = ref.query_sharpness(kept_scores, log_counts)
        exact_query = ref.select_exact_queries(sharpness, 0.5)
        n_sharp = plan.sharp_blocks.shape[-1]

        def near():
            scores = ref.coarse_scores(ref.gather_blocks(pq, plan.taylor_blocks), ref.gather_blocks(pk, kept))
            return scores.topk(plan.n_near, dim=-1, sorted=False).indices

        t = {"cudnn": bench(lambda: dense_attention(q, k, v)),
             "plan (torch pooling)": bench(lambda: ref.plan_isa(q, k, v, *ctx)),
             "plan (Triton pooling)": bench(lambda: plan_isa_fast(q, k, v, *ctx)),
             "pool q, k, v (torch)": bench(lambda: [ref.pool_blocks(x, layout) for x in (q, k, v)]),
             "pool q, k, v (Triton)": bench(lambda: pool_qkv_triton(q, k, v, layout)),
             "pre-selection": bench(lambda: ref.select_kv_blocks(ref.context_saliency(pq, pk, layout), layout, 0.125)),
             "kept scores": bench(lambda: ref.coarse_scores(pq, ref.gather_blocks(pk, kept))),
             "sharpness + routing": bench(lambda: ref.select_exact_queries(ref.query_sharpness(kept_scores, log_counts), 0.5)),
             "split queries": bench(lambda: ref.split_queries(exact_query, n_sharp)),
             "near top-k": bench(near)}
        start, count = layout.start[plan.sharp_blocks], layout.count[plan.sharp_blocks]
        packed = packed_starts(plan.sharp_blocks, size)
        rows = q.new_empty(1, heads, n_sharp * size, q.shape[-1])
        keys, values = gather_kept_tokens(k, plan), gather_kept_tokens(v, plan)
        out = torch.empty_like(q)
        result = dense_attention(rows, keys, values)
        t["pack sharp q"] = bench(lambda: copy_row_blocks(q, start, rows, packed, count, size, zero_fill=True))
        t["pack kept k, v"] = bench(lambda: (gather_kept_tokens(k, plan), gather_kept_tokens(v, plan)))
        t["cuDNN on packed"] = bench(lambda: dense_attention(rows, keys, values))
        t["write back"] = bench(lambda: copy_row_blocks(result, packed, out, start, count, size))
        t["sharp rows (all)"] = bench(lambda: sharp_rows(q, k, v, plan, out))
        t["Taylor rows (default)"] = bench(lambda: isa_attention_triton(q, k, v, plan, out=out, sharp=False))
        t["split"] = bench(lambda: isa_attention_split(q, k, v, plan))
        t["isa_attention (plan + split)"] = bench(lambda: isa_attention(q, k, v, *ctx))
        t["plan, GPU time alone (CUDA graph)"] = graph_time(lambda: plan_isa_fast(q, k, v, *ctx))
        t["isa_attention, GPU time alone (CUDA graph)"] = graph_time(lambda: isa_attention(q, k, v, *ctx))
        n_taylor_rows = plan.taylor_blocks.numel() * size
        taylor_flop = 4 * q.shape[-1] * n_taylor_rows * (plan.n_near * size + plan.n_kept)
        for name, ms in t.items():
            if ms is None:
                stage_rows.append(f"1x{heads}x{n:,} | {name} | n/a | capture failed")
                continue
            extra = f"{t['cudnn'] / ms:.2f}x of cuDNN" if name in ("split", "isa_attention (plan + split)") else ""
            if name.startswith("Taylor"):
                extra = f"{taylor_flop / ms / 1e9:.0f} TFLOP/s useful"
            stage_rows.append(f"1x{heads}x{n:,} | {name} | {ms:.3f} | {extra}")
        print("\n".join(stage_rows[-len(t):]), flush=True)
        for config in configs(args.quick):
            try:
                ms = bench(lambda: isa_attention_triton(q, k, v, plan, out=out, sharp=False, config=config))
            except Exception as e:  # e.g. out of shared memory for a setting
                print(f"{config}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            sweep_rows.append((heads, n, config, ms, taylor_flop / ms / 1e9))
            print(f"1x{heads}x{n:,} Taylor {config}: {ms:.3f} ms", flush=True)
        del q, k, v, plan, keys, values, rows, out, result, kept_scores
        torch.cuda.empty_cache()

    print(f"\nISA time breakdown, bf16, d 128, default ratios, {torch.cuda.get_device_name()}")
    print("shape | stage | ms | note")
    print("--- | --- | --- | ---")
    print("\n".join(stage_rows))
    print("\nTriton Taylor rows, launch settings (best 6 per shape)")
    print("shape | TMA | PAIR | BLOCK_P | warps | stages | ms | useful TFLOP/s")
    print("--- | --- | --- | --- | --- | --- | --- | ---")
    for shape in SHAPES:
        best = sorted((r for r in sweep_rows if (r[0], r[1]) == shape), key=lambda r: r[3])[:6]
        for heads, n, c, ms, rate in best:
            print(f"1x{heads}x{n:,} | {c['TMA']} | {c['PAIR']} | {c['BLOCK_P']} | {c['num_warps']} | {c['num_stages']} | "
                  f"{ms:.3f} | {rate:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
