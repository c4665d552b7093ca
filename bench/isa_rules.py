"""CPU study: which ranking rules should ISA use? Error of each (saliency, sharpness) pair against exact attention.

Rules (kernels/isa_reference.py): context pre-selection by "logit_mean" (mean coarse score over the source
query blocks) or "softmax_mass" (block-softmax probability summed over the source query blocks, the
authors' rule); query routing by "variance" (Var of the kept-block softmax) or "topk_mass" (sum of its top
n_near probabilities, the authors' rule). Plus two oracles that show the headroom: "oracle" routing sends to
exact attention the query blocks whose all-Taylor output is furthest from exact attention (measured, not
computable in practice), with the context blocks chosen by each saliency rule.

Inputs: bench/isa_inputs.py's three generators (Gaussian, structured, mixture), context = second half, d 128,
float32 q, k, v; ISA at the node's default ratios runs in plain torch (`isa_attention_split`, taylor='torch');
the error is the relative L2 against exact attention in float64 on every row. Small sizes (the CPU).

--tiling picks the block tiling ("grid" or "segment", `isa_reference.block_layout`); N/2 off the 64 grid
(e.g. --n 10710) shows how the structured generator's 64-token clusters meet each tiling.

Run:  python bench/isa_rules.py [--n 8190] [--heads 4] [--seeds 2] [--tiling grid|segment]
"""
from __future__ import annotations

import argparse
import functools
import itertools
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from isa_attention import import_pack  # noqa: E402
from isa_inputs import GENERATORS, context_mass  # noqa: E402


def exact64(q, k, v):
    """Exact attention in float64, one head at a time."""
    out = torch.empty(q.shape, dtype=torch.float64)
    for h in range(q.shape[1]):
        logits = q[:, h].double() @ k[:, h].double().transpose(-1, -2) / math.sqrt(q.shape[-1])
        out[:, h] = logits.softmax(-1) @ v[:, h].double()
    return out


def rel(a, b) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def oracle_routing(q, k, v, truth, plan_isa, split, ctx, saliency, alpha_f, layout_counts):
    """bool [B, H, nb]: the ceil(alpha_f * nb) query blocks with the largest all-Taylor squared error."""
    plan = plan_isa(q, k, v, *ctx, alpha_f=0.0, saliency=saliency)
    err = (split(q, k, v, plan, taylor="torch").double() - truth).square().sum(-1)  # [B, H, N]
    layout = plan.layout
    per_block = torch.stack([err[..., s:s + c].sum(-1) for s, c in zip(layout.start.tolist(), layout.count.tolist())], -1)
    n_exact = math.ceil(alpha_f * layout.n_blocks - 1e-9)
    best = per_block.argsort(-1, descending=True)[..., :n_exact]
    return torch.zeros_like(per_block, dtype=torch.bool).scatter_(-1, best, True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8190)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--generators", default="gauss,struct,mixture")
    ap.add_argument("--tiling", default=None, help="block tiling, 'segment' or 'grid' (default: the plan's)")
    args = ap.parse_args()
    import_pack()
    from longedit.kernels.isa_reference import SALIENCY_RULES, SHARPNESS_RULES, plan_isa
    from longedit.kernels.isa_split import isa_attention_split

    n, ctx = args.n, (args.n // 2, args.n)
    if args.tiling:  # every plan below, oracle's included
        plan_isa = functools.partial(plan_isa, tiling=args.tiling)
    print(f"ISA rules, 1x{args.heads}x{n:,} (context = second half), tiling {args.tiling or 'default'}, d 128, "
          f"float32, default ratios, "
          f"rel L2 vs exact float64 on every row, mean over {args.seeds} seeds")
    print("generator | context mass | " + " | ".join(f"{s} + {r}" for s, r in itertools.product(SALIENCY_RULES, SHARPNESS_RULES))
          + " | " + " | ".join(f"{s} + oracle" for s in SALIENCY_RULES))
    for name in args.generators.split(","):
        errors, masses = {}, []
        t0 = time.time()
        for seed in range(args.seeds):
            g = torch.Generator().manual_seed(seed)
            q, k, v = GENERATORS[name](args.heads, n, True, g)
            truth = exact64(q, k, v)
            masses.append(context_mass(q, k, ctx[0]))
            for saliency, sharpness in itertools.product(SALIENCY_RULES, SHARPNESS_RULES):
                plan = plan_isa(q, k, v, *ctx, saliency=saliency, sharpness=sharpness)
                errors.setdefault((saliency, sharpness), []).append(rel(isa_attention_split(q, k, v, plan, taylor="torch"), truth))
            for saliency in SALIENCY_RULES:
                routing = oracle_routing(q, k, v, truth, plan_isa, isa_attention_split, ctx, saliency, 0.5, None)
                plan = plan_isa(q, k, v, *ctx, saliency=saliency, exact_query=routing)
                errors.setdefault((saliency, "oracle"), []).append(rel(isa_attention_split(q, k, v, plan, taylor="torch"), truth))
        cells = " | ".join(f"{sum(e) / len(e):.3e}" for e in errors.values())
        print(f"{name} | {sum(masses) / len(masses):.1%} | {cells}   ({time.time() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
