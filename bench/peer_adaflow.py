"""Benchmark: the authors' AdaFlow code beside LongEdit, end to end, on the same GPU, weights and video.

The public AdaFlow code (github:jidantang55/AdaFlow, brought to the GPU machine at run time; never committed)
runs its two scripts as its README says: `preprocess.py` (frames, VAE encode, 100-step DDIM inversion) and
`run.py` (DIFT keyframe selection, keyframe editing + propagation, 50 steps, decode, videos), with its own
defaults (configs/config-field.yaml: 384x672, SD2.1, guidance 7.5, pnp 0.8/0.8, max_kv_size 20,
max_batch_size 400). LongEdit runs its shipped workflow `adaflow_long_video_edit` through the headless runner
with the same steps (bench/long_edit.py --e2e). Both read the same synthetic 384x672 mp4 and the same random
SD2.1 checkpoint (theirs through diffusers' conversion of it), each in a fresh process.

Adaptations of their code, only what it needs to run here (no line of their files is changed):
  1. Model ids: their hub ids (stabilityai/stable-diffusion-2-1-base, revisions main and fp16) resolve
     offline to a local Hugging Face cache holding the random checkpoint in diffusers layout.
  2. xformers: dift_sd calls enable_xformers_memory_efficient_attention (there is no xformers for this torch);
     it sets PyTorch's SDPA attention processors instead, which, like xformers there, replace the sliced
     attention that enable_attention_slicing set just before.
  3. torchvision.io.read_video / write_video (gone from current torchvision): PyAV versions with the same
     arguments (libx264 with their crf/preset options) are put into torchvision.io when it lacks them.
  4. Versions: diffusers 0.42.1, transformers 5.17, torch 2.11 instead of their pins (diffusers 0.29.2,
     transformers 4.42.3, torch 2.3.0); kornia 0.7.3 as pinned.
Our side runs in variants (--sides): `default` (alias `ours`) as shipped; `whole-source`, the source branch run
whole in every pass as theirs does (the pack stops it at PnP's last injection); `autotune` and `fp8`, ComfyUI's
launch flags for cuDNN autotuning and for fp8 weights with fp8 matmuls (these change the numbers: each
variant's edited latents are compared with the default run's, column "error vs default").
Their stages are timed from outside: sys.monitoring on the code objects of their named functions (no cost
elsewhere), with a CUDA synchronize at each boundary.

Run (GPU):  python bench/peer_adaflow.py --authors .gpu-17/AdaFlow --comfy /tmp/comfy --frames 500 --out rows.jsonl
            python bench/peer_adaflow.py --report rows.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
from keyframes import CKPT  # noqa: E402

HUB_ID = "stabilityai/stable-diffusion-2-1-base"
SNAPSHOT = "0" * 40

# stabilityai/stable-diffusion-2-1-base's diffusers configs (public), for the conversion of the checkpoint
UNET = dict(_class_name="UNet2DConditionModel", act_fn="silu", attention_head_dim=[5, 10, 20, 20],
            block_out_channels=[320, 640, 1280, 1280], center_input_sample=False, cross_attention_dim=1024,
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], downsample_padding=1,
            flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1,
            norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=64,
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, use_linear_projection=True)
VAE = dict(_class_name="AutoencoderKL", act_fn="silu", block_out_channels=[128, 256, 512, 512],
           down_block_types=["DownEncoderBlock2D"] * 4, in_channels=3, latent_channels=4, layers_per_block=2,
           norm_num_groups=32, out_channels=3, sample_size=512, up_block_types=["UpDecoderBlock2D"] * 4,
           scaling_factor=0.18215)
TEXT = dict(architectures=["CLIPTextModel"], model_type="clip_text_model", hidden_act="gelu", hidden_size=1024,
            intermediate_size=4096, max_position_embeddings=77, num_attention_heads=16, num_hidden_layers=23,
            projection_dim=512, vocab_size=49408, layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2,
            pad_token_id=1, torch_dtype="float16")
SCHEDULER = dict(_class_name="PNDMScheduler", beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085,
                 clip_sample=False, num_train_timesteps=1000, prediction_type="epsilon", set_alpha_to_one=False,
                 skip_prk_steps=True, steps_offset=1, trained_betas=None)
PIPELINE = dict(_class_name="StableDiffusionPipeline", feature_extractor=[None, None], requires_safety_checker=False,
                safety_checker=[None, None], scheduler=["diffusers", "PNDMScheduler"],
                text_encoder=["transformers", "CLIPTextModel"], tokenizer=["transformers", "CLIPTokenizer"],
                unet=["diffusers", "UNet2DConditionModel"], vae=["diffusers", "AutoencoderKL"])

# their functions -> the common stages of the table (exclusive time: a function nested in another counts once)
THEIR_STAGES = {
    "save_video_frames": "read", "get_data": "read+encode", "encode_imgs": "read+encode",
    "get_ddim_eps": "read+encode", "ddim_inversion": "inversion", "prepare_dift_matching": "keyframes",
    "SDFeaturizer.__init__": "load", "batched_denoise_step": "sampling", "sample_loop": "decode+write",
    "decode_latents": "decode+write",
    "save_video": "decode+write", "save_vae_recon": "decode+write", "write_video": "decode+write",
}
OUR_STAGES = {
    "CheckpointLoaderSimple": "load", "CLIPTextEncode": "load", "LongEditLoadVideo": "read+encode",
    "LongEditEncodeVideo": "read+encode", "LongEditAdaFlowKeyframeSelection": "keyframes",
    "LongEditAdaFlowInvert": "inversion", "LongEditAdaFlowKeyframeEditing": "sampling",
    "LongEditAdaFlowLatentPropagation": "sampling", "KSamplerAdvanced": "sampling",
    "LongEditDecodeSaveVideo": "decode+write",
}
STAGES = ("load", "read", "read+encode", "keyframes", "inversion", "sampling", "decode+write", "other")


# ----------------------------------------------------------------------------------------------- setup
def write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def build_hub_cache(ckpt: str, tokenizer_dir: str, hf_home: str) -> None:
    """Their hub id, offline: the random LDM checkpoint converted to diffusers layout by diffusers itself,
    saved as the snapshot that refs main and fp16 point to."""
    import torch
    from diffusers import StableDiffusionPipeline

    repo = os.path.join(hf_home, "hub", "models--" + HUB_ID.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", SNAPSHOT)
    if os.path.isfile(os.path.join(snapshot, "unet", "config.json")):
        return sd2_tokenizer(os.path.join(snapshot, "tokenizer"))
    configs = os.path.join(hf_home, "configs")
    for sub, cfg in (("unet", UNET), ("vae", VAE), ("text_encoder", TEXT)):
        write_json(os.path.join(configs, sub, "config.json"), cfg)
    write_json(os.path.join(configs, "scheduler", "scheduler_config.json"), SCHEDULER)
    write_json(os.path.join(configs, "model_index.json"), PIPELINE)
    shutil.copytree(tokenizer_dir, os.path.join(configs, "tokenizer"), dirs_exist_ok=True)
    sd2_tokenizer(os.path.join(configs, "tokenizer"))
    pipe = StableDiffusionPipeline.from_single_file(ckpt, config=configs, torch_dtype=torch.float16,
                                                    local_files_only=True)
    pipe.save_pretrained(snapshot, safe_serialization=True)
    sd2_tokenizer(os.path.join(snapshot, "tokenizer"))
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    for ref in ("main", "fp16"):
        with open(os.path.join(repo, "refs", ref), "w") as f:
            f.write(SNAPSHOT)


def sd2_tokenizer(folder: str) -> None:
    """SD2's tokenizer is CLIP's BPE with 77 positions and '!' as padding (the hub's tokenizer_config);
    ComfyUI's copy of the vocabulary says 8192 positions."""
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(model_max_length=77, pad_token="!")
    with open(path, "w") as f:
        json.dump(config, f, indent=1)


def write_video_file(path: str, frames: int, width: int, height: int) -> None:
    """The shared input: moving shapes with a scene cut every 250 frames (AKS has clips to find)."""
    if os.path.isfile(path):
        return
    sys.path.insert(0, os.path.dirname(BENCH))
    from core.video.sample import write_sample_video

    write_sample_video(path, frames=frames, width=width, height=height, fps=24,
                       scene_cuts=range(250, frames, 250))


# ------------------------------------------------------------------------------------- their process
def install_shims() -> None:
    """Adaptations 2 and 3 of the module docstring."""
    import torch
    import torchvision.io as tio
    from diffusers import DiffusionPipeline

    def sdpa_instead_of_xformers(self, *args, **kwargs):
        for name in self.components:
            module = getattr(self, name)
            if hasattr(module, "set_default_attn_processor"):
                module.set_default_attn_processor()

    DiffusionPipeline.enable_xformers_memory_efficient_attention = sdpa_instead_of_xformers
    if not hasattr(tio, "write_video"):
        tio.write_video, tio.read_video = pyav_write_video, pyav_read_video
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32  # their default: untouched


def pyav_write_video(filename, video_array, fps, video_codec="libx264", options=None, **_):
    import av
    import numpy as np

    frames = np.asarray(video_array.cpu() if hasattr(video_array, "cpu") else video_array)
    with av.open(filename, "w") as out:
        stream = out.add_stream(video_codec, rate=round(float(fps)))
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = "yuv420p"
        stream.options = {k: str(v) for k, v in (options or {}).items()}
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())


