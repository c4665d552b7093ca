"""Benchmark: the whole AdaFlow long-video edit (keyframe selection, inversion, 2 denoising steps with
keyframe editing + AAS + latent propagation) at 384x672 on ComfyUI's SD2.1 UNet (random weights, fp16).

For each frame count, in a fresh process each, side by side in the same run:
  floor      a plain batched UNet forward of the same frames, three branches per step (source, uncond, cond);
  adaflow    AdaFlow as this pack runs it (clips up to 400 frames, AAS budget 20, propagation);
  tokenflow  TokenFlow-style: a keyframe every 8 frames and full extended attention over all of them
             (no AAS), with the same propagation, up to the largest size it fits.
Columns: seconds per frame per denoising step (sampling only), the ratio to the floor, peak GPU memory
(the whole run and the sampling part), peak host RAM, and disk (trajectory and correspondences).
Latents are synthetic (scenes of 250 frames with slow pans; see bench/keyframes.py).

--gpu-memory 8,12,16,24 runs every row on simulated cards of that many GiB: the child process may allocate
only that much (torch's per-process memory fraction, less the CUDA context it already holds) and ComfyUI
reads that card's total and free memory (torch.cuda.mem_get_info reports the simulated card), so ComfyUI
plans (weight offloading, batch sizes) and our nodes size their chunks as on such a card. --vram-modes
normal,low also runs ComfyUI's --lowvram mode. Each row prints the memory plan's predicted sampling peak
beside the measured one, and host RAM and disk per frame. --out appends every row as JSON; --report FILES
prints the table of rows gathered by earlier runs (e.g. from several 10-minute device calls).

--e2e runs what a user runs instead: the shipped workflow adaflow_long_video_edit through the headless runner
(in a fresh process per length; a synthetic 384x672 mp4 with a scene cut every 250 frames), at real step counts
(--steps 50, --inversion-steps 100), and times every node: load, read+encode, keyframes, inversion, sampling,
decode+write. Its table gives each stage's cost per frame (per frame and step for inversion and sampling) and
projects the wall time of longer runs (--project) from them.
--gpus 1,2 also runs the adaflow rows spread over that many Ray actors (Spread Edit over GPUs; a local Ray
cluster on this machine's GPUs, actors sharing them when fewer): ms per frame per step after the actors
started, the actors' start time, speedup and scaling efficiency against the 1-GPU row (t1 / (N * tN)), and
each actor's and the sampling process's GPU peak; --records-via auto,'torch.distributed','object store' runs
a row for each way the keyframe record reaches the actors, with the seconds each actor took to receive it.

Run:  python bench/long_edit.py --comfy /tmp/comfyui --frames 1000,10000 --gpu-memory 8,12 --modes floor,adaflow
      python bench/long_edit.py --e2e --comfy /tmp/comfyui --frames 200,500 --project 1000,10000
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from keyframes import CKPT, import_pack, peak_rss, synthetic_latents  # noqa: E402

STEPS = 2
MODES = ("floor", "adaflow", "tokenflow")


def gpu(op: str) -> int:
    """CUDA bookkeeping that is a no-op on the CPU (so the script can be smoke-tested anywhere)."""
    import torch

    if not torch.cuda.is_available():
        return 0
    if op == "sync":
        torch.cuda.synchronize()
    elif op == "reset":
        torch.cuda.reset_peak_memory_stats()
    elif op == "reserved":
        return torch.cuda.max_memory_reserved()
    return torch.cuda.max_memory_allocated()


def context_bytes() -> int:
    """GPU memory this process holds outside torch's allocator (its CUDA context): from NVML's per-process
    figure where the process is visible to it, else everything in use on the device (right when alone)."""
    import torch

    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid() and proc.usedGpuMemory:
                return int(proc.usedGpuMemory) - torch.cuda.memory_reserved()
    except Exception:  # no NVML, or another PID namespace: fall back to the device-wide figure
        pass
    free, total = torch.cuda.mem_get_info()
    return total - free - torch.cuda.memory_reserved()


def simulate_card(gib: float) -> None:
    """Make this process see a card of `gib` GiB: torch may allocate only what such a card leaves beside the
    CUDA context it already holds, and mem_get_info (which ComfyUI reads for total and free memory) reports it."""
    import torch

    torch.zeros(1, device="cuda")  # create the context: it takes its share of the simulated card too
    real_total = torch.cuda.mem_get_info()[1]
    card = int(gib * 2**30)
    outside = context_bytes()
    torch.cuda.set_per_process_memory_fraction((card - outside) / real_total)

    def mem_get_info(device=None):
        return max(0, card - outside - torch.cuda.memory_reserved(device)), card

    torch.cuda.mem_get_info = mem_get_info


def import_comfy(comfy_dir: str, flags: list[str]) -> None:
    import torch

    sys.path.insert(0, comfy_dir)
    sys.argv = [sys.argv[0]] + (flags if torch.cuda.is_available() else ["--cpu"])
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.sd  # noqa: F401


class AnonPeak:
    """Peak anonymous RSS (RssAnon), sampled every 50 ms: what the run needs in RAM. VmHWM also counts the
    pages of memory-mapped files (trajectory, correspondences) that were read, which the kernel drops under
    pressure."""

    def __init__(self):
        import threading

        self.peak, self.stop = 0, threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        while not self.stop.wait(0.05):
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        self.peak = max(self.peak, int(line.split()[1]) * 1024)

    def done(self) -> int:
        self.stop.set()
        self.thread.join()
        return self.peak


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def child(args) -> None:
    import torch

    anon = AnonPeak()
    if args.card and torch.cuda.is_available():
        simulate_card(args.card)
    import_comfy(args.comfy, ["--lowvram"] if args.vram == "low" else [])
    import comfy.model_management as mm
    import comfy.sample
    import comfy.samplers
    import comfy.sd

    import_pack()
    from longedit.core.adaflow.dift import dift_feature_chunks
    from longedit.core.adaflow.inversion import ddim_invert
    from longedit.core.adaflow.keyframes import AksParams, select_keyframes
    from longedit.core.memory import frames_per_chunk
    from longedit.nodes.adaflow_edit import card_plan, patch_model
    from longedit.nodes.adaflow_invert import make_eps
    from longedit.nodes.adaflow_keyframes import make_featurizer
    from longedit.nodes.adaflow_propagation import propagate_from_keyframes
    import longedit.nodes.adaflow_edit as edit_node

    edit_node.resume_dir = lambda: tempfile.mkdtemp(dir=args.workdir)  # every row computes: no resume
    if args.records_on_disk:  # as on a machine whose RAM is too small for the keyframe records
        edit_node.RECORD_RAM_SHARE = 0.0

    frames, mode = args.child, args.mode
    model = comfy.sd.load_checkpoint_guess_config(os.path.join(args.comfy, "models", "checkpoints", CKPT),
                                                  output_vae=False, output_clip=False)[0]
    latents = synthetic_latents(frames, args.height // 8, args.width // 8)
    device = mm.get_torch_device()
    context = torch.zeros(1, 77, 1024)
    mm.load_models_gpu([model])
    gpu("reset")
    result = dict(frames=frames, mode=mode, card=args.card, vram=args.vram,
                  card_total=mm.get_total_memory(device), vram_state=mm.vram_state.name)
    if mode == "floor":
        x = model.model.process_latent_in(latents)
        # a plain batched forward, batches sized as ComfyUI would on this card (3 branches per frame)
        batch = frames_per_chunk(mm.get_free_memory(device), model.memory_required([3, *latents.shape[1:]]), 1)
        result["batch"] = batch
        gpu("sync")
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(STEPS):
                for i in range(0, frames, batch):
                    xb = x[i:i + batch].to(device).repeat(3, 1, 1, 1)
                    s = torch.full((xb.shape[0],), 1.0, device=device)
                    model.model.apply_model(xb, s, c_crossattn=context.to(device).expand(xb.shape[0], -1, -1))
        gpu("sync")
        result.update(sample_s=time.perf_counter() - t0, gpu_peak=gpu("peak"),
                      sample_gpu_peak=gpu("peak"), sample_gpu_reserved=gpu("reserved"), rss_peak=peak_rss(),
                      disk=0, keyframes=0)
        print("RESULT " + json.dumps(result), flush=True)
        return
    params = AksParams(max_clip_length=8 if mode == "tokenflow" else 400)
    budget = 10**9 if mode == "tokenflow" else 20
    with tempfile.TemporaryDirectory(dir=args.workdir) as folder:
        t0 = time.perf_counter()
        patcher, featurize = make_featurizer(model, context, 50)
        per_frame = patcher.memory_required([4, *latents.shape[1:]])
        mm.load_models_gpu([patcher], memory_required=per_frame)
        chunk = frames_per_chunk(mm.get_free_memory(device), per_frame, 1)
        plan = select_keyframes(dift_feature_chunks(latents, featurize, 4, 0, chunk), latents, params,
                                folder=os.path.join(folder, "plan"), device=device)
        t1 = time.perf_counter()
        sigmas = comfy.samplers.calculate_sigmas(model.model.model_sampling, "ddim_uniform", STEPS).double().numpy()
        per_frame = model.memory_required([1, *latents.shape[1:]])
        mm.load_models_gpu([model], memory_required=per_frame)
        chunk = frames_per_chunk(mm.get_free_memory(device), per_frame, 1)
        inversion = ddim_invert(model.model.process_latent_in(latents), sigmas, make_eps(model, context), chunk,
                                folder=os.path.join(folder, "inversion"), source_context=context, device=device)
        t2 = time.perf_counter()
        patched = propagate_from_keyframes(patch_model(model, inversion, plan, 0.8, 0.8, budget), plan)
        spread = spread_over(patched, args.gpus, result, args.records_via, os.path.join(
            args.workdir, f"actors_{frames}_{args.gpus}_{args.records_via.replace(' ', '_')}.json")) \
            if args.gpus > 1 else None
        patched = patched if spread is None else spread
        memory_plan = card_plan(patched, inversion, plan)
        print(memory_plan.describe(), flush=True)
        result.update(plan_gpu=memory_plan.gpu.peak_bytes, plan_offloads=memory_plan.gpu.offloads,
                      plan_ram=memory_plan.ram_bytes, plan_disk=memory_plan.disk_bytes)
        start = model.model.process_latent_out(inversion.latents_at(0))
        positive = [[torch.randn(1, 77, 1024) * 0.1, {}]]
        negative = [[context, {}]]
        peak_before = gpu("peak")
        gpu("reset")
        gpu("sync")
        t3 = time.perf_counter()
        out = comfy.sample.sample(patched, torch.zeros_like(start), STEPS, 7.5, "ddim", "ddim_uniform", positive,
                                  negative, start, denoise=1.0, disable_noise=True, seed=0)
        gpu("sync")
        t4 = time.perf_counter()
        assert out.shape == latents.shape and torch.isfinite(out).all()
        sample_peak = gpu("peak")
        result.update(aks_s=t1 - t0, invert_s=t2 - t1, sample_s=t4 - t3, keyframes=plan.clip_count,
                      gpu_peak=max(peak_before, sample_peak), sample_gpu_peak=sample_peak,
                      sample_gpu_reserved=gpu("reserved"), rss_peak=peak_rss(), anon_peak=anon.done(),
                      disk=folder_bytes(folder), records_on_disk=memory_plan.records_on_disk,
                      weights_on_gpu=sum(m.model_loaded_memory() for m in mm.current_loaded_models))
    print("RESULT " + json.dumps(result), flush=True)


E2E_WORKFLOW = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows", "api",
                            "adaflow_long_video_edit.json")
# the workflow's node types -> stages; per-frame-per-step stages scale with steps when projecting
E2E_STAGES = {"CheckpointLoaderSimple": "load", "CLIPTextEncode": "load", "LongEditLoadVideo": "read+encode",
              "LongEditEncodeVideo": "read+encode", "LongEditAdaFlowKeyframeSelection": "keyframes",
              "LongEditAdaFlowInvert": "inversion", "LongEditAdaFlowKeyframeEditing": "sampling",
              "LongEditAdaFlowLatentPropagation": "sampling", "LongEditAdaFlowAttentionSlimming": "sampling",
              "KSamplerAdvanced": "sampling", "LongEditSpreadOverGpus": "sampling",
              "LongEditDecodeSaveVideo": "decode+write"}
E2E_ORDER = ("load", "read+encode", "keyframes", "inversion", "sampling", "decode+write", "other")


def e2e_child(args) -> None:
    """The shipped workflow through the headless runner in this process; wall time of every node (the
    executor runs them one after another; CUDA is synchronised at each switch)."""
    import torch

    os.environ["COMFYUI_PATH"] = args.comfy
    import_pack()
    import longedit.cli as cli

    nodes: dict[str, float] = {}
    clock = {"node": None, "t": time.perf_counter()}

    class TimedReporter(cli.Reporter):
        prompt_of_run: dict = {}

        def event(self, kind, data):
            TimedReporter.prompt_of_run = self.prompt
            if args.save_latent:  # the sampler's output, to measure a variant's error against the default run
                keep_sampler_output()
            if kind == "executing" and isinstance(data, dict):
                gpu("sync")
                now = time.perf_counter()
                if clock["node"] is not None:
                    kind_of = self.prompt[clock["node"]]["class_type"]
                    nodes[kind_of] = nodes.get(kind_of, 0.0) + now - clock["t"]
                clock.update(node=data.get("node"), t=now)
            super().event(kind, data)

    cli.Reporter = TimedReporter
    if args.whole_source:  # as TokenFlow/AdaFlow: every pass runs the source branch whole, beside the edit
        from longedit.core.adaflow.edit import KeyframeEditor

        KeyframeEditor.source_use = lambda self, step, extended: "full"
    sampled = {}

    def keep_sampler_output() -> None:
        """Wrap comfy.sample.sample (importable once the runner has set ComfyUI up) to keep its output."""
        import comfy.sample

        sample = comfy.sample.sample
        if getattr(sample, "keeps_output", False):
            return

        def keep_output(*a, **k):
            sampled["latent"] = sample(*a, **k)
            return sampled["latent"]

        keep_output.keeps_output = True
        comfy.sample.sample = keep_output
    folder = os.path.join(args.workdir, "comfy_e2e")
    # every run computes: no stage cache or saved sampling state of an earlier run (another variant) is reused
    shutil.rmtree(os.path.join(folder, "user", "longedit"), ignore_errors=True)
    for sub in ("output", "input", "user"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    argv = ["run", E2E_WORKFLOW, "--video", args.e2e_child, "--set", f"1.ckpt_name={CKPT}",
            "--set", f"9.inversion_steps={args.inversion_steps}", "--set", f"9.steps={args.steps}",
            "--set", f"12.steps={args.steps}", "--set", f"2.width={args.width}",
            "--set", f"2.height={args.height}", "--", "--output-directory", os.path.join(folder, "output"),
            "--input-directory", os.path.join(folder, "input"), "--user-directory", os.path.join(folder, "user")]
    if int(args.gpus) > 1:  # Spread Edit over GPUs on keyframe selection, inversion and sampling (the runner's flag)
        argv[argv.index("--"):argv.index("--")] = ["--gpus", str(args.gpus)]
    argv += [] if torch.cuda.is_available() else ["--cpu"]
    argv += args.comfy_flags.split()
    gpu("reset")
    t0 = time.perf_counter()
    rc = cli.main(argv)
    gpu("sync")
    if clock["node"] is not None:  # the last node ends with the run
        last = TimedReporter.prompt_of_run[clock["node"]]["class_type"]
        nodes[last] = nodes.get(last, 0.0) + time.perf_counter() - clock["t"]
    if rc != 0:
        raise SystemExit(f"the workflow failed (rc {rc})")
    if args.save_latent:
        torch.save(sampled["latent"].float().cpu(), args.save_latent)
    print("E2E " + json.dumps(dict(nodes=nodes, run_s=time.perf_counter() - t0, gpu_peak=gpu("peak"),
                                   rss_peak=peak_rss(), torch=torch.__version__)), flush=True)


def e2e_run(args, frames: int, gpus: int = 1) -> dict:
    from peer_adaflow import run_child, write_video_file

    video = os.path.join(args.workdir, f"synthetic_{frames}.mp4")
    write_video_file(video, frames, args.width, args.height)
    cmd = [sys.executable, os.path.abspath(__file__), "--e2e-child", video, "--comfy", args.comfy, "--workdir",
           args.workdir, "--inversion-steps", str(args.inversion_steps), "--steps", str(args.steps), "--gpus", str(gpus)]
    result = run_child(cmd, dict(os.environ, PYTHONUNBUFFERED="1"), "E2E",
                       os.path.join(args.workdir, f"e2e_{frames}_{gpus}.log"))
    return dict(mode="e2e", frames=frames, gpus=gpus, steps=args.steps, inversion_steps=args.inversion_steps, **result)


def e2e_stages(r: dict) -> dict:
    out = dict.fromkeys(E2E_ORDER, 0.0)
    for node, s in r["nodes"].items():
        out[E2E_STAGES.get(node, "other")] += s
    out["other"] += r["process_s"] - sum(r["nodes"].values())  # interpreter start, imports, ComfyUI start
    return out


def e2e_rates(r: dict) -> dict:
    """Seconds per frame of each stage, per frame and step for inversion and sampling; load is fixed."""
    stages = e2e_stages(r)
    per = {s: v / r["frames"] for s, v in stages.items()}
    per["inversion"] /= r["inversion_steps"]
    per["sampling"] /= r["steps"]
    per["load"] = stages["load"] + stages["other"]
    per["other"] = 0.0
    return per


def e2e_projection(rate: dict, frames: int, steps: int, inversion_steps: int) -> float:
    scale = {"inversion": inversion_steps, "sampling": steps}
    return rate["load"] + sum(v * frames * scale.get(s, 1) for s, v in rate.items() if s != "load")


def print_e2e(rows: list[dict], project: list[int], steps: int, inversion_steps: int) -> None:
    print("\nend to end, the shipped adaflow_long_video_edit workflow through the headless runner "
          "(seconds per stage)")
    print("| frames | GPUs (Ray actors) | steps (inversion) | " + " | ".join(E2E_ORDER)
          + " | total s | s per frame | sampling process GPU peak GiB |")
    print("|---" * (len(E2E_ORDER) + 6) + "|")
    done = [r for r in rows if r.get("mode") == "e2e" and "error" not in r]
    for r in sorted(done, key=lambda r: (r["frames"], r.get("gpus", 1))):
        st = e2e_stages(r)
        print(f"| {r['frames']:,} | {r.get('gpus', 1)} | {r['steps']} ({r['inversion_steps']}) | "
              + " | ".join(f"{st[s]:.1f}" for s in E2E_ORDER)
              + f" | {r['process_s']:.1f} | {r['process_s'] / r['frames']:.3f} | {r['gpu_peak'] / 2**30:.2f} |")
    for r in rows:
        if r.get("mode") == "e2e" and "error" in r:
            print(f"| {r['frames']:,} | {r.get('gpus', 1)} | failed: {r['error']} |")
    done = [r for r in done if r.get("gpus", 1) == 1]  # projections: one GPU
    if done and project:
        base = max(done, key=lambda r: r["frames"])
        rate = e2e_rates(base)
        print(f"\nprojected from the {base['frames']:,}-frame run, {steps} steps ({inversion_steps} inversion steps): "
              + "; ".join(f"{f:,} frames {e2e_projection(rate, f, steps, inversion_steps) / 60:.1f} min" for f in project))
        print("per frame: " + ", ".join(f"{s} {v * 1000:.2f} ms" + (" per step" if s in ("inversion", "sampling") else "")
                                        for s, v in rate.items() if s not in ("load", "other"))
              + f"; fixed {rate['load']:.1f} s")


def spread_over(patched, gpus: int, result: dict, records_via: str, report_path: str):
    """The model with Spread Edit over GPUs set; records the actors' start time, GPU peaks and how long they took
    to receive each step's keyframe record into `result`."""
    import longedit.nodes.adaflow_edit as edit_node
    import longedit.nodes.scale as scale_node
    from longedit.nodes.scale import with_scale

    if os.environ.get("LONGEDIT_BENCH_SNAPSHOTS"):  # the actors dump their CUDA memory when out of it
        import actor_memory

        scale_node.ChunkModel = actor_memory.SnapshotChunkModel

    start_pool, finish_pool = edit_node.start_pool, edit_node.finish_pool

    def capture(pool):
        if pool.actors:
            result["worker_gpu_peaks"] = pool.gpu_peaks()
            result["worker_memory"] = pool.memory_reports()
            with open(report_path, "w") as f:  # also when the run then fails (out of memory)
                json.dump(result, f)
            receipts = pool.record_receipts()
            result["records_seen"] = sorted({r["via"] for r in receipts})
            result["record_s"] = [r["seconds"] for r in receipts]
        result["workers_lost"] = len(pool.lost)

    def timed_pool(*a, **k):
        t0 = time.perf_counter()
        pool = start_pool(*a, **k)
        result["pool_start_s"] = time.perf_counter() - t0
        close = pool.close
        pool.close = lambda: capture(pool) or close()  # a failed run closes the pool
        return pool

    def finished_pool(pool, completed):  # a completed run keeps it warm (nodes/scale.WARM_POOLS)
        capture(pool)
        finish_pool(pool, completed)

    edit_node.finish_pool = finished_pool
    edit_node.start_pool = timed_pool
    result.update(gpus=gpus, records_via=records_via)
    return with_scale(patched, gpus, records_via=records_via)


