"""ComfyUI's two workflow formats, as its frontend (1.27) writes them, from a server's /object_info.

- UI format: what *Save* / *Export* writes (nodes with positions and `widgets_values`, a link table).
- API format: what *Export (API)* writes and `/prompt` takes (`{id: {inputs, class_type, _meta}}`).

`ui_to_api` does the frontend's conversion for plain graphs; `widget_names` gives the order in which the
frontend stores widget values (its own `control_after_generate` value after every seed, its upload button
last), which is the part that is easy to get wrong by hand. `check_api` checks an API prompt against
/object_info the way the server's validation would, except for file lists (models, videos), which depend
on the machine. No ComfyUI import: the object_info dict is all it needs.
"""
from __future__ import annotations

import copy
from typing import Any

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
NOTE_TYPES = ("Note", "MarkdownNote")  # frontend-only: never sent to the server
SEED_NAMES = ("seed", "noise_seed")  # the frontend adds control_after_generate to these INTs by name
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload")
CONTROL_WIDGET = "control_after_generate"
UPLOAD_WIDGET = "upload"
MODE_MUTED, MODE_BYPASS = 2, 4
# Widgets that frontend extensions add to core nodes: not saved in `widgets_values`, but sent to the server
# (which ignores them). Listed so that converted prompts equal the frontend's own Export (API).
EXTENSION_WIDGETS = {"PreviewAny": {"preview": ""}}


class WorkflowError(ValueError):
    """A workflow that cannot be read or converted; the message says what and where."""


def input_specs(info: dict) -> list[tuple[str, Any, dict, bool]]:
    """(name, type, options, optional) of a node's inputs, in the order the frontend lays them out."""
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    specs = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = info["input"][section][name]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            specs.append((name, spec[0], options, section == "optional"))
    return specs


def is_widget(kind: Any, options: dict) -> bool:
    """Widgets are the INT/FLOAT/STRING/BOOLEAN/COMBO inputs (a list of options is an old-style COMBO)."""
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput")


def has_control(name: str, kind: Any, options: dict) -> bool:
    return bool(options.get(CONTROL_WIDGET)) or (kind == "INT" and name in SEED_NAMES)


def widget_names(info: dict) -> list[str]:
    """Names of the node's widgets in `widgets_values` order, including the frontend's extra widgets."""
    names, upload = [], False
    for name, kind, options, optional in input_specs(info):
        if not is_widget(kind, options):
            continue
        names.append(name)
        if has_control(name, kind, options):
            names.append(CONTROL_WIDGET)
        upload |= not optional and any(options.get(flag) for flag in UPLOAD_FLAGS)
    return names + ([UPLOAD_WIDGET] if upload else [])


def socket_inputs(info: dict) -> list[tuple[str, str, bool]]:
    """(name, type, optional) of the inputs drawn as sockets (not widgets), in slot order."""
    return [(name, kind, optional) for name, kind, options, optional in input_specs(info)
            if not is_widget(kind, options)]


def display_title(info: dict | None, node_type: str) -> str:
    return (info or {}).get("display_name") or node_type


def _node_info(object_info: dict, node: dict) -> dict:
    info = object_info.get(node["type"])
    if info is None:
        raise WorkflowError(f"node {node['id']} is a '{node['type']}', which this ComfyUI does not have "
                            "(a custom node pack is missing)")
    return info


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API prompt the frontend's graphToPrompt makes from a UI workflow (no subgraphs, no bypass)."""
    if workflow.get("definitions", {}).get("subgraphs"):
        raise WorkflowError("this workflow uses subgraphs; open it in ComfyUI and use Workflow > Export (API)")
    if not isinstance(workflow.get("nodes"), list) or not isinstance(workflow.get("links"), list):
        raise WorkflowError("not a UI-format workflow (no 'nodes' and 'links' lists)")
    links = {link[0]: link for link in workflow["links"]}
    nodes = {node["id"]: node for node in workflow["nodes"]}
    prompt = {}
    for node in sorted(workflow["nodes"], key=lambda n: n["id"]):  # JS orders integer keys numerically
        if node["type"] in NOTE_TYPES or node.get("mode", 0) == MODE_MUTED:
            continue
        if node.get("mode", 0) == MODE_BYPASS:
            raise WorkflowError(f"node {node['id']} ({node['type']}) is bypassed; un-bypass or delete it, or "
                                "export the API format from ComfyUI")
        info = _node_info(object_info, node)
        inputs = _widget_inputs(node, info)
        for slot in node.get("inputs", []):
            if slot.get("link") is None:
                continue
            link = links.get(slot["link"])
            if link is None:
                raise WorkflowError(f"node {node['id']} input '{slot['name']}' refers to link {slot['link']}, "
                                    "which the workflow does not have")
            inputs[slot["name"]] = [str(link[1]), int(link[2])]
        prompt[str(node["id"])] = {"inputs": inputs, "class_type": node["type"],
                                   "_meta": {"title": node.get("title") or display_title(info, node["type"])}}
    for entry in prompt.values():  # as the frontend: links from muted or missing nodes are dropped
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and value[0] not in prompt:
                if int(value[0]) in nodes and nodes[int(value[0])]["type"] in NOTE_TYPES:
                    raise WorkflowError(f"input '{name}' is connected to a note")
                del entry["inputs"][name]
    return prompt