def pyav_read_video(filename, output_format="THWC", **_):
    import av
    import numpy as np
    import torch

    with av.open(filename) as src:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in src.decode(video=0)])
    video = torch.from_numpy(frames)
    if output_format == "TCHW":
        video = video.permute(0, 3, 1, 2)
    return video, torch.empty(0), {}


class StageClock:
    """Wall time of named functions, exclusive of the named functions they call: sys.monitoring on those code
    objects only (Python 3.12+, no cost elsewhere); sys.setprofile on older Pythons (slow: smoke tests only)."""

    def __init__(self):
        import torch

        self.sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        self.totals: dict[str, float] = {}
        self.stack: list[list] = []  # [name, start, time spent in nested named functions]
        self.names: dict = {}
        mon = getattr(sys, "monitoring", None)
        if mon is None:
            sys.setprofile(self.profile)
            return
        self.tool = mon.PROFILER_ID
        mon.use_tool_id(self.tool, "peer_adaflow")
        mon.register_callback(self.tool, mon.events.PY_START, self.start)
        mon.register_callback(self.tool, mon.events.PY_RETURN, self.stop)

    def watch(self, code, name: str) -> None:
        self.names[code] = name
        mon = getattr(sys, "monitoring", None)
        if mon is not None:
            mon.set_local_events(self.tool, code, mon.events.PY_START | mon.events.PY_RETURN)

    def watch_tree(self, code, wanted: set) -> None:
        """Every function of a compiled module (methods included) whose name or Class.name is wanted."""
        for const in code.co_consts:
            if hasattr(const, "co_code"):
                qual = getattr(const, "co_qualname", const.co_name)
                if const.co_name in wanted or qual in wanted:
                    self.watch(const, qual if qual in wanted else const.co_name)
                self.watch_tree(const, wanted)

    def profile(self, frame, event, arg):
        if event == "call":
            self.start(frame.f_code, 0)
        elif event == "return":
            self.stop(frame.f_code, 0, arg)

    def start(self, code, offset):
        if code in self.names:
            self.sync()
            self.stack.append([self.names[code], time.perf_counter(), 0.0])

    def stop(self, code, offset, retval):
        if code in self.names and self.stack:
            self.sync()
            name, t0, nested = self.stack.pop()
            spent = time.perf_counter() - t0
            self.totals[name] = self.totals.get(name, 0.0) + spent - nested
            if self.stack:
                self.stack[-1][2] += spent


