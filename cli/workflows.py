"""Finding a workflow, reading it in either format, and the runner's edits to it (--set, --prompt, --video)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .workflow_format import WorkflowError, input_specs, ui_to_api

BUILTIN = Path(__file__).resolve().parents[1] / "workflows"
SAMPLE_VIDEO = "longedit_sample.mp4"  # the name the shipped workflows load; written on demand
VIDEO_LOADERS = {"LongEditLoadVideo": "video", "LoadVideo": "file"}  # node type -> its file input
ADAFLOW_MODEL_NODES = ("LongEditAdaFlowKeyframeEditing", "LongEditAdaFlowLatentPropagation",
                       "LongEditAdaFlowAttentionSlimming")
SPREAD_NODE = "LongEditSpreadOverGpus"
# stages before sampling that spread over the actors too
SPREAD_STAGE_NODES = ("LongEditAdaFlowKeyframeSelection", "LongEditAdaFlowInvert")


class CliError(Exception):
    """A failure the user can act on; `code` is the process exit status."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


@dataclass
class Workflow:
    path: Path
    ui: dict | None  # the UI-format graph, when the file was one (also saved into the outputs' metadata)
    api: dict | None  # the API prompt; None until a UI file without an API twin is converted

    def prompt(self, object_info: dict) -> dict:
        if self.api is None:
            try:
                self.api = ui_to_api(self.ui, object_info)
            except WorkflowError as e:
                raise CliError(f"{self.path}: {e}") from None
        return self.api


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN.glob("*.json"))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"cannot read workflow {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise CliError(f"workflow {path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, dict):
        raise CliError(f"workflow {path} is not a ComfyUI workflow (a JSON object was expected)")
    return data


def is_api(data: dict) -> bool:
    return bool(data) and all(isinstance(v, dict) and "class_type" in v for v in data.values())


def load_workflow(ref: str) -> Workflow:
    """A path, or the name of a shipped workflow. A UI file is run through its API twin in api/ when it has one
    (the shipped workflows do); otherwise it is converted as the frontend would."""
    path = Path(ref).expanduser()
    if not path.is_file():
        name = ref[:-5] if ref.endswith(".json") else ref
        if "/" in ref or not (BUILTIN / f"{name}.json").is_file():
            raise CliError(f"no workflow file '{ref}' and no shipped workflow of that name "
                           f"(shipped: {', '.join(builtin_names())})")
        path = BUILTIN / f"{name}.json"
    data = _read_json(path)
    if isinstance(data.get("nodes"), list):
        twin = path.parent / "api" / path.name
        return Workflow(path, data, _read_json(twin) if twin.is_file() else None)
    if is_api(data):
        return Workflow(path, None, data)
    raise CliError(f"{path} is neither a UI-format workflow (no 'nodes' list) nor an API-format prompt")


def node_label(prompt: dict, node_id: str) -> str:
    entry = prompt[node_id]
    return f"node {node_id} ({entry.get('_meta', {}).get('title') or entry['class_type']})"


def find_node(prompt: dict, ref: str) -> str:
    """A node by id, or by title (case-insensitive) when the title is unique."""
    if ref in prompt:
        return ref
    matches = [i for i, e in prompt.items() if e.get("_meta", {}).get("title", "").lower() == ref.lower()]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise CliError(f"several nodes are titled '{ref}' ({', '.join(matches)}); use the node id")
    known = "; ".join(f"{i} = {e.get('_meta', {}).get('title') or e['class_type']}" for i, e in prompt.items())
    raise CliError(f"no node '{ref}' in the workflow (nodes: {known})")


@dataclass
class Assignment:
    node: str
    input: str
    text: str


def parse_assignment(text: str) -> Assignment:
    """NODE.INPUT=VALUE; NODE may contain dots (titles do), INPUT never does."""
    key, sep, value = text.partition("=")
    node, dot, name = key.strip().rpartition(".")
    if not sep or not dot or not node or not name:
        raise CliError(f"--set '{text}' is not NODE.INPUT=VALUE (e.g. --set \"Load Video (LongEdit).frame_cap=100\")")
    return Assignment(node.strip(), name.strip(), value)


def _coerce(text: str, kind, options: dict, label: str):
    """VALUE as the input's type: numbers, booleans, or a string (combo choices stay strings, e.g. '8')."""
    try:
        if kind == "INT":
            return int(text)
        if kind == "FLOAT":
            return float(text)
    except ValueError:
        raise CliError(f"{label} takes {kind}, not '{text}'") from None
    if kind == "BOOLEAN":
        if text.lower() not in ("true", "false", "1", "0"):
            raise CliError(f"{label} takes true or false, not '{text}'")
        return text.lower() in ("true", "1")
    choices = kind if isinstance(kind, list) else options.get("options") if kind == "COMBO" else None
    if choices and text not in choices and not _is_file_list(choices, options):
        raise CliError(f"{label} must be one of {', '.join(map(str, choices))}; got '{text}'")
    return text


def _is_file_list(choices: list, options: dict) -> bool:
    return any(options.get(k) for k in ("image_upload", "video_upload")) or any(
        isinstance(c, str) and "." in c for c in choices)