def _widget_inputs(node: dict, info: dict) -> dict:
    names = widget_names(info)
    values = node.get("widgets_values") or []
    if isinstance(values, dict):  # some packs store widgets by name
        values = [values.get(n) for n in names]
    if len(values) != len(names):
        raise WorkflowError(f"node {node['id']} ({node['type']}) has {len(values)} widget values but this ComfyUI "
                            f"defines {len(names)} widgets ({', '.join(names)}); the workflow was saved with "
                            "another version of the node")
    inputs = {name: value for name, value in zip(names, values) if name not in (CONTROL_WIDGET, UPLOAD_WIDGET)}
    return inputs


def with_api_values(workflow: dict, prompt: dict, object_info: dict) -> dict:
    """A copy of the UI workflow whose widget values are the prompt's (after the runner changed some), so that
    the graph saved into the outputs' metadata is the one that ran."""
    updated = copy.deepcopy(workflow)
    for node in updated["nodes"]:
        entry = prompt.get(str(node["id"]))
        if entry is None or node["type"] not in object_info or not isinstance(node.get("widgets_values"), list):
            continue
        for index, name in enumerate(widget_names(object_info[node["type"]])):
            value = entry["inputs"].get(name)
            if index < len(node["widgets_values"]) and value is not None and not isinstance(value, list):
                node["widgets_values"][index] = value
    return updated


def check_api(prompt: dict, object_info: dict, file_inputs: bool = False) -> list[str]:
    """Problems with an API prompt against /object_info: unknown nodes or inputs, missing required inputs,
    links to missing nodes or outputs of the wrong type, combo values not offered, numbers out of range.
    Combos whose options are files (models, videos) are checked only with `file_inputs`."""
    problems = []
    for node_id, entry in prompt.items():
        info = object_info.get(entry.get("class_type"))
        where = f"node {node_id} ({entry.get('class_type')})"
        if info is None:
            problems.append(f"{where}: no such node type")
            continue
        specs = {name: (kind, options, optional) for name, kind, options, optional in input_specs(info)}
        for name in entry["inputs"]:
            if name not in specs and name not in EXTENSION_WIDGETS.get(entry["class_type"], {}):
                problems.append(f"{where}: unknown input '{name}'")
        for name, (kind, options, optional) in specs.items():
            if name not in entry["inputs"]:
                if not optional:
                    problems.append(f"{where}: required input '{name}' is missing")
                continue
            problems += [f"{where}: {p}" for p in
                         _check_value(prompt, object_info, name, kind, options, entry["inputs"][name], file_inputs)]
    return problems


def _check_value(prompt, object_info, name, kind, options, value, file_inputs) -> list[str]:
    if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
        source = prompt.get(value[0])
        if source is None:
            return [f"input '{name}' is connected to node {value[0]}, which is not in the prompt"]
        outputs = object_info.get(source["class_type"], {}).get("output", [])
        if value[1] >= len(outputs):
            return [f"input '{name}' is connected to output {value[1]} of node {value[0]}, which has {len(outputs)}"]
        produced = outputs[value[1]]
        expected = "COMBO" if isinstance(kind, list) else kind
        if "*" not in (produced, expected) and produced != expected and not set(str(produced).split(",")) & set(
                str(expected).split(",")):
            return [f"input '{name}' takes {expected} but node {value[0]} gives {produced}"]
        return []
    choices = kind if isinstance(kind, list) else options.get("options") if kind == "COMBO" else None
    if choices is not None:
        # a model file chosen where this ComfyUI has none of that kind yet (VAELoader then offers only
        # 'pixel_space') is a missing file, checked with `file_inputs`, not a bad choice
        files = (not choices or any(options.get(flag) for flag in UPLOAD_FLAGS) or _looks_like_files(choices)
                 or _looks_like_files([value]))
        if value not in choices and (file_inputs or not files):
            return [f"input '{name}' = {value!r} is not one of {choices[:8]}"]
        return []
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "INT" and value != int(value)):
            return [f"input '{name}' = {value!r} is not {kind}"]
        low, high = options.get("min"), options.get("max")
        if (low is not None and value < low) or (high is not None and value > high):
            return [f"input '{name}' = {value} is outside [{low}, {high}]"]
    if kind == "STRING" and not isinstance(value, str):
        return [f"input '{name}' = {value!r} is not a string"]
    if kind == "BOOLEAN" and not isinstance(value, bool):
        return [f"input '{name}' = {value!r} is not a boolean"]
    return []


def _looks_like_files(choices: list) -> bool:
    return any(isinstance(c, str) and c.rsplit(".", 1)[-1] in ("safetensors", "ckpt", "pt", "pth", "bin", "gguf",
                                                               "sft") for c in choices)


def js_numbers(value: Any) -> Any:
    """Floats with integral values as ints, as JavaScript's JSON.stringify writes them (8.0 -> 8)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, list):
        return [js_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: js_numbers(v) for k, v in value.items()}
    return value
