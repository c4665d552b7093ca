"""Benchmark: stream a long video through load -> (no VAE) -> save, against decoding it to one float32 tensor.

Measures frames/s and peak RSS (VmHWM) of:
  idle        a process that only imports torch, av, numpy and the pack (the baseline the others start from);
  stream      probe + select the first N frames + iter_frames in chunks + VideoWriter "mp4 (h264)" with the
              source audio copied; the output is checked by probe_video (N frames, audio present);
  decode_f32  the first N frames decoded into one preallocated float32 [N, H, W, 3] tensor (/255), as
              popular loaders do; sizes that would not fit in RAM are printed as "not run" with their need.
Each measurement runs in a fresh child process, so each peak RSS is its own. The generated source video
(h264 + AAC for its whole duration) is cached in the work dir by name, so reruns skip generating it.

Run:  .venv/bin/python bench/video_io.py                      # 1,000 and 10,000 frames at 672x384
      .venv/bin/python bench/video_io.py --frames-list 100,300 --baseline-frames 100 --width 128 --height 96
Exits non-zero if streaming peak RSS reaches 2 GiB or an output has the wrong frame count (or lost its audio).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RSS_LIMIT = 2 * 2**30
FLAT_TOLERANCE = 1.10  # peak RSS at the largest N within 10% of the smallest counts as flat
MiB, GB, GiB = 2**20, 1e9, 2**30


# -- shared ---------------------------------------------------------------------------------------------
def import_pack():
    """Import the pack the way ComfyUI does (a package named after its folder, relative imports inside)."""
    if "longedit" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "longedit", os.path.join(REPO_ROOT, "__init__.py"), submodule_search_locations=[REPO_ROOT])
        module = importlib.util.module_from_spec(spec)
        sys.modules["longedit"] = module
        spec.loader.exec_module(module)
    from longedit.core.video import sample as sample_video, sink as video_sink, source as video_source

    return sample_video, video_source, video_sink


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM). Preferred over ru_maxrss, which on Linux can carry the
    parent's peak across fork+exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def fmt_bytes(n: float) -> str:
    return f"{n / GB:.1f} GB ({n / GiB:.1f} GiB)" if n >= 0.1 * GB else f"{n / MiB:.1f} MiB"


def float32_bytes(frames: int, width: int, height: int) -> int:
    return frames * height * width * 3 * 4


def total_ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# -- child: one measurement -----------------------------------------------------------------------------
def child_stream(video_source, video_sink, src: str, frames: int, chunk: int, workdir: str) -> dict:
    out_path = os.path.join(workdir, f"stream_{frames}.mp4")
    if os.path.exists(out_path):
        os.remove(out_path)  # VideoWriter never overwrites
    t0 = time.perf_counter()
    video = video_source.select_frames(video_source.probe_video(src), video_source.Selection(frame_cap=frames))
    audio = video_sink.AudioFromFile(src, video.start_time, video.end_time)
    with video_sink.VideoWriter(out_path, "mp4 (h264)", video.fps, video.width, video.height,
                                audio=audio) as writer:
        for part in video_source.iter_frames(video, chunk):
            writer.write(part)
    seconds = time.perf_counter() - t0
    result = video_source.probe_video(out_path)
    return {"seconds": seconds, "frames": writer.frames_written, "output_frames": result.frame_count,
            "output_audio": result.audio is not None, "output_bytes": os.path.getsize(out_path)}


def child_decode_f32(video_source, src: str, frames: int, chunk: int) -> dict:
    import torch

    t0 = time.perf_counter()
    video = video_source.select_frames(video_source.probe_video(src), video_source.Selection(frame_cap=frames))
    out = torch.empty((video.frame_count, video.height, video.width, 3), dtype=torch.float32)
    k = 0
    for part in video_source.iter_frames(video, chunk):
        out[k:k + len(part)] = torch.from_numpy(part).to(torch.float32).div_(255.0)
        k += len(part)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "frames": k, "tensor_bytes": out.numel() * out.element_size()}


def run_child(args) -> None:
    mode, frames = args.child[0], int(args.child[1])
    t0 = time.perf_counter()
    import av  # noqa: F401  (every child holds the same imports, so "idle" is a fair baseline)
    import numpy  # noqa: F401
    import torch  # noqa: F401

    _, video_source, video_sink = import_pack()
    if mode == "idle":
        result = {"seconds": time.perf_counter() - t0, "frames": 0}
    elif mode == "stream":
        result = child_stream(video_source, video_sink, args.source, frames, args.chunk, args.workdir)
    elif mode == "decode_f32":
        result = child_decode_f32(video_source, args.source, frames, args.chunk)
    else:
        raise SystemExit(f"unknown child mode {mode!r}")
    result.update(mode=mode, requested=frames, peak_rss_bytes=peak_rss_bytes())
    print(json.dumps(result), flush=True)


# -- parent ---------------------------------------------------------------------------------------------
def source_path(workdir: str, frames: int, width: int, height: int, fps: float) -> str:
    return os.path.join(workdir, f"source_{frames}f_{width}x{height}_{fps:g}fps_h264_aac.mp4")


def ensure_source(path: str, frames: int, width: int, height: int, fps: float) -> None:
    if os.path.exists(path):
        print(f"source: reusing {path}")
        return
    sample_video, _, _ = import_pack()
    print(f"source: generating {frames} frames {width}x{height} @ {fps:g} fps with audio ...", flush=True)
    t0 = time.perf_counter()
    tmp = path + ".partial"
    sample_video.write_sample_video(tmp, frames=frames, width=width, height=height, fps=fps,
                                    audio_seconds=frames / fps, container="mp4")
    os.replace(tmp, path)
    seconds = time.perf_counter() - t0
    print(f"source: generated in {seconds:.1f} s ({frames / seconds:.0f} frames/s), "
          f"{os.path.getsize(path) / MiB:.0f} MiB", flush=True)


def measure(mode: str, frames: int, source: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, str(frames),
           "--source", source, "--workdir", args.workdir, "--chunk", str(args.chunk)]
    print(f"run: {mode} {frames} frames ...", flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr passes through
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(f"FAIL: {mode} {frames} frames: child exited with {proc.returncode}", flush=True)
        return {"mode": mode, "requested": frames, "failed": f"child exit {proc.returncode}"}
    result = json.loads(lines[-1])
    print(f"  {result['seconds']:.1f} s, peak RSS {result['peak_rss_bytes'] / MiB:.0f} MiB", flush=True)
    return result


def not_run_row(frames: int, width: int, height: int, why: str) -> dict:
    need = float32_bytes(frames, width, height)
    return {"mode": "decode_f32", "requested": frames,
            "note": f"not run: needs {fmt_bytes(need)} {why}"}


def baseline_rows(frames_list: list[int], baseline: list[int], source: str, args) -> list[dict]:
    ram = total_ram_bytes()
    ram_note = f"> {0.8 * ram / GB:.1f} GB (80% of RAM)"
    rows = []
    for n in sorted(set(baseline) | set(frames_list)):
        if n not in baseline:
            rows.append(not_run_row(n, args.width, args.height, "for the float32 tensor alone"))
        elif float32_bytes(n, args.width, args.height) > 0.8 * ram:
            rows.append(not_run_row(n, args.width, args.height, ram_note))
        else:
            rows.append(measure("decode_f32", n, source, args))
    return rows


def annotate(row: dict, idle_rss: int | None, failures: list[str]) -> None:
    """Fill the row's note; record stream failures (wrong frame count, lost audio, RSS over the limit)."""
    if "failed" in row:
        row["note"] = row["failed"]
        failures.append(f"{row['mode']} {row['requested']}: {row['failed']}")
        return
    if "peak_rss_bytes" not in row:
        return
    notes = ["imports only (seconds: import time)"] if row["mode"] == "idle" else []
    if idle_rss is not None and row["mode"] != "idle":
        notes.append(f"+{(row['peak_rss_bytes'] - idle_rss) / MiB:.0f} MiB over idle")
    if row["mode"] == "stream":
        n, got = row["requested"], row["output_frames"]
        notes.append(f"output {got} frames{' + audio' if row['output_audio'] else ', NO AUDIO'}, "
                     f"{row['output_bytes'] / MiB:.1f} MiB")
        if got != n or row["frames"] != n:
            failures.append(f"stream {n}: wrote {row['frames']} frames, output has {got} (expected {n})")
        if not row["output_audio"]:
            failures.append(f"stream {n}: output has no audio although the source has")
        if row["peak_rss_bytes"] >= RSS_LIMIT:
            failures.append(f"stream {n}: peak RSS {row['peak_rss_bytes'] / MiB:.0f} MiB >= 2 GiB")
    if row["mode"] == "decode_f32":
        notes.append(f"tensor {row['tensor_bytes'] / MiB:.0f} MiB")
    row["note"] = "; ".join(notes)


