"""What the runner prints: node progress, the nodes' UI text (memory plan, keyframe summary) and outputs.

Both backends feed it ComfyUI's own event names and payloads (the websocket messages of the server, or
the same messages of the in-process executor), so one printer serves both.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from .workflows import node_label

PROGRESS_STEPS = 10  # print a node's progress at every tenth of its total (and at the end)


@dataclass
class RunResult:
    success: bool
    outputs: dict = field(default_factory=dict)  # node id -> the node's UI output (images, text, ...)
    error: str | None = None


class Reporter:
    def __init__(self, prompt: dict, out=None):
        self.prompt = prompt
        self.out = out or sys.stdout
        self.shown: dict[str, int] = {}  # node -> last tenth of progress printed

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def label(self, node) -> str:
        node = str(node)
        return node_label(self.prompt, node) if node in self.prompt else f"node {node}"

    def event(self, kind: str, data: dict) -> None:
        node = data.get("node") if isinstance(data, dict) else None
        if kind == "execution_cached" and data.get("nodes"):
            self.say("cached: " + ", ".join(self.label(n) for n in data["nodes"]))
        elif kind == "executing" and node is not None:
            self.say(f"running {self.label(node)}")
        elif kind == "progress" and node is not None and data.get("max"):
            self._progress(str(node), int(data["value"]), int(data["max"]))
        elif kind == "notice":
            self.say(data["text"])
        elif kind == "executed" and node is not None:
            for text in (data.get("output") or {}).get("text", []) or []:
                self.say(f"{self.label(node)}: {text}")

    def _progress(self, node: str, value: int, total: int) -> None:
        tenth = min(value * PROGRESS_STEPS // total, PROGRESS_STEPS)
        last = self.shown.get(node)
        restarted = last == PROGRESS_STEPS and tenth < last  # a node's second progress bar
        if last is None or tenth > last or restarted:
            self.shown[node] = tenth
            self.say(f"  {self.label(node)}: {value}/{total}")

    def files(self, outputs: dict, locate) -> list[str]:
        """Print every file the nodes reported (outputs and previews); return the paths of the outputs."""
        saved = []
        for node_id, ui in outputs.items():
            for key, items in ui.items():
                for item in items if isinstance(items, list) else []:
                    if not isinstance(item, dict) or "filename" not in item:
                        continue
                    path = locate(item)
                    kind = "output" if item.get("type", "output") == "output" else "preview"
                    self.say(f"{kind}: {path}")
                    if kind == "output":
                        saved.append(path)
        return saved


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def validation_message(prompt: dict, error: dict | None, node_errors: dict | None) -> str:
    """ComfyUI's /prompt validation result as one line: which node, which input, what is wrong."""
    parts = []
    for node_id, info in (node_errors or {}).items():
        for e in info.get("errors", []):
            label = node_label(prompt, node_id) if node_id in prompt else f"node {node_id}"
            parts.append(f"{label}: {e.get('message', '')}: {e.get('details', '')}".rstrip(": "))
    if not parts and error:
        parts.append(f"{error.get('message', '')} {error.get('details', '')}".strip())
    return one_line("the workflow does not validate: " + "; ".join(parts))


def failure_message(prompt: dict, messages: list) -> str:
    """The executor's status messages -> one line naming the failing node and its error."""
    for kind, data in messages:
        if kind == "execution_error":
            label = node_label(prompt, data["node_id"]) if data.get("node_id") in prompt else data.get("node_type")
            return one_line(f"{label} failed: {data.get('exception_message', '')}")
        if kind == "execution_interrupted":
            return f"interrupted while running {node_label(prompt, data['node_id'])}"
    return "the run failed without an error message (see ComfyUI's log)"
