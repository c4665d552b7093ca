"""The browser tier: ComfyUI's own frontend, driven by headless Chromium through Playwright.

A real ComfyUI server with this pack (tests/comfy_harness.start_comfy) serves its frontend; each test
opens it in a fresh browser context. Needs, else every test here is skipped with the reason:

- COMFYUI_PATH (and COMFYUI_VENV), as for the integration tier;
- the `playwright` Python package (`pip install playwright`; its wheel downloads no browser);
- a Chromium: $CHROMIUM_PATH, else `chromium`, `chromium-browser`, `google-chrome` or
  `google-chrome-stable` on PATH (Debian: `apt-get install chromium`). Playwright is pointed at it with
  `executable_path`; `playwright install` is never needed.

LONGEDIT_WORKFLOWS names another folder of UI-format workflows to test instead of `workflows/`.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import pytest

from comfy_harness import start_comfy, stop_comfy

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
VIEWPORT = {"width": 1920, "height": 1080}
PAGE_READY_TIMEOUT_MS = 120_000
NETWORK_FAILURES = ("Failed to load resource", "Failed to fetch")

# Set on the server before any page opens (the user's comfy.settings.json): no first-run template browser,
# the load warnings this tier checks are on, and nothing but the graph is drawn in screenshots.
SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Workflow.ShowMissingNodesWarning": True,
    "Comfy.Workflow.ShowMissingModelsWarning": True,
    "Comfy.Validation.Workflows": True,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
    "Comfy.Graph.CanvasMenu": False,
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,  # full detail at any zoom, so a fitted graph stays legible
}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "browser: ComfyUI's frontend in headless Chromium (needs COMFYUI_PATH, playwright, Chromium)")


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).parent == here:
            item.add_marker(pytest.mark.browser)


def find_chromium() -> str | None:
    explicit = os.environ.get("CHROMIUM_PATH")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def comfy_ui(tmp_path_factory):
    """ComfyUI with this pack and the SETTINGS above, after checking every prerequisite of the tier."""
    if not os.environ.get("COMFYUI_PATH"):
        pytest.skip("browser tier: COMFYUI_PATH is not set (a ComfyUI checkout; see README 'Tests')")
    pytest.importorskip("playwright.sync_api", reason="browser tier: the playwright package is not installed "
                        "(pip install playwright; no browser download is needed)")
    if find_chromium() is None:
        if os.environ.get("CHROMIUM_PATH"):
            pytest.skip(f"browser tier: CHROMIUM_PATH={os.environ['CHROMIUM_PATH']} is not a file")
        pytest.skip("browser tier: no Chromium found (set CHROMIUM_PATH, or install Debian's `chromium`; "
                    f"looked for {', '.join(CHROMIUM_NAMES)} on PATH)")
    server = start_comfy(tmp_path_factory.mktemp("comfy_browser"))
    try:
        status, body = server.post("/settings", SETTINGS)
        assert status == 200, f"POST /settings answered {status}: {body}"
        yield server
    finally:
        stop_comfy(server)


@pytest.fixture(scope="module")
def chromium(comfy_ui):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=find_chromium(), headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def comfy_page(comfy_ui, chromium):
    """A fresh browser context showing ComfyUI's frontend, ready (node definitions loaded, graph empty)."""
    context = chromium.new_context(viewport=VIEWPORT, device_scale_factor=1)
    # Hermetic: the frontend asks api.comfy.org for release notes and the like; only our server answers.
    context.route(lambda url: not url.startswith(comfy_ui.url), lambda route: route.abort())
    page = ComfyPage(context.new_page(), comfy_ui)
    try:
        page.open()
        yield page
    finally:
        context.close()


