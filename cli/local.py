"""Run a workflow inside this process with ComfyUI's own execution engine (no server, no browser).

ComfyUI is imported from COMFYUI_PATH as a library: its command-line arguments (those after `--`) are parsed,
its model/input/output folders set up, its built-in and custom nodes (this pack included) loaded, and the
prompt validated and executed by `execution.PromptExecutor`, as ComfyUI's queue worker does. The executor
reports to a stand-in for the PromptServer, which forwards ComfyUI's events to the runner's printer.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib
import io
import logging
import os
import shutil
import sys
import uuid
from pathlib import Path

from .report import RunResult, failure_message, validation_message
from .workflows import SAMPLE_VIDEO, CliError

PACK_DIR = Path(__file__).resolve().parents[1]
PACK_NODE = "LongEditLoadVideo"  # present once this pack's nodes are registered
CLIENT_ID = "longedit-cli"


def comfy_nodes():
    """ComfyUI's top-level nodes.py (node registry and loaders), named explicitly: inside the pack a plain
    `import nodes` reads as this pack's own nodes/ package."""
    return importlib.import_module("nodes")


def find_comfy() -> Path:
    """COMFYUI_PATH, else the ComfyUI this pack is installed in (ComfyUI/custom_nodes/<pack>)."""
    root = os.environ.get("COMFYUI_PATH")
    if root:
        path = Path(root).expanduser()
        if not (path / "main.py").is_file():
            raise CliError(f"COMFYUI_PATH={root} is not a ComfyUI folder (it has no main.py)")
        return path
    installed = PACK_DIR.parents[1]
    if PACK_DIR.parent.name == "custom_nodes" and (installed / "main.py").is_file():
        return installed
    raise CliError("COMFYUI_PATH is not set: point it at your ComfyUI folder (the one with main.py), "
                   "or pass --server URL to run on a running ComfyUI")