def print_spread(rows: list[dict]) -> None:
    """Rows run with --gpus: ms per frame per step once the actors run, against the 1-GPU row of that length."""
    spread = [r for r in rows if r.get("gpus", 1) > 1 and "error" not in r]
    if not spread:
        return
    ones = {(r["frames"], r.get("card")): r for r in rows
            if r["mode"] == "adaflow" and r.get("gpus", 1) == 1 and "error" not in r}
    print("\nspread over GPUs (Ray actors): frames | GPUs | records via (asked: seen) | ms per frame per step | "
          "actors start s | speedup | scaling efficiency | record receipt s per actor-step (mean, max) | "
          "sampling process GPU peak GiB | per-actor GPU peak GiB")
    print("--- | --- | --- | --- | --- | --- | --- | --- | --- | ---")
    for r in sorted(spread, key=lambda r: (r["frames"], r["gpus"])):
        per = (r["sample_s"] - r.get("pool_start_s", 0)) / (r["frames"] * STEPS)
        one = ones.get((r["frames"], r.get("card")))
        base = one["sample_s"] / (one["frames"] * STEPS) if one else None
        speed = f"{base / per:.2f}x | {base / per / r['gpus']:.0%}" if base else "- | -"
        peaks = ", ".join(f"{p / 2**30:.2f}" for p in r.get("worker_gpu_peaks", []))
        record = r.get("record_s") or [0.0]
        via = f"{r.get('records_via', 'auto')}: {', '.join(r.get('records_seen', [])) or '-'}"
        print(f"{r['frames']:,} | {r['gpus']} | {via} | {per * 1000:.2f} | {r.get('pool_start_s', 0):.1f} | {speed} | "
              f"{sum(record) / len(record):.3f}, {max(record):.3f} | {r['sample_gpu_peak'] / 2**30:.2f} | {peaks}")