class ComfyPage:
    """ComfyUI's frontend (1.27) in one page, with what the tests do and read there. The JavaScript uses
    the globals the frontend exposes to extensions (`app`, `app.extensionManager`, `LiteGraph`,
    `window.comfyAPI.api.api`); the DOM is read through PrimeVue's dialog and toast classes and the Run
    button's test id."""

    def __init__(self, page, server):
        self.page, self.server = page, server
        self.console: list[str] = []
        self.page_errors: list[str] = []
        page.on("console", self._on_console)
        page.on("pageerror", lambda error: self.page_errors.append(f"{error}\n{error.stack or ''}".strip()))

    def _on_console(self, message):
        if message.type in ("error", "warning"):
            where = message.location.get("url", "")
            self.console.append(f"[{message.type}] {message.text}" + (f" ({where})" if where else ""))

    # -- diagnostics ---------------------------------------------------------------------------------
    def report(self, console_from: int = 0, errors_from: int = 0) -> str:
        """The page's console errors/warnings and uncaught exceptions (from the given marks) for messages."""
        lines = ["page errors (uncaught exceptions):"] + [f"  {e}" for e in self.page_errors[errors_from:]]
        lines += ["console errors/warnings:"] + [f"  {c}" for c in self.console[console_from:][-40:]]
        return "\n".join(lines)

    def server_log(self, chars: int = 4000) -> str:
        return self.server.log.read_text(errors="replace")[-chars:]

    def mark(self) -> tuple[int, int]:
        return len(self.console), len(self.page_errors)

    def new_problems(self, mark: tuple[int, int]) -> list[str]:
        """Uncaught exceptions and console errors since `mark`, except failed network requests: a 404 for
        the preview of an input file that is not on this server, user.css, and every request off this
        server, which the context refuses (e.g. the missing-models dialog asking a model's download size)."""
        console = [c for c in self.console[mark[0]:] if c.startswith("[error]")
                   and not any(network in c for network in NETWORK_FAILURES)]
        return self.page_errors[mark[1]:] + console

    # -- page state ----------------------------------------------------------------------------------
    def open(self) -> None:
        self.page.goto(self.server.url)
        try:
            self.page.wait_for_function(
                "() => window.app?.vueAppReady && app.graph && app.canvas && window.LiteGraph"
                " && app.extensionManager?.workflow?.activeWorkflow",
                timeout=PAGE_READY_TIMEOUT_MS)
        except Exception as error:
            raise AssertionError(f"the frontend did not get ready in {PAGE_READY_TIMEOUT_MS / 1000:.0f} s "
                                 f"({error})\n{self.report()}\nserver log:\n{self.server_log()}") from error

    def registered_types(self, types: list[str]) -> dict[str, bool]:
        return self.page.evaluate(
            "types => Object.fromEntries(types.map(t => [t, t in LiteGraph.registered_node_types]))",
            sorted(set(types)))

    def drop_workflow_file(self, path: Path) -> None:
        """Drop the file on the canvas as a user drags it from a file manager, and wait for the frontend to
        finish loading it (it opens as the active workflow, named after the file)."""
        text = path.read_text()
        data_transfer = self.page.evaluate_handle(
            """([text, name]) => {
                const transfer = new DataTransfer();
                transfer.items.add(new File([text], name, {type: 'application/json'}));
                return transfer;
            }""", [text, path.name])
        self.page.dispatch_event("#graph-canvas", "drop", {"dataTransfer": data_transfer})
        self.page.wait_for_function(
            "([name, count]) => app.extensionManager.workflow.activeWorkflow?.path === 'workflows/' + name"
            " && app.graph.nodes.length === count",
            arg=[path.name, len(json.loads(text).get("nodes", []))], timeout=60_000)
        self.next_frames()

    def next_frames(self, frames: int = 2) -> None:
        """Let the frontend render: resolve after `frames` animation frames."""
        self.page.evaluate("n => new Promise(done => { const step = k => k ? requestAnimationFrame(() => step(k - 1))"
                           " : done(); step(n); })", frames)

    def dialogs(self) -> list[str]:
        """Texts of the visible dialogs."""
        return [d.inner_text() for d in self.page.locator(".p-dialog").all() if d.is_visible()]

    def close_dialogs(self) -> None:
        for dialog in self.page.locator(".p-dialog").all():
            if dialog.is_visible():
                dialog.locator(".p-dialog-close-button").first.click()
                dialog.wait_for(state="detached", timeout=10_000)

    def toasts(self) -> list[dict]:
        return self.page.evaluate(
            """() => [...document.querySelectorAll('.p-toast-message')].map(t => ({
                severity: (t.className.match(/p-toast-message-(error|warn|info|success|secondary|contrast)/) || [])[1],
                text: t.innerText.trim()}))""")

    def graph_problems(self) -> dict:
        """What the loaded graph itself says is wrong: nodes the frontend could not build, inputs or outputs
        naming links the graph lacks, required inputs neither connected nor set, widget values outside their
        options or range. Combo values that look
        like file names but are not on this server are returned apart (`files`): a shared workflow names
        the user's own video and models."""
        return self.page.evaluate(_GRAPH_PROBLEMS_JS)

    def fit_graph(self, margin: float = 0.92) -> dict:
        """Hide every panel (focus mode), wait for the canvas to fill the window, fit all nodes and groups in
        view without animation, draw, and return where each node landed on screen."""
        if not self.page.evaluate("app.extensionManager.focusMode"):
            self.page.evaluate("app.extensionManager.command.execute('Workspace.ToggleFocusMode')")
        self.page.wait_for_function(
            "() => app.canvas.canvas.getBoundingClientRect().width === window.innerWidth"
            " && app.canvas.canvas.getBoundingClientRect().height === window.innerHeight")
        layout = self.page.evaluate(_FIT_JS, margin)
        self.next_frames(3)
        return layout

    def upload_input(self, data: bytes, name: str) -> str:
        """Upload a file to the server's input folder through the frontend's API client (as its upload
        widgets do); return the name the server stored it under."""
        answer = self.page.evaluate(
            """async ([b64, name]) => {
                const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                const body = new FormData();
                body.append('image', new File([bytes], name));
                body.append('type', 'input');
                body.append('overwrite', 'true');
                const response = await window.comfyAPI.api.api.fetchApi('/upload/image', {method: 'POST', body});
                return {status: response.status, text: await response.text()};
            }""", [base64.b64encode(data).decode(), name])
        assert answer["status"] == 200, f"upload of {name} answered {answer['status']}: {answer['text']}"
        return json.loads(answer["text"])["name"]

    def refresh_node_definitions(self) -> None:
        """Fetch /object_info again and refresh every combo (what the R key does): new inputs appear."""
        self.page.evaluate("() => app.refreshComboInNodes()")

    def widget_state(self) -> list[dict]:
        """Every node (top level and subgraphs) with its widgets: name, type, value, and a combo's options."""
        return self.page.evaluate(_WIDGET_STATE_JS)

    def set_widgets(self, changes: list[tuple[int, int, str, object]]) -> list[str]:
        """Set widget values as a user does (the value, then the widget's callback). `changes` holds
        (graph index, node id, widget name, value) as `widget_state` numbers them; returns what was set."""
        result = self.page.evaluate(_SET_WIDGETS_JS, [list(c) for c in changes])
        assert not result["missing"], f"widgets not found: {result['missing']}"
        return result["set"]

    def start_watching_executions(self) -> None:
        self.page.evaluate(
            """() => {
                if (window.__longeditExecutions) return;
                window.__longeditExecutions = [];
                const api = window.comfyAPI.api.api;
                for (const type of ['execution_success', 'execution_error', 'execution_interrupted'])
                    api.addEventListener(type, e => window.__longeditExecutions.push({type, ...e.detail}));
            }""")

    def click_run(self) -> dict:
        """Press the Run (queue) button; return the server's answer to the POST /prompt it sends."""
        button = self.page.get_by_test_id("queue-button").locator("button").first
        with self.page.expect_response(
                lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST") as answer:
            button.click()
        response = answer.value
        return {"status": response.status, **response.json()}

    def wait_for_execution_end(self, prompt_id: str, timeout_s: float) -> dict:
        """Wait for the server's execution_success / _error / _interrupted event for `prompt_id` (sent over
        the frontend's websocket); return it."""
        handle = self.page.wait_for_function(
            "id => window.__longeditExecutions.find(e => e.prompt_id === id)", arg=prompt_id,
            polling=250, timeout=timeout_s * 1000)
        return handle.json_value()


# Problems of the loaded graph (top level and subgraphs), as the frontend holds it.
_GRAPH_PROBLEMS_JS = r"""() => {
    const problems = [], files = [];
    const graphs = [app.graph, ...(app.graph.subgraphs ? app.graph.subgraphs.values() : [])];
    const looksLikeFile = v => typeof v === 'string' && /\.[A-Za-z0-9]{2,12}$/.test(v);
    for (const graph of graphs) {
        for (const node of graph.nodes) {
            const where = `node #${node.id} ${node.type} ("${node.title}")`;
            if (!(node.type in LiteGraph.registered_node_types)) problems.push(`${where}: type not registered`);
            if (node.has_errors) problems.push(`${where}: the frontend marked it as broken (has_errors)`);
            const def = node.constructor.nodeData;
            if (!def) continue;  // frontend-only nodes (Note, Reroute, PrimitiveNode) declare no inputs
            for (const slot of node.inputs ?? []) {
                if (slot.link != null && !graph.getLink(slot.link))
                    problems.push(`${where}: input '${slot.name}' names link ${slot.link}, which the graph lacks`);
            }
            for (const slot of node.outputs ?? []) {
                for (const id of slot.links ?? [])
                    if (!graph.getLink(id))
                        problems.push(`${where}: output '${slot.name}' names link ${id}, which the graph lacks`);
            }
            for (const name of Object.keys(def.input?.required ?? {})) {
                const slot = node.inputs?.find(s => s.name === name);
                if (slot?.link != null && graph.getLink(slot.link)) continue;
                if (!node.widgets?.some(w => w.name === name))
                    problems.push(`${where}: required input '${name}' is not connected`);
            }
            for (const widget of node.widgets ?? []) {
                const value = widget.value;
                const label = `${where}: widget '${widget.name}'`;
                if (widget.type === 'combo') {
                    let options = widget.options?.values;
                    if (typeof options === 'function') options = options();
                    if (Array.isArray(options) && !options.includes(value)) {
                        if (looksLikeFile(value))
                            files.push({node: node.id, type: node.type, widget: widget.name, value});
                        else problems.push(`${label} = ${JSON.stringify(value)} is not one of its options`);
                    }
                } else if (widget.type === 'number') {
                    const {min, max} = widget.options ?? {};
                    if (typeof value !== 'number' || Number.isNaN(value))
                        problems.push(`${label} is not a number: ${value}`);
                    else if ((min != null && value < min) || (max != null && value > max))
                        problems.push(`${label} = ${value} is outside [${min}, ${max}]`);
                }
            }
        }
    }
    return {problems, files};
}"""

# Fit every node and group in view (LiteGraph's DragAndScale.fitToBounds, no animation), draw, and report
# each node's rectangle on screen (CSS pixels) with the canvas size.
_FIT_JS = r"""margin => {
    const rects = app.graph.nodes.map(n => Array.from(n.boundingRect));
    for (const g of app.graph.groups ?? []) rects.push(Array.from(g.boundingRect ?? g._bounding));
    const x0 = Math.min(...rects.map(r => r[0])), y0 = Math.min(...rects.map(r => r[1]));
    const x1 = Math.max(...rects.map(r => r[0] + r[2])), y1 = Math.max(...rects.map(r => r[1] + r[3]));
    app.canvas.ds.fitToBounds([x0, y0, x1 - x0, y1 - y0], {zoom: margin});
    app.canvas.setDirty(true, true);
    app.canvas.draw(true, true);
    const box = app.canvas.canvas.getBoundingClientRect(), scale = app.canvas.ds.scale;
    const onScreen = (r, extra) => {
        const [left, top] = app.canvas.ds.convertOffsetToCanvas([r[0], r[1]]);
        return {...extra, left, top, right: left + r[2] * scale, bottom: top + r[3] * scale};
    };
    const nodes = app.graph.nodes.map(n => onScreen(n.boundingRect, {id: n.id, type: n.type}));
    const groups = (app.graph.groups ?? []).map(g => onScreen(g.boundingRect ?? g._bounding, {group: g.title}));
    return {width: box.width, height: box.height, scale, nodes, groups};
}"""

_WIDGET_STATE_JS = r"""() => {
    const graphs = [app.graph, ...(app.graph.subgraphs ? app.graph.subgraphs.values() : [])];
    return graphs.flatMap((graph, index) => graph.nodes.map(node => ({
        graph: index, id: node.id, type: node.type,
        widgets: (node.widgets ?? []).map(w => {
            let options = w.type === 'combo' ? w.options?.values : undefined;
            if (typeof options === 'function') options = options();
            return {name: w.name, type: w.type, value: w.value, options: Array.isArray(options) ? options : null};
        }),
    })));
}"""

_SET_WIDGETS_JS = r"""changes => {
    const set = [], missing = [];
    const graphs = [app.graph, ...(app.graph.subgraphs ? app.graph.subgraphs.values() : [])];
    for (const [index, id, name, value] of changes) {
        const node = graphs[index]?.getNodeById(id);
        const widget = node?.widgets?.find(w => w.name === name);
        if (!widget) { missing.push(`${name} of node #${id} in graph ${index}`); continue; }
        widget.value = value;
        widget.callback?.(widget.value, app.canvas, node);
        set.push(`node #${id} ${node.type}.${name} = ${JSON.stringify(widget.value)}`);
    }
    app.graph.setDirtyCanvas(true, true);
    return {set, missing};
}"""
