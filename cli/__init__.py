"""The headless runner: `python -m longedit run WORKFLOW [options] [-- COMFYUI ARGS]`.

Runs a shipped workflow (by name) or any workflow file, in this process through ComfyUI's execution engine
(ComfyUI found through COMFYUI_PATH) or on a running ComfyUI (--server). Prints progress, the nodes' text
(AdaFlow's memory plan, the keyframe summary) and the output files; exits with 0 on success, 1 when the
workflow fails to validate or run, 2 on a usage error, 130 when interrupted, each failure with one line.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .report import Reporter
from .workflow_format import NOTE_TYPES, with_api_values
from .workflows import (CliError, apply_assignment, builtin_names, find_node, load_workflow, needs_sample,
                        parse_assignment, require_positive_prompt, set_positive_prompt, set_video, spread_over_gpus,
                        video_loaders)

EXAMPLES = """examples:
  python -m longedit run adaflow_long_video_edit --video clip.mp4 --prompt "a watercolor painting"
  python -m longedit run adaflow_keyframe_preview --video clip.mp4 --set "AdaFlow Keyframe Selection.tau_mean=0.8"
  python -m longedit run my_workflow.json --server http://127.0.0.1:8188
  python -m longedit run adaflow_short_clip_edit --set 2.frame_cap=16 -- --cpu --output-directory out

Arguments after `--` go to ComfyUI (in-process runs only), e.g. --cpu, --lowvram, --output-directory."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like the runner's other errors
        self.exit(2, f"longedit: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m longedit", description="LongEdit's headless workflow runner.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    run = commands.add_parser("run", help="run a workflow", epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              description="Run a workflow without the browser.")
    run.add_argument("workflow", help=f"a workflow file (UI or API format) or a shipped name: "
                                      f"{', '.join(builtin_names())}")
    run.add_argument("--video", type=Path, help="the video to load (put into ComfyUI's input folder); without it "
                                                "a small generated sample is used")
    run.add_argument("--prompt", help="the text of the positive prompt (the text node feeding the sampler)")
    run.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                     help="set an input; NODE is a node id or title (repeatable)")
    run.add_argument("--server", metavar="URL", help="run on this ComfyUI (e.g. http://127.0.0.1:8188) instead of "
                                                     "in this process")
    run.add_argument("--gpus", type=int, default=1, metavar="N",
                     help="spread the AdaFlow edit (keyframe features, inversion, sampling) over N GPUs (Ray actors; "
                          "needs `pip install longedit[ray]` in ComfyUI's Python)")
    run.add_argument("--ray-address", default="", metavar="ADDR",
                     help="with --gpus: a running Ray cluster (e.g. auto, ray://head:10001) instead of a local one")
    run.add_argument("-v", "--verbose", action="store_true", help="show ComfyUI's log (INFO)")
    return parser


def check_early(prompt: dict, assignments, args) -> None:
    """What can be checked before ComfyUI starts (which takes a while)."""
    for a in assignments:
        find_node(prompt, a.node)
    if args.prompt is not None:
        require_positive_prompt(prompt)
    if args.gpus != 1 or args.ray_address:
        spread_over_gpus(json.loads(json.dumps(prompt)), args.gpus, args.ray_address)  # a copy: checked only
    if args.video is not None and not video_loaders(prompt):
        raise CliError("--video: this workflow has no video loader (Load Video (LongEdit) or Load Video)")


def run(args, comfy_args: list[str]) -> int:
    workflow = load_workflow(args.workflow)
    assignments = [parse_assignment(s) for s in args.set]
    if args.video is not None and not args.video.is_file():
        raise CliError(f"--video {args.video}: no such file")
    if workflow.api is not None:
        check_early(workflow.api, assignments, args)
    if args.server:
        if comfy_args:
            raise CliError("arguments after -- configure an in-process ComfyUI; they do not apply with --server")
        from .remote import RemoteComfy
        backend = RemoteComfy(args.server)
    else:
        from .local import LocalComfy, find_comfy
        find_comfy()  # fail fast without COMFYUI_PATH
        backend = LocalComfy(comfy_args, args.verbose)
    try:
        return execute(workflow, assignments, args, backend)
    except KeyboardInterrupt:
        if args.server:
            backend.interrupt()
        raise


def execute(workflow, assignments, args, backend) -> int:
    backend.start()
    types = {n["type"] for n in workflow.ui["nodes"]} if workflow.ui else set()
    types |= {e["class_type"] for e in (workflow.api or {}).values()}
    object_info = backend.object_info(types - set(NOTE_TYPES))
    prompt = workflow.prompt(object_info)
    missing = sorted({e["class_type"] for e in prompt.values()} - set(object_info))
    if missing:
        raise CliError(f"this ComfyUI has no node type {', '.join(missing)} (a custom node pack is missing)")
    check_early(prompt, assignments, args)
    for a in assignments:
        apply_assignment(prompt, a, object_info)
    if args.prompt is not None:
        set_positive_prompt(prompt, args.prompt)
    if args.gpus != 1 or args.ray_address:
        spread_over_gpus(prompt, args.gpus, args.ray_address)
    report = Reporter(prompt)
    if video_loaders(prompt):
        if args.video is not None:
            set_video(prompt, backend.add_video(args.video))
        elif needs_sample(prompt, object_info):
            report.say("no --video: using a generated sample (96 frames with scene cuts and sound)")
            set_video(prompt, backend.ensure_sample())
    report.say(f"running {workflow.path.name}: {len(prompt)} nodes, " + (f"on {args.server}" if args.server
                                                                          else "in this process"))
    graph_metadata = {"workflow": with_api_values(workflow.ui, prompt, object_info)} if workflow.ui else None
    result = backend.run(prompt, graph_metadata, report.event)
    if not result.success:
        raise CliError(result.error, code=1)
    if not report.files(result.outputs, backend.locate):
        report.say("done (this workflow writes no output file)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    comfy_args = []
    if "--" in argv:
        split = argv.index("--")
        argv, comfy_args = argv[:split], argv[split + 1:]
    args = build_parser().parse_args(argv)
    try:
        return run(args, comfy_args)
    except CliError as e:
        print(f"longedit: error: {e}", file=sys.stderr, flush=True)
        return e.code
    except KeyboardInterrupt:
        print("longedit: interrupted", file=sys.stderr, flush=True)
        return 130
