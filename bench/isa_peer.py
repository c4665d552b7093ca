"""Benchmark: ISA as LongEdit runs it beside the ISA authors' code, same inputs, one table.

Their code: github.com/xie-lab-ml/Lightning-Unified-Video-Editor-via-In-Context-Sparse-Attention, folder
`in_context_sparse_attention/` (commit in .gpu-18b/UPSTREAM_COMMIT). It is never committed here: it is brought
to the GPU machine in the git-ignored folder `.gpu-18b/` (or --peer-dir) and imported from there unchanged on
disk. Adaptations, all made from this script at import or call time:
  1. `flash_attn` / `flash_attn_interface` are not installed (no wheel for py3.12 + torch 2.11 cu130): their
     dense half (`flash_attn_func` on [B, T, H, D]) is given a stand-in module `flash_attn` that runs torch
     SDPA with the FlashAttention backend (FlashAttention-2's kernel inside torch) on the transposed tensors.
  2. `tilelang` is not installed: `in_context_sparse_attention.tilelang_host` is replaced by a stand-in whose
     function raises; their Triton backend is the one called (`backend='triton'`).
  3. `alpha_2=0.0`: their model adds a learned, zero-initialised gate times the pooled-attention output to the
     attention result (`x + out_compress * alpha_2`); the gate belongs to their editing model, not to the
     attention, so the attention is compared with the gate at its initial value.
  4. Their sparse kernel is autotuned with key=["T"], a name it has no argument for: Triton 3.5 (their pin)
     ignored it (tuned once, at the first shape, for every shape), newer Triton refuses to decorate. While
     their module loads, `triton.autotune` swaps such names for ("T_Q", "T_KV"), so each shape gets its own
     tuning (never less favourable to them than 3.5's behaviour).
  5. --cpu-smoke only (checks that everything runs, not their numbers: Triton 3.6's interpreter loads bf16
     through block pointers wrongly, and Triton >= 3.7 has no block pointers, which their chunk_reduce uses):
     their Triton kernels run under TRITON_INTERPRET=1 on tiny shapes, and their
     TMA allocator (`triton.set_allocator` with device "cuda") is pointed at the CPU, and each autotuned
     kernel keeps its first config only (the interpreter cannot time configs).
Their layout is [B, S, H, D] with t_seq_len target tokens first and the source (context) after: the inputs
are made as [B, S, H, D] tensors; theirs get them as they are, ours get the [B, H, S, D] view of the same
memory (as a ComfyUI attention override receives it), context = [S/2, S).

Table: shape x generator (bench/isa_inputs.py: Gaussian, structured, mixture) x {dense cuDNN, dense
FlashAttention (SDPA), theirs, ours}: milliseconds (median of triton.testing.do_bench), speedup over the
fastest dense backend timed on the same inputs, relative L2 error against exact float32 attention on 8,192
evenly spaced query rows (bench/isa_attention.py's helpers). FlashAttention-3 and SageAttention rows are
added only where `flash_attn_interface` / `sageattention` import on the machine (the script says which).
A last column gives ours' error under each (saliency, sharpness) rule pair, and under the other block tiling
(kernels/isa_reference.py: `context_saliency`, `query_sharpness`, `block_layout`).

Run:  python bench/isa_peer.py [--peer-dir .gpu-18b] [--shapes 12x65520,40x85680,40x151200]      (CUDA)
      TRITON_INTERPRET=1 python bench/isa_peer.py --cpu-smoke                                  (CPU check)
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import sys
import time
import types

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from isa_attention import REPO, import_pack, rel  # noqa: E402
from isa_inputs import GENERATORS, context_mass  # noqa: E402

SHAPES = [(12, 65520), (40, 85680), (40, 151200)]  # the authors' shapes (Wan2.1-1.3B 480p; Wan2.2-A14B 960x544)
SMOKE_SHAPES = [(2, 2100), (1, 1541)]
REFERENCE_ROWS = 8192


def flash_stand_in(device_is_cuda: bool) -> types.ModuleType:
    """Adaptation 1: `flash_attn.flash_attn_func(q, k, v)` on [B, T, H, D] through torch SDPA."""
    module = types.ModuleType("flash_attn")

    def flash_attn_func(q, k, v, *args, **kwargs):
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        if device_is_cuda:
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2)

    module.flash_attn_func = flash_attn_func
    return module


def load_peer(peer_dir: str, device_is_cuda: bool):
    """Import their package from peer_dir with adaptations 1, 2, 4 (and 5 on the CPU); their files are not edited."""
    package_dir = os.path.join(peer_dir, "in_context_sparse_attention")
    if not os.path.isfile(os.path.join(package_dir, "editing_sparse_attention.py")):
        raise SystemExit(f"isa_peer: their code is not in {package_dir}. Copy the folder in_context_sparse_attention/ "
                         f"of the authors' repository there (git archive HEAD in_context_sparse_attention | tar -x -C "
                         f"{peer_dir}).")
    if importlib.util.find_spec("flash_attn_interface") is None and importlib.util.find_spec("flash_attn") is None:
        sys.modules["flash_attn"] = flash_stand_in(device_is_cuda)
    tilelang_host = types.ModuleType("in_context_sparse_attention.tilelang_host")

    def no_tilelang(*args, **kwargs):
        raise RuntimeError("tilelang is not installed here; isa_peer calls their Triton backend")

    tilelang_host.sparse_piecewise_attn_1st_intervals_tilelang = no_tilelang
    sys.modules["in_context_sparse_attention.tilelang_host"] = tilelang_host
    spec = importlib.util.spec_from_file_location("in_context_sparse_attention", os.path.join(package_dir, "__init__.py"),
                                                  submodule_search_locations=[package_dir])
    package = importlib.util.module_from_spec(spec)
    sys.modules["in_context_sparse_attention"] = package
    import triton

    original = triton.autotune

    def autotune(configs, key, **kwargs):  # adaptation 4
        def decorate(fn):
            known = [name for name in key if name in fn.arg_names]
            if len(known) < len(key):
                known += [name for name in ("T_Q", "T_KV") if name in fn.arg_names and name not in known]
            # adaptation 5: the interpreter has no benchmarker; one config means no tuning run
            return original(configs if device_is_cuda else configs[:1], known, **kwargs)(fn)
        return decorate

    triton.autotune = autotune
    try:
        spec.loader.exec_module(package)
    finally:
        triton.autotune = original
    if not device_is_cuda:  # adaptation 5: their TMA scratch allocator names "cuda"
        set_allocator = triton.set_allocator
        cpu_scratch = lambda size, alignment, stream: torch.empty(size, dtype=torch.int8)  # noqa: E731
        triton.set_allocator = lambda fn: set_allocator(cpu_scratch)
    return package.editing_sparse_attention


def optional_dense():
    """FlashAttention-3 / SageAttention runners where their packages import; (rows, note)."""
    rows, missing = {}, []
    if importlib.util.find_spec("flash_attn_interface") is not None:
        from flash_attn_interface import flash_attn_func as fa3

        rows["FlashAttention-3"] = lambda q, k, v: fa3(q, k, v)
    else:
        missing.append("FlashAttention-3 (flash_attn_interface)")
    if importlib.util.find_spec("sageattention") is not None:
        from sageattention import sageattn

        rows["SageAttention"] = lambda q, k, v: sageattn(q, k, v, tensor_layout="NHD")
    else:
        missing.append("SageAttention (sageattention)")
    return rows, missing


def timer(cuda: bool):
    if cuda:
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def cpu_time(fn):
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return cpu_time


def exact_rows(q, k, v, rows):
    """Exact float32 attention of the sampled query rows ([B, H, N, d] views) over all keys."""
    if q.is_cuda:
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION):
            return F.scaled_dot_product_attention(q[:, :, rows].float(), k.float(), v.float())
    return F.scaled_dot_product_attention(q[:, :, rows].float(), k.float(), v.float())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer-dir", default=os.path.join(REPO, ".gpu-18b"))
    ap.add_argument("--shapes", default=None, help="HEADSxTOKENS,... (default: the authors' three shapes)")
    ap.add_argument("--generators", default="gauss,struct,mixture")
    ap.add_argument("--contiguous-too", action="store_true", help="also time ours on contiguous [B, H, S, D] copies")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (set TRITON_INTERPRET=1)")
    ap.add_argument("--alpha-s", default="", help="also time ours keeping these shares of the context blocks, "
                                                   "e.g. 0.15,0.1875 (the default keeps 0.125, as theirs)")
    args = ap.parse_args()
    cuda = not args.cpu_smoke
    if cuda and not torch.cuda.is_available():
        raise SystemExit("isa_peer: no CUDA device; use --cpu-smoke with TRITON_INTERPRET=1 for the CPU check")
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16  # their kernels keep bf16 buffers (chunk_reduce_1st), on the CPU too
    import_pack()
    from longedit.kernels import isa_attention
    from longedit.kernels.isa_reference import (DEFAULT_SALIENCY, DEFAULT_SHARPNESS, DEFAULT_TILING, SALIENCY_RULES,
                                                SHARPNESS_RULES, TILINGS, plan_isa)
    from longedit.kernels.isa_split import isa_attention_split

    theirs = load_peer(args.peer_dir, cuda)
    extra_dense, missing = optional_dense() if cuda else ({}, ["FlashAttention-3", "SageAttention (CPU smoke)"])
    shapes = ([tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")] if args.shapes
              else SHAPES if cuda else SMOKE_SHAPES)
    measure = timer(cuda)
    backends = torch.nn.attention.SDPBackend
    lines = []
    for heads, n in shapes:
        t_len = n // 2
        for name in args.generators.split(","):
            g = torch.Generator(device=device).manual_seed(0)
            q, k, v = (t.to(dtype) for t in GENERATORS[name](heads, n, True, g, device))  # [1, H, N, d]
            q_bshd, k_bshd, v_bshd = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # their layout
            del q, k, v
            q, k, v = (t.transpose(1, 2) for t in (q_bshd, k_bshd, v_bshd))  # ours: [B, H, N, d] views
            rows = torch.linspace(0, n - 1, min(n, REFERENCE_ROWS), device=device).long()
            ref = exact_rows(q, k, v, rows)
            cells = {}

            def sdpa(backend):
                def run():
                    if not cuda:
                        return F.scaled_dot_product_attention(q, k, v)
                    with torch.nn.attention.sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(q, k, v)
                return run

            dense = {"dense cuDNN": sdpa(backends.CUDNN_ATTENTION), "dense Flash (SDPA)": sdpa(backends.FLASH_ATTENTION)}
            for label, fn in extra_dense.items():
                dense[label] = lambda fn=fn: fn(q_bshd, k_bshd, v_bshd).transpose(1, 2)
            for label, fn in dense.items():
                try:
                    cells[label] = (measure(fn), rel(fn(), ref, rows))
                except Exception as e:  # a backend that does not run this shape: say so in the table
                    print(f"{label} failed at 1x{heads}x{n}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            run_theirs = lambda: theirs(q_bshd, k_bshd, v_bshd, t_len, n - t_len, alpha_2=0.0,  # noqa: E731
                                        backend="triton").transpose(1, 2)
            run_ours = lambda: isa_attention(q, k, v, t_len, n)  # noqa: E731
            try:
                cells["theirs (Triton)"] = (measure(run_theirs), rel(run_theirs(), ref, rows))
            except Exception as e:  # keep the rest of the table if their code fails on a shape
                print(f"theirs failed at 1x{heads}x{n}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                cells["theirs (Triton)"] = (float("nan"), float("nan"))
            if cells["theirs (Triton)"][1] > 1:
                print("theirs: error above 1. Expected under TRITON_INTERPRET only: Triton 3.6's interpreter loads "
                      "bf16 through block pointers wrongly (float32 is right), and their kernels keep bf16 "
                      "buffers; on the GPU it would be a real failure", flush=True)
            cells["ours (isa_attention)"] = (measure(run_ours), rel(run_ours(), ref, rows))
            for alpha_s in (float(a) for a in args.alpha_s.split(",") if a):
                run_alpha = lambda: isa_attention(q, k, v, t_len, n, alpha_s=alpha_s)  # noqa: E731
                cells[f"ours, alpha_s {alpha_s:g}"] = (measure(run_alpha), rel(run_alpha(), ref, rows))
            if args.contiguous_too:  # ours on [B, H, S, D] contiguous copies (as bench/isa_attention.py times it)
                qc, kc, vc = (t.contiguous() for t in (q, k, v))
                run_contiguous = lambda: isa_attention(qc, kc, vc, t_len, n)  # noqa: E731
                cells["ours, contiguous [B,H,S,D]"] = (measure(run_contiguous), rel(run_contiguous(), ref, rows))
                del qc, kc, vc
            rule_errors = []
            variants = [(saliency, sharpness, DEFAULT_TILING)
                        for saliency, sharpness in itertools.product(SALIENCY_RULES, SHARPNESS_RULES)]
            variants += [(DEFAULT_SALIENCY, DEFAULT_SHARPNESS, t) for t in TILINGS if t != DEFAULT_TILING]
            for saliency, sharpness, tiling in variants:  # errors only; torch pooling follows the tiling
                plan = plan_isa(q, k, v, t_len, n, saliency=saliency, sharpness=sharpness, tiling=tiling)
                err = rel(isa_attention_split(q, k, v, plan), ref, rows)
                rule_errors.append(f"{saliency}+{sharpness}+{tiling} {err:.2e}")
            fastest = min(ms for label, (ms, _) in cells.items() if label.startswith("dense"))
            mass = context_mass(q, k, t_len)
            for label, (ms, err) in cells.items():
                rules = "; ".join(rule_errors) if label == "ours (isa_attention)" else ""
                lines.append(f"1x{heads}x{n:,} | {name} ({mass:.0%} ctx) | {label} | {ms:.1f} | {fastest / ms:.2f}x | "
                             f"{err:.2e} | {rules}")
                print(lines[-1], flush=True)
            del q, k, v, q_bshd, k_bshd, v_bshd, ref
            if cuda:
                torch.cuda.empty_cache()
    where = torch.cuda.get_device_name() if cuda else "CPU smoke (tiny shapes; times mean nothing)"
    print(f"\nISA: LongEdit vs the authors' code, layout [target | source], context = second half, "
          f"bf16, d 128, {where}")
    print("Defaults: theirs alpha_2 0 (gate at init), SPARSITY_RATIO 0.0625, top 1/8 source blocks, half the query "
          "blocks exact; ours alpha_s 0.125, alpha_f 0.5, alpha_ns 0.0625, b 64.")
    print("Not run (package not importable here): " + (", ".join(missing) if missing else "none"))
    print("shape | generator (context attention mass) | method | ms | speedup vs fastest dense | rel L2 err vs exact "
          "fp32 | ours' error per saliency+sharpness+tiling")
    print("--- | --- | --- | --- | --- | --- | ---")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