def apply_assignment(prompt: dict, a: Assignment, object_info: dict) -> None:
    node_id = find_node(prompt, a.node)
    entry = prompt[node_id]
    label = f"{node_label(prompt, node_id)} input '{a.input}'"
    specs = {name: (kind, options) for name, kind, options, _ in input_specs(object_info[entry["class_type"]])}
    if a.input not in specs:
        raise CliError(f"{node_label(prompt, node_id)} has no input '{a.input}' (inputs: {', '.join(specs)})")
    current = entry["inputs"].get(a.input)
    if isinstance(current, list):
        raise CliError(f"{label} is connected to node {current[0]}; --set only sets values, not connections")
    kind, options = specs[a.input]
    entry["inputs"][a.input] = _coerce(a.text, kind, options, label)


def positive_prompt_nodes(prompt: dict) -> list[str]:
    """Text nodes feeding a sampler's `positive` input directly (CLIP Text Encode and the like)."""
    found = []
    for entry in prompt.values():
        link = entry["inputs"].get("positive")
        if isinstance(link, list) and link[0] in prompt:
            source = prompt[link[0]]
            if isinstance(source["inputs"].get("text"), str) and link[0] not in found:
                found.append(link[0])
    return found


def require_positive_prompt(prompt: dict) -> list[str]:
    nodes = positive_prompt_nodes(prompt)
    if not nodes:
        raise CliError("--prompt: this workflow has no text node connected to a sampler's 'positive' input; "
                       "use --set NODE.text=...")
    return nodes


def set_positive_prompt(prompt: dict, text: str) -> None:
    for node_id in require_positive_prompt(prompt):
        prompt[node_id]["inputs"]["text"] = text


def video_loaders(prompt: dict) -> list[str]:
    return [i for i, e in prompt.items() if e["class_type"] in VIDEO_LOADERS]


def set_video(prompt: dict, name: str) -> None:
    for node_id in video_loaders(prompt):
        inputs = prompt[node_id]["inputs"]
        inputs[VIDEO_LOADERS[prompt[node_id]["class_type"]]] = name
        if "path" in inputs:  # a path overrides the chosen file in Load Video (LongEdit)
            inputs["path"] = ""


def needs_sample(prompt: dict, object_info: dict) -> bool:
    """Without --video: use the sample where a loader points at it or at a file the input folder lacks."""
    for node_id in video_loaders(prompt):
        entry = prompt[node_id]
        name = VIDEO_LOADERS[entry["class_type"]]
        specs = {n: (k, o) for n, k, o, _ in input_specs(object_info[entry["class_type"]])}
        kind, options = specs[name]
        available = kind if isinstance(kind, list) else options.get("options", [])
        value = entry["inputs"].get(name)
        if value == SAMPLE_VIDEO or value not in available:
            return True
    return False


def write_sample(path: Path) -> None:
    """The sample video: 4 s at 24 fps, 336x192, moving shapes, scene cuts at 1.33 s and 2.67 s, a tone."""
    import os

    from ..core.video.sample import write_sample_video

    partial = path.with_name(f".{path.name}.partial")  # hidden until complete: never a half-written input
    write_sample_video(str(partial), frames=96, width=336, height=192, fps=24, audio_seconds=4.0,
                       scene_cuts=[32, 64], container="mp4")
    os.replace(partial, path)


def spread_over_gpus(prompt: dict, gpus: int, address: str = "") -> list[str]:
    """--gpus / --ray-address: put Spread Edit over GPUs (Ray) between the AdaFlow-patched MODEL and whatever
    samples with it, and on the MODEL of Keyframe Selection and Invert; returns the new node ids. Nodes that
    patch the model further (Latent Propagation after Keyframe Editing) keep their input: the option goes on
    the last model of the chain."""
    if gpus < 1:
        raise CliError(f"--gpus {gpus}: give 1 or more")
    patched = {i for i, e in prompt.items() if e["class_type"] in ADAFLOW_MODEL_NODES}
    if not patched:
        raise CliError("--gpus/--ray-address: this workflow has no AdaFlow Keyframe Editing node; only AdaFlow "
                       "edits spread over GPUs")
    added, spread_of = [], {}
    for node_id, entry in list(prompt.items()):
        if entry["class_type"] in ADAFLOW_MODEL_NODES or entry["class_type"] == SPREAD_NODE:
            continue
        for name, link in entry["inputs"].items():
            if isinstance(link, list) and link[0] in patched and link[1] == 0:
                if link[0] not in spread_of:
                    new_id = str(max((int(i) for i in prompt if i.isdigit()), default=0) + 1)
                    prompt[new_id] = {"class_type": SPREAD_NODE, "inputs": {
                        "model": [link[0], 0], "gpus": int(gpus), "ray_address": address},
                        "_meta": {"title": f"Spread Edit over {gpus} GPUs (--gpus)"}}
                    spread_of[link[0]] = new_id
                    added.append(new_id)
                entry["inputs"][name] = [spread_of[link[0]], 0]
    stage_spread = {}  # one node per MODEL the stages take
    for entry in list(prompt.values()):  # stages that spread their own work read the option from their MODEL
        link = entry["inputs"].get("model")
        if entry["class_type"] in SPREAD_STAGE_NODES and isinstance(link, list) \
                and prompt[link[0]]["class_type"] != SPREAD_NODE:
            if tuple(link) not in stage_spread:
                new_id = str(max((int(i) for i in prompt if i.isdigit()), default=0) + 1)
                prompt[new_id] = {"class_type": SPREAD_NODE, "inputs": {"model": link, "gpus": int(gpus),
                                                                         "ray_address": address},
                                  "_meta": {"title": f"Spread over {gpus} GPUs (--gpus)"}}
                stage_spread[tuple(link)] = new_id
                added.append(new_id)
            entry["inputs"]["model"] = [stage_spread[tuple(link)], 0]
    return added