def conclusions(stream: list[dict], args, max_frames: int) -> list[str]:
    ok = [r for r in stream if "peak_rss_bytes" in r]
    lines = []
    if ok:
        peak = max(r["peak_rss_bytes"] for r in ok)
        lines.append(f"streaming peak RSS: {peak / MiB:.0f} MiB -> "
                     f"{'under' if peak < RSS_LIMIT else 'NOT under'} 2 GiB")
        lo = min(ok, key=lambda r: r["requested"])
        hi = max(ok, key=lambda r: r["requested"])
        ratio = hi["peak_rss_bytes"] / lo["peak_rss_bytes"]
        verdict = "flat" if ratio <= FLAT_TOLERANCE else "NOT flat"
        lines.append(f"streaming peak RSS {hi['requested']} vs {lo['requested']} frames: "
                     f"{hi['peak_rss_bytes'] / MiB:.0f} / {lo['peak_rss_bytes'] / MiB:.0f} MiB = {ratio:.3f}x "
                     f"-> {verdict} (tolerance {FLAT_TOLERANCE:.2f}x)")
    need = float32_bytes(max_frames, args.width, args.height)
    lines.append(f"float32 whole-clip tensor at {max_frames} frames {args.width}x{args.height}: "
                 f"{fmt_bytes(need)}; this machine has {total_ram_bytes() / GB:.1f} GB RAM")
    return lines