def run(args, frames: int, mode: str, card: float, vram: str, gpus: int = 1, via: str = "auto") -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", str(frames), "--mode", mode, "--comfy", args.comfy,
           "--height", str(args.height), "--width", str(args.width), "--workdir", args.workdir,
           "--card", str(card), "--vram", vram, "--gpus", str(gpus), "--records-via", via] + (
               ["--records-on-disk"] if args.records_on_disk else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("LongEdit plan"):
            print("  " + line, flush=True)
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stdout[-1500:] + proc.stderr[-2500:])
    reason = "OOM" if "OutOfMemory" in tail else "failed"
    print(f"  {mode} at {frames} on {card} GiB: {reason}\n{tail}", flush=True)
    return dict(frames=frames, mode=mode, card=card, vram=vram, error=reason)


HEADER = ("card | ComfyUI mode | frames | mode | ms per frame per step | vs floor | keyframes | plan GPU GiB | "
          "GPU peak GiB (sampling) | plan / measured | GPU reserved GiB | GPU peak GiB (run) | host peak GiB | "
          "host anon peak GiB | host MB per frame | disk MB per frame")


def table_row(r: dict, floors: dict) -> str:
    card = f"{r['card']:g} GB" if r.get("card") else "whole H200"
    head = f"{card} | {r.get('vram', 'normal')}{' (' + r['vram_state'] + ')' if r.get('vram_state') else ''} | " \
           f"{r['frames']:,} | {r['mode']}"
    if "error" in r:
        return head + f" | {r['error']}" + " | -" * 13
    per = r["sample_s"] / (r["frames"] * STEPS)
    floor = floors.get((r.get("card"), r.get("vram")))
    ratio = f"{per / floor:.2f}x" if floor else "-"
    plan = r.get("plan_gpu")
    return (head + f" | {per * 1000:.2f} | {ratio} | {r['keyframes']} | "
            f"{plan / 2**30 if plan else 0:.2f} | {r['sample_gpu_peak'] / 2**30:.2f} | "
            f"{plan / r['sample_gpu_peak'] if plan and r['sample_gpu_peak'] else 0:.2f} | {r.get('sample_gpu_reserved', 0) / 2**30:.2f} | "
            f"{r['gpu_peak'] / 2**30:.2f} | {r['rss_peak'] / 2**30:.2f} | {r.get('anon_peak', 0) / 2**30:.2f} | "
            f"{r['rss_peak'] / r['frames'] / 1e6:.3f} | "
            f"{r['disk'] / r['frames'] / 1e6:.3f}")