def run_as_main(script: str, on_code) -> None:
    """Run a script as `python script` would (module __main__), handing its compiled code to `on_code` first
    (the clock watches its functions' code objects before any of them runs)."""
    import importlib.machinery
    import importlib.util

    class WatchedLoader(importlib.machinery.SourceFileLoader):
        def get_code(self, fullname):
            code = super().get_code(fullname)
            on_code(code)
            return code

    spec = importlib.util.spec_from_loader("__main__", WatchedLoader("__main__", script))
    module = importlib.util.module_from_spec(spec)
    sys.modules["__main__"] = module
    spec.loader.exec_module(module)


def their_process(stage: str, repo: str, argv: list[str]) -> None:
    import torch

    t0 = time.perf_counter()
    install_shims()
    os.chdir(repo)
    sys.path.insert(0, repo)
    script = os.path.join(repo, "preprocess.py" if stage == "preprocess" else "run.py")
    clock = StageClock()
    import dift_sd
    import util

    clock.watch(dift_sd.SDFeaturizer.__init__.__code__, "SDFeaturizer.__init__")
    clock.watch(util.save_video.__code__, "save_video")
    clock.watch(util.save_video_frames.__code__, "save_video_frames")
    clock.watch(pyav_write_video.__code__, "write_video")
    sys.argv = [script, *argv]
    run_as_main(script, lambda code: clock.watch_tree(code, set(THEIR_STAGES)))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    result = dict(stage=stage, wall_s=time.perf_counter() - t0, functions=clock.totals,
                  gpu_peak=torch.cuda.max_memory_allocated() if cuda else 0)
    print("THEIRS " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------- the runs
def run_child(cmd: list[str], env: dict, tag: str, log: str) -> dict:
    """Run one process with its output in `log`; its result is the JSON after `tag` on a line of its own."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
    with open(log) as f:
        text = f.read()
    for line in text.splitlines():
        if line.startswith(tag + " "):
            result = json.loads(line[len(tag) + 1:])
            result["process_s"] = time.perf_counter() - t0
            return result
    tail = text[-3000:]
    print(f"  {tag} failed (rc {proc.returncode}); the end of {log}:\n{tail}", flush=True)
    return dict(error=("OOM" if "OutOfMemory" in tail else "failed"), rc=proc.returncode, tail=tail[-800:])


def run_theirs(args, frames: int, video: str) -> dict:
    """preprocess.py then run.py in a fresh copy of their repo (they write data/, latents/, results/ there)."""
    work = os.path.join(args.workdir, f"authors_{frames}")
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(args.authors, work)
    hf_home = os.path.join(args.workdir, "hf")
    env = dict(os.environ, HF_HOME=hf_home, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    me = [sys.executable, os.path.abspath(__file__), "--their-stage"]
    pre = run_child(me + ["preprocess", work, "--", "--data_path", video, "--H", str(args.height), "--W",
                          str(args.width), "--steps", str(args.inversion_steps), "--save_steps", str(args.steps)],
                    env, "THEIRS", os.path.join(args.workdir, f"theirs_pre_{frames}.log"))
    row = dict(side="authors", frames=frames, preprocess=pre)
    if "error" in pre:
        return row
    stem = os.path.splitext(os.path.basename(video))[0]
    import yaml

    with open(os.path.join(work, "configs", "config-field.yaml")) as f:
        config = yaml.safe_load(f)
    config.update(data_path=f"data/{stem}", n_inversion_steps=args.inversion_steps, n_timesteps=args.steps,
                  H=args.height, W=args.width)
    with open(os.path.join(work, "configs", "bench.yaml"), "w") as f:
        yaml.safe_dump(config, f)
    row["edit"] = run_child(me + ["edit", work, "--", "--config_path", "configs/bench.yaml"], env, "THEIRS",
                            os.path.join(args.workdir, f"theirs_edit_{frames}.log"))
    with open(os.path.join(args.workdir, f"theirs_edit_{frames}.log")) as f:
        begins = [line for line in f if line.startswith("Batch begin index")]
    row["clips"] = len(json.loads(begins[-1].split(":", 1)[1])) if begins else None
    return row


# Our speed options, each a row: ComfyUI's own launch flags (cuDNN autotuning; fp8 weights with fp8 matmuls on
# Hopper/Ada, which change the numbers: their error against the default row is printed), and the authors'
# way of running the source branch whole in every pass (what the pack's source truncation saves).
OUR_VARIANTS = {
    "default": [],
    "whole-source": ["--whole-source"],
    "autotune": ["--comfy-flags=--fast autotune"],
    "fp8": ["--comfy-flags=--fast autotune fp8_matrix_mult --fp8_e4m3fn-unet"],
}


def run_ours(args, frames: int, video: str, variant: str = "default") -> dict:
    variant = "default" if variant == "ours" else variant
    latent = os.path.join(args.workdir, f"ours_{frames}_{variant}.pt")
    cmd = [sys.executable, os.path.join(BENCH, "long_edit.py"), "--e2e-child", video, "--comfy", args.comfy,
           "--workdir", args.workdir, "--inversion-steps", str(args.inversion_steps), "--steps", str(args.steps),
           "--height", str(args.height), "--width", str(args.width), "--save-latent", latent, *OUR_VARIANTS[variant]]
    result = run_child(cmd, dict(os.environ, PYTHONUNBUFFERED="1"), "E2E",
                       os.path.join(args.workdir, f"ours_{frames}_{variant}.log"))
    row = dict(side="LongEdit" if variant == "default" else f"LongEdit {variant}", frames=frames, run=result)
    default = os.path.join(args.workdir, f"ours_{frames}_default.pt")
    if variant != "default" and "error" not in result and os.path.exists(default):
        row["error_vs_default"] = relative_error(latent, default)
    return row


def relative_error(path: str, reference_path: str) -> float:
    """||a - b|| / ||b|| of two saved sampler outputs (the edited latents)."""
    import torch

    a, b = torch.load(path).double(), torch.load(reference_path).double()
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------------- table
def stage_times(row: dict) -> tuple[dict, float, float] | None:
    """(seconds per stage, total wall, GPU peak) of a row, or None when it failed."""
    out = dict.fromkeys(STAGES, 0.0)
    if row["side"] == "authors":
        parts = [row.get("preprocess") or {}, row.get("edit") or {}]
        if any("error" in p or not p for p in parts):
            return None
        for p in parts:
            named = 0.0
            for fn, s in p["functions"].items():
                out[THEIR_STAGES.get(fn, "other")] += s
                named += s
            out["other"] += p["process_s"] - named  # imports, model loading, their file writes
        total = sum(p["process_s"] for p in parts)
        peak = max(p["gpu_peak"] for p in parts)
    else:
        run = row.get("run") or {}
        if "error" in run or not run:
            return None
        for node, s in run["nodes"].items():
            out[OUR_STAGES.get(node, "other")] += s
        out["other"] += run["process_s"] - sum(run["nodes"].values())
        total, peak = run["process_s"], run["gpu_peak"]
    return out, total, peak


def projected(stages: dict, row: dict, frames: int, inversion_steps: int, steps: int) -> float:
    """Wall time at another length and step count: inversion scales with frames x inversion steps, sampling
    with frames x steps, the other stages with frames; load and the unattributed rest are fixed (for their
    code that rest also holds any per-frame work outside the named functions, which makes theirs look faster)."""
    scale = {"inversion": inversion_steps / row["inversion_steps"], "sampling": steps / row["steps"]}
    fixed = stages["load"] + stages["other"]
    return fixed + sum(v * scale.get(s, 1.0) * frames / row["frames"] for s, v in stages.items()
                       if s not in ("load", "other"))


def print_report(rows: list[dict], target: int = 1000, inversion_steps: int = 100, steps: int = 50) -> None:
    print(f"\n| frames | steps (inversion) | code | " + " | ".join(STAGES) + " | total s | GPU peak GiB | vs authors | "
          f"projected: {target:,} frames, {steps} ({inversion_steps}) steps | vs authors | error vs default |")
    print("|---" * (len(STAGES) + 10) + "|")
    theirs = {}
    for r in sorted(rows, key=lambda r: (r["frames"], r["steps"], r["side"] != "authors")):
        head = f"| {r['frames']:,} | {r['steps']} ({r['inversion_steps']}) | {r['side']} | "
        got = stage_times(r)
        if got is None:
            err = (r.get("edit") or r.get("preprocess") or r.get("run") or {}).get("error", "failed")
            print(head + " | ".join("–" for _ in STAGES) + f" | {err} | | | | | |")
            continue
        stages, total, peak = got
        proj = projected(stages, r, target, inversion_steps, steps)
        key = (r["frames"], r["steps"], r["inversion_steps"])
        if r["side"] == "authors":
            theirs[key] = (total, proj)
        ratio = f"{theirs[key][0] / total:.2f}x" if r["side"] != "authors" and key in theirs else ""
        pratio = f"{theirs[key][1] / proj:.2f}x" if r["side"] != "authors" and key in theirs else ""
        print(head + " | ".join(f"{stages[s]:.1f}" for s in STAGES)
              + f" | {total:.1f} | {peak / 2**30:.2f} | {ratio} | {proj / 60:.1f} min | {pratio} | "
              + (f"{r['error_vs_default']:.2e} |" if "error_vs_default" in r else " |"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--authors", default=".gpu-17/AdaFlow", help="a copy of github:jidantang55/AdaFlow")
    ap.add_argument("--comfy", default=os.environ.get("COMFYUI_PATH", "/tmp/comfy"))
    ap.add_argument("--frames", default="500")
    ap.add_argument("--sides", default="authors,default",
                    help="authors and/or our variants: " + ",".join(OUR_VARIANTS))
    ap.add_argument("--inversion-steps", type=int, default=100)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--height", type=int, default=384)
    ap.add_argument("--width", type=int, default=672)
    ap.add_argument("--workdir", default="/tmp/peer")
    ap.add_argument("--out", default=None)
    ap.add_argument("--report", nargs="*", default=None)
    ap.add_argument("--project", type=int, default=1000, help="frames to project each row to (at 100/50 steps)")
    ap.add_argument("--their-stage", nargs=2, default=None, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.their_stage:
        their_process(args.their_stage[0], args.their_stage[1], rest[1:] if rest[:1] == ["--"] else rest)
        return 0
    if args.report is not None:
        rows = [json.loads(line) for path in args.report for line in open(path) if line.strip()]
        print_report(rows, args.project)
        return 0
    os.makedirs(args.workdir, exist_ok=True)
    ckpt = os.path.join(args.comfy, "models", "checkpoints", CKPT)
    rows = []
    if "authors" in args.sides:
        tokenizer = os.path.join(args.comfy, "comfy", "sd1_tokenizer")
        t0 = time.perf_counter()
        build_hub_cache(ckpt, tokenizer, os.path.join(args.workdir, "hf"))
        print(f"their model cache ready in {time.perf_counter() - t0:.0f} s", flush=True)
    for frames in (int(f) for f in args.frames.split(",")):
        video = os.path.join(args.workdir, f"synthetic_{frames}.mp4")
        write_video_file(video, frames, args.width, args.height)
        for side in args.sides.split(","):
            row = run_theirs(args, frames, video) if side == "authors" else run_ours(args, frames, video, side)
            row.update(inversion_steps=args.inversion_steps, steps=args.steps)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("preprocess", "edit", "run")}), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    print_report(rows, args.project)
    return 0


if __name__ == "__main__":
    sys.exit(main())