def format_table(rows: list[dict]) -> str:
    header = ("mode", "frames", "seconds", "frames/s", "peak RSS (MiB)", "note")
    body = []
    for r in rows:
        measured = "peak_rss_bytes" in r
        secs = r.get("seconds")
        body.append((
            r["mode"], f"{r['requested']:,}" if r["requested"] else "-",
            f"{secs:.1f}" if measured else "-",
            f"{r['frames'] / secs:.1f}" if measured and r["frames"] and secs else "-",
            f"{r['peak_rss_bytes'] / MiB:.0f}" if measured else "-",
            r.get("note", ""),
        ))
    widths = [max(len(str(row[i])) for row in [header] + body) for i in range(len(header))]
    fmt = lambda row: " | ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), "-+-".join("-" * w for w in widths)] + [fmt(row) for row in body])


def run_parent(args) -> int:
    frames_list = sorted({int(x) for x in args.frames_list.split(",") if x.strip()})
    baseline = sorted({int(x) for x in args.baseline_frames.split(",") if x.strip()})
    max_frames = max(frames_list + baseline)
    os.makedirs(args.workdir, exist_ok=True)
    print(f"workdir: {args.workdir}")
    source = source_path(args.workdir, max_frames, args.width, args.height, args.fps)
    t0 = time.perf_counter()
    ensure_source(source, max_frames, args.width, args.height, args.fps)

    idle = measure("idle", 0, source, args)
    stream = [measure("stream", n, source, args) for n in frames_list]
    base = baseline_rows(frames_list, baseline, source, args)
    rows = [idle] + stream + base
    idle_rss = idle.get("peak_rss_bytes")
    failures: list[str] = []
    for row in rows:
        annotate(row, idle_rss, failures)

    print()
    print(f"total wall time: {time.perf_counter() - t0:.1f} s (generation included)")
    for line in conclusions(stream, args, max(frames_list)):
        print(line)
    for line in failures:
        print(f"FAIL: {line}")
    print(f"result: {'FAIL' if failures else 'PASS'}")
    print()
    print(format_table(rows))
    return 1 if failures else 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames-list", default="1000,10000", help="frame counts to stream (comma separated)")
    p.add_argument("--baseline-frames", default="1000,2000",
                   help="frame counts to decode into one float32 tensor (comma separated)")
    p.add_argument("--width", type=int, default=672)
    p.add_argument("--height", type=int, default=384)
    p.add_argument("--fps", type=float, default=30)
    p.add_argument("--chunk", type=int, default=32, help="frames per iter_frames chunk")
    p.add_argument("--workdir", default=None,
                   help="where the source and outputs go (kept); default a temp dir, removed unless --keep")
    p.add_argument("--keep", action="store_true", help="keep the default temp work dir (and its cached source)")
    p.add_argument("--child", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    p.add_argument("--source", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        run_child(args)
        return 0
    owned = args.workdir is None
    if owned:
        args.workdir = os.path.join(tempfile.gettempdir(), "longedit-bench-video_io")
    try:
        return run_parent(args)
    finally:
        if owned and not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