def parse_comfy_args():
    """ComfyUI's parsed arguments; its argparse error (usage and message) becomes one line."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            from comfy.cli_args import args
    except SystemExit:
        message = errors.getvalue().strip().splitlines()[-1:] or ["invalid arguments"]
        raise CliError(f"ComfyUI refused the arguments after --: {message[0]}") from None
    return args


class StandInServer:
    """What ComfyUI's executor and nodes use of its PromptServer: a client id, the node being run, and
    send_sync for events. `routes` and `app` exist because custom node packs register web routes at import;
    nothing is served."""

    def __init__(self, emit):
        from aiohttp import web

        self.emit = emit
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.routes = web.RouteTableDef()
        self.app = web.Application()

    def send_sync(self, event, data, sid=None):
        self.emit(event, data)

    def send_progress_text(self, text, node_id, sid=None):
        self.emit("executed", {"node": node_id, "output": {"text": [text]}})


class LocalComfy:
    def __init__(self, comfy_args: list[str], verbose: bool):
        self.comfy_args = comfy_args
        self.verbose = verbose
        self.listener = lambda event, data: None

    def start(self) -> None:
        args = self._import_comfy(find_comfy())
        self._load_nodes(args)
        import comfy.utils
        import execution

        comfy.utils.set_progress_bar_global_hook(self._progress)
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC)

    def _import_comfy(self, root: Path):
        """Import ComfyUI with its arguments parsed and folders set, as its main.py does before anything else."""
        sys.path.insert(0, str(root))
        sys.argv = [sys.argv[0], *self.comfy_args]  # ComfyUI's own argument parser reads sys.argv
        logging.basicConfig(level=logging.INFO if self.verbose else logging.WARNING, format="%(message)s",
                            stream=sys.stderr)
        try:
            import comfy.options

            comfy.options.enable_args_parsing()
            args = parse_comfy_args()
            self._set_folders(root, args)
            import cuda_malloc  # noqa: F401  (chooses the CUDA allocator before torch loads, as main.py does)
            import execution  # noqa: F401
            import server

            comfy_nodes()
        except ImportError as e:
            raise CliError(f"ComfyUI at {root} could not be imported with this Python ({e}); run the command "
                           "with ComfyUI's Python (its venv)") from None
        self.server = StandInServer(lambda event, data: self.listener(event, data))
        server.PromptServer.instance = self.server
        return args

    def _load_nodes(self, args) -> None:
        """ComfyUI's built-in and custom nodes, then this pack if ComfyUI's custom_nodes does not hold it."""
        import hook_breaker_ac10a0

        nodes = comfy_nodes()
        custom = not args.disable_all_custom_nodes or bool(args.whitelist_custom_nodes)
        hook_breaker_ac10a0.save_functions()  # custom nodes must not leave core functions replaced
        try:
            asyncio.run(nodes.init_extra_nodes(init_custom_nodes=custom, init_api_nodes=not args.disable_api_nodes))
            if PACK_NODE not in nodes.NODE_CLASS_MAPPINGS:
                asyncio.run(nodes.load_custom_node(str(PACK_DIR)))
        finally:
            hook_breaker_ac10a0.restore_functions()
        if PACK_NODE not in nodes.NODE_CLASS_MAPPINGS:
            raise CliError(f"the LongEdit nodes did not load from {PACK_DIR} (run with --verbose to see why)")

    @staticmethod
    def _set_folders(root: Path, args) -> None:
        """Model paths and input/output/temp folders from extra_model_paths.yaml and the arguments."""
        import folder_paths
        import utils.extra_config

        configs = [root / "extra_model_paths.yaml"] + [Path(p) for group in args.extra_model_paths_config or []
                                                       for p in group]
        for config in configs:
            if config.is_file():
                utils.extra_config.load_extra_path_config(str(config))
        if args.output_directory:
            folder_paths.set_output_directory(os.path.abspath(args.output_directory))
        for kind in ("checkpoints", "clip", "vae", "diffusion_models", "loras"):  # models saved by workflows
            folder_paths.add_model_folder_path(kind, os.path.join(folder_paths.get_output_directory(), kind))
        if args.input_directory:
            folder_paths.set_input_directory(os.path.abspath(args.input_directory))
        if args.user_directory:
            folder_paths.set_user_directory(os.path.abspath(args.user_directory))
        if args.temp_directory:
            folder_paths.set_temp_directory(os.path.join(os.path.abspath(args.temp_directory), "temp"))
        for folder in (folder_paths.get_input_directory(), folder_paths.get_output_directory(),
                       folder_paths.get_temp_directory()):  # nodes list input/ while they load
            os.makedirs(folder, exist_ok=True)

    def _progress(self, value, total, preview, prompt_id=None, node_id=None):
        import comfy.model_management
        from comfy_execution.utils import get_executing_context

        context = get_executing_context()
        node_id = node_id or (context.node_id if context else None) or self.server.last_node_id
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.listener("progress", {"value": value, "max": total, "node": node_id})

    def object_info(self, types: set[str]) -> dict:
        """The /object_info entries the runner reads (inputs, outputs, titles) for these node types."""
        nodes = comfy_nodes()
        info = {}
        for name in types:
            cls = nodes.NODE_CLASS_MAPPINGS.get(name)
            if cls is None:
                continue
            inputs = cls.INPUT_TYPES()
            info[name] = {"input": inputs,
                          "input_order": {s: list(inputs.get(s, {})) for s in ("required", "optional")},
                          "output": list(cls.RETURN_TYPES),
                          "output_name": list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES),
                          "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS.get(name, name)}
        return info

    def input_dir(self) -> Path:
        import folder_paths

        return Path(folder_paths.get_input_directory()).resolve()

    def add_video(self, source: Path) -> str:
        """Put the video into ComfyUI's input folder (a hard link where possible: no copy of a large file);
        the nodes read only from input/output/temp. Returns its name there."""
        source, folder = source.resolve(), self.input_dir()
        if folder in source.parents:
            return source.relative_to(folder).as_posix()
        folder.mkdir(parents=True, exist_ok=True)
        target, n = folder / source.name, 0
        while target.exists():
            same_copy = target.stat().st_size == source.stat().st_size and int(target.stat().st_mtime) == int(
                source.stat().st_mtime)
            if target.samefile(source) or same_copy:  # linked or copied by an earlier run
                return target.name
            n += 1
            target = folder / f"{source.stem}_{n}{source.suffix}"
        try:
            os.link(source, target)
        except OSError:  # another filesystem
            shutil.copy2(source, target)
        return target.name

    def ensure_sample(self) -> str:
        from .workflows import write_sample

        target = self.input_dir() / SAMPLE_VIDEO
        if not target.exists():
            write_sample(target)
        return SAMPLE_VIDEO

    def run(self, prompt: dict, extra_pnginfo: dict | None, listener) -> RunResult:
        import execution

        self.listener = listener
        prompt_id = str(uuid.uuid4())
        valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not valid or node_errors:
            return RunResult(False, error=validation_message(prompt, error, node_errors))
        extra = {"client_id": CLIENT_ID, **({"extra_pnginfo": extra_pnginfo} if extra_pnginfo else {})}
        self.executor.execute(prompt, prompt_id, extra, outputs)
        if not self.executor.success:
            return RunResult(False, error=failure_message(prompt, self.executor.status_messages))
        return RunResult(True, self.executor.history_result["outputs"])

    def locate(self, item: dict) -> str:
        import folder_paths

        folder = folder_paths.get_directory_by_type(item.get("type", "output"))
        return os.path.join(folder, item.get("subfolder", ""), item["filename"])
