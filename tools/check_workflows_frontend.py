"""Check workflows/*.json against ComfyUI's real frontend, in headless Chromium.

For each shipped workflow, two exports are compared with the files (UI format and workflows/api/ twin):
1. load:    the file is opened in the editor (app.loadGraphData) and exported again (app.graphToPrompt,
            what Save and Export (API) write);
2. rebuild: the graph is built node by node as a user would (create, connect, set widgets by name), then
            exported. The one expected difference: a node made in the editor has no `widgets_values` key until
            the graph is saved and loaded once, where nodes without widgets get `[]` (the files carry `[]`).
            The nodes' pack properties (`cnr_id`, `aux_id`, `ver`) and model links are taken from the file:
            frontend 1.27 keeps them but does not write them (ComfyUI-Manager's extension does).
The API twins leave out the inputs frontend extensions add to core nodes (PreviewAny's `preview`), so those
are dropped from the frontend's Export (API) before comparing (tools/build_workflows.py does the same).

Needs a running ComfyUI with this pack, Chromium, and aiohttp (run it with ComfyUI's Python):

    /path/to/ComfyUI/venv/bin/python tools/check_workflows_frontend.py --server http://127.0.0.1:8188
"""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_workflows import without_extension_inputs  # noqa: E402

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"

LOAD = """(async (ui, name) => {
  await app.loadGraphData(ui, true, true, name);
  const p = await app.graphToPrompt();
  p.workflow.extra.ds = {scale: app.canvas.ds.scale, offset: [...app.canvas.ds.offset]};
  return JSON.parse(JSON.stringify(p));
})"""

REBUILD = """(async (ui, api) => {
  app.graph.clear();
  const byId = {};
  for (const n of ui.nodes) {
    const node = LiteGraph.createNode(n.type);
    node.id = n.id; node.pos = [...n.pos]; node.size = [...n.size];
    if (n.title) node.title = n.title;
    node.properties = {...n.properties, ...node.properties};  // the file's key order, the editor's values
    app.graph.add(node); byId[n.id] = node;
  }
  app.graph.last_node_id = ui.last_node_id;
  for (const l of ui.links) {
    const target = byId[l[3]];
    const name = ui.nodes.find(n => n.id === l[3]).inputs[l[4]].name;
    byId[l[1]].connect(l[2], target, target.inputs.findIndex(i => i.name === name));
  }
  for (const n of ui.nodes) {
    const node = byId[n.id];
    if (!api[String(n.id)]) { node.widgets[0].value = n.widgets_values[0]; continue; }  // a note
    const values = api[String(n.id)].inputs;
    for (const w of node.widgets || []) {
      if (w.name in values && !Array.isArray(values[w.name])) w.value = values[w.name];
      if (w.name === 'control_after_generate') w.value = 'fixed';
    }
  }
  app.canvas.ds.scale = ui.extra.ds.scale; app.canvas.ds.offset = [...ui.extra.ds.offset];
  const p = await app.graphToPrompt();
  p.workflow.extra.ds = {scale: app.canvas.ds.scale, offset: [...app.canvas.ds.offset]};
  return JSON.parse(JSON.stringify(p));
})"""


def differences(ours, theirs, path="") -> list[str]:
    """Paths where two JSON values differ, key order included (it decides the bytes written)."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        out = [f"{path}.{k}: only in {'ours' if k in ours else 'frontend'}" for k in set(ours) ^ set(theirs)]
        for k in ours:
            if k in theirs:
                out += differences(ours[k], theirs[k], f"{path}.{k}")
        if not out and list(ours) != list(theirs):
            out.append(f"{path}: key order {list(ours)} vs {list(theirs)}")
        return out
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        return [d for i, (a, b) in enumerate(zip(ours, theirs)) for d in differences(a, b, f"{path}[{i}]")]
    if ours != theirs or type(ours) is not type(theirs):
        return [f"{path}: ours {json.dumps(ours)[:120]} vs frontend {json.dumps(theirs)[:120]}"]
    return []


class Page:
    """One Chromium tab driven over the DevTools protocol."""

    def __init__(self, chromium: str, port: int):
        self.port = port
        self.process = subprocess.Popen(
            [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", f"--remote-debugging-port={port}",
             f"--user-data-dir={tempfile.mkdtemp()}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def open(self, url: str) -> None:
        import aiohttp

        for _ in range(100):
            try:
                tabs = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json", timeout=1).read())
                break
            except OSError:
                time.sleep(0.2)
        tab = next(t for t in tabs if t["type"] == "page")
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(tab["webSocketDebuggerUrl"], max_msg_size=0)
        self.calls = 0
        await self.call("Page.navigate", url=url)
        ready = "!!(window.app && app.graph && Object.keys(LiteGraph.registered_node_types).length > 50)"
        for _ in range(240):
            try:
                if await self.eval(ready):
                    return
            except RuntimeError:
                pass
            await asyncio.sleep(0.5)
        raise TimeoutError(f"the frontend at {url} did not load")

    async def call(self, method: str, **params):
        self.calls += 1
        await self.ws.send_json({"id": self.calls, "method": method, "params": params})
        while True:
            message = await self.ws.receive_json()
            if message.get("id") == self.calls:
                if "error" in message:
                    raise RuntimeError(message["error"])
                return message["result"]

    async def eval(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(json.dumps(result["exceptionDetails"])[:1000])
        return result["result"].get("value")

    async def close(self) -> None:
        await self.session.close()
        self.process.terminate()


async def check(server: str, chromium: str, port: int) -> int:
    page = Page(chromium, port)
    failures = 0
    try:
        await page.open(server)
        for path in sorted(WORKFLOWS.glob("*.json")):
            ui = json.loads(path.read_text())
            api = json.loads((WORKFLOWS / "api" / path.name).read_text())
            loaded = await page.eval(f"{LOAD}({json.dumps(ui)}, {json.dumps(path.stem)})")
            rebuilt = await page.eval(f"{REBUILD}({json.dumps(ui)}, {json.dumps(api)})")
            for node in rebuilt["workflow"]["nodes"]:
                node.setdefault("widgets_values", [])
            found = differences(ui, loaded["workflow"])
            found += differences(api, without_extension_inputs(loaded["output"]), "api")
            found += differences({**ui, "id": None}, {**rebuilt["workflow"], "id": None}, "rebuild")
            found += differences(api, without_extension_inputs(rebuilt["output"]), "rebuild.api")
            print(f"{path.name}: " + ("same as the frontend's exports" if not found else "\n  " + "\n  ".join(found)))
            failures += bool(found)
    finally:
        await page.close()
    return 1 if failures else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default="http://127.0.0.1:8188")
    ap.add_argument("--chromium", default="chromium")
    ap.add_argument("--port", type=int, default=9333, help="Chromium's DevTools port")
    a = ap.parse_args()
    return asyncio.run(check(a.server.rstrip("/"), a.chromium, a.port))


if __name__ == "__main__":
    sys.exit(main())