def print_table(rows: list[dict], width: int, height: int) -> None:
    spread, rows = rows, [r for r in rows if r.get("gpus", 1) == 1]  # --gpus rows have their own table
    floors = {(r.get("card"), r.get("vram")): r["sample_s"] / (r["frames"] * STEPS)
              for r in rows if r["mode"] == "floor" and "error" not in r}
    print(f"\nlong edit, {STEPS} denoising steps, {width}x{height}, SD2.1 fp16 random weights")
    print(HEADER)
    print(" | ".join(["---"] * HEADER.count("|")) + " | ---")
    for r in sorted(rows, key=lambda r: (r.get("card") or 1e9, r.get("vram", ""), r["frames"], r["mode"])):
        print(table_row(r, floors))
    print_projection(rows)
    print_spread(spread)


def print_projection(rows: list[dict], frames: int = 100_000) -> None:
    """Host RAM and disk per frame from two lengths on one card (the slope, so fixed costs such as the
    weights and the CUDA context are not spread over frames), projected to `frames`; and the GPU peak's
    growth with length."""
    runs = {}
    for r in rows:
        if r["mode"] == "adaflow" and "error" not in r:
            runs.setdefault((r.get("card"), r.get("vram"), bool(r.get("records_on_disk"))), []).append(r)
    lines = []
    for (card, vram, on_disk), rs in sorted(runs.items(), key=lambda kv: (kv[0][0] or 1e9, kv[0][1] or "", kv[0][2])):
        rs = sorted(rs, key=lambda r: r["frames"])
        if len(rs) < 2 or rs[-1]["frames"] == rs[0]["frames"]:
            continue
        a, b = rs[0], rs[-1]
        span = b["frames"] - a["frames"]
        ram = (b["rss_peak"] - a["rss_peak"]) / span
        anon = (b.get("anon_peak", 0) - a.get("anon_peak", 0)) / span
        disk = (b["disk"] - a["disk"]) / span
        records = "files" if on_disk else "RAM"
        lines.append(f"{card:g} GB {vram} | {records} | {a['frames']:,} -> {b['frames']:,} | {ram / 1e6:.3f} | "
                     f"{(b['rss_peak'] + ram * (frames - b['frames'])) / 1e9:.1f} | {anon / 1e6:.3f} | "
                     f"{(b.get('anon_peak', 0) + anon * (frames - b['frames'])) / 1e9:.1f} | {disk / 1e6:.3f} | "
                     f"{b['sample_gpu_peak'] / a['sample_gpu_peak']:.3f} | {b['gpu_peak'] / a['gpu_peak']:.3f}")
    if lines:
        print(f"\nper frame, from the slope between two lengths ({STEPS} steps; the trajectory on disk grows with "
              f"steps + 1); projected to {frames:,} frames")
        print("card | keyframe records | lengths | host MB per frame | host GB projected | host anon MB per frame | "
              "host anon GB projected | disk MB per frame | GPU peak ratio (sampling) | GPU peak ratio (run)")
        print("--- | --- | --- | --- | --- | --- | --- | --- | --- | ---")
        for line in lines:
            print(line)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfy", default=os.environ.get("COMFYUI_PATH", "/tmp/comfyui"))
    ap.add_argument("--frames", default="1000,2000,5000,10000")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--gpu-memory", default="0", help="GiB of the simulated cards, e.g. 8,12,16,24 (0: the whole GPU)")
    ap.add_argument("--vram-modes", default="normal", help="normal and/or low (ComfyUI's --lowvram)")
    ap.add_argument("--height", type=int, default=384)
    ap.add_argument("--width", type=int, default=672)
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    ap.add_argument("--out", default=None, help="append each row as a JSON line to this file")
    ap.add_argument("--report", nargs="*", default=None, help="print the table of rows from these JSON-lines files")
    ap.add_argument("--records-on-disk", action="store_true",
                    help="keep the keyframe records in files (as when RAM is short) to measure RAM without them")
    ap.add_argument("--e2e", action="store_true", help="the shipped workflow end to end at real step counts")
    ap.add_argument("--steps", type=int, default=50, help="--e2e: denoising steps")
    ap.add_argument("--inversion-steps", type=int, default=100, help="--e2e: DDIM inversion steps")
    ap.add_argument("--project", default="1000,10000", help="--e2e: frame counts to project the wall time to")
    ap.add_argument("--e2e-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--comfy-flags", default="", help="--e2e: ComfyUI launch flags, e.g. '--fast autotune'")
    ap.add_argument("--whole-source", action="store_true",
                    help="--e2e: run every pass's source branch whole, as the authors' code does (the pack stops it "
                         "at PnP's last injection)")
    ap.add_argument("--save-latent", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--gpus", default="1", help="adaflow rows also spread over these many Ray actors, e.g. 1,2 "
                                                "(Spread Edit over GPUs; needs Ray)")
    ap.add_argument("--records-via", default="auto",
                    help="--gpus rows: how the keyframe record reaches the actors, one row each: auto, "
                         "'torch.distributed', 'object store' (comma-separated)")
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="adaflow", help=argparse.SUPPRESS)
    ap.add_argument("--card", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--vram", default="normal", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.gpus = int(args.gpus)
        child(args)
        return 0
    if args.e2e_child:
        e2e_child(args)
        return 0
    project = [int(x) for x in args.project.split(",") if x]
    if args.report is not None:
        rows = [json.loads(line) for path in args.report for line in open(path) if line.strip()]
        if any(r.get("mode") == "e2e" for r in rows):
            print_e2e(rows, project, args.steps, args.inversion_steps)
        rows = [r for r in rows if r.get("mode") != "e2e"]
        if rows:
            print_table(rows, args.width, args.height)
        return 0
    if args.e2e:
        rows = []
        for frames, gpus in [(int(f), int(g)) for f in args.frames.split(",") for g in args.gpus.split(",")]:
            print(f"run: end to end, {frames} frames, {gpus} GPU(s) ...", flush=True)
            rows.append(e2e_run(args, frames, gpus))
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
        print_e2e(rows, project, args.steps, args.inversion_steps)
        return 0
    rows = []
    for card in [float(x) for x in args.gpu_memory.split(",")]:
        for vram in args.vram_modes.split(","):
            gone = set()  # modes that ran out of memory stop growing
            for frames in [int(x) for x in args.frames.split(",")]:
                spread = [(g, v) for g in args.gpus.split(",") if int(g) > 1 for v in args.records_via.split(",")]
                for mode, gpus, via in [(m, 1, "auto") for m in args.modes.split(",")] + [
                        ("adaflow", int(g), v) for g, v in spread]:
                    if mode in gone:
                        continue
                    print(f"run: {mode} {frames} frames, card {card:g} GiB, {vram}, {gpus} GPU(s), records via {via} "
                          "...", flush=True)
                    r = run(args, frames, mode, card, vram, gpus, via)
                    if r.get("error") == "OOM":
                        gone.add(mode)
                    rows.append(r)
                    if args.out:
                        with open(args.out, "a") as f:
                            f.write(json.dumps(r) + "\n")
                    print("  " + table_row(r, {}), flush=True)
    print_table(rows, args.width, args.height)
    return 0


if __name__ == "__main__":
    sys.exit(main())
