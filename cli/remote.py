"""Run a workflow on a running ComfyUI: upload the video, POST /prompt, follow it, read /history.

Progress comes over ComfyUI's websocket when aiohttp is importable (it is in ComfyUI's own Python);
otherwise the runner polls /history until the prompt is done. Only the standard library is needed.
"""
from __future__ import annotations

import asyncio
import json
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from .report import RunResult, failure_message, validation_message
from .workflows import SAMPLE_VIDEO, CliError, write_sample

POLL_SECONDS = 0.5


class RemoteComfy:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        if "://" not in self.url:
            self.url = "http://" + self.url

    def _request(self, path: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 60):
        req = urllib.request.Request(self.url + path, data=data, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return e.code, json.loads(body or b"null")
            except json.JSONDecodeError:
                return e.code, {"error": {"message": body.decode(errors="replace")[:300]}}
        except (urllib.error.URLError, OSError) as e:
            raise CliError(f"cannot reach ComfyUI at {self.url} ({getattr(e, 'reason', e)})") from None

    def get(self, path: str):
        status, data = self._request(path)
        if status != 200:
            raise CliError(f"ComfyUI at {self.url} answered {path} with HTTP {status}")
        return data

    def start(self) -> None:
        self.get("/system_stats")  # reachable, and a ComfyUI

    def object_info(self, types: set[str]) -> dict:
        info = {}
        for name in types:
            info.update(self.get("/object_info/" + urllib.parse.quote(name, safe="")))
        return info

    def add_video(self, source: Path) -> str:
        """Upload into the server's input folder (it keeps one copy of identical files)."""
        boundary = uuid.uuid4().hex
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"type\"\r\n\r\ninput\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{source.name}\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode()
        body = head + source.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        status, data = self._request("/upload/image", body,
                                     {"Content-Type": f"multipart/form-data; boundary={boundary}"}, timeout=600)
        if status == 413:
            raise CliError(f"ComfyUI at {self.url} refused the {len(body) / 2**20:.0f} MiB upload (larger than its "
                           "--max-upload-size); copy the video into its input folder and pass --set NODE.video=NAME")
        if status != 200:
            raise CliError(f"uploading {source} to {self.url} failed (HTTP {status}: {data})")
        return f"{data['subfolder']}/{data['name']}" if data.get("subfolder") else data["name"]

    def ensure_sample(self) -> str:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / SAMPLE_VIDEO
            write_sample(path)
            return self.add_video(path)

    def run(self, prompt: dict, extra_pnginfo: dict | None, listener) -> RunResult:
        client_id = uuid.uuid4().hex
        body = {"prompt": prompt, "client_id": client_id}
        if extra_pnginfo:
            body["extra_data"] = {"extra_pnginfo": extra_pnginfo}
        try:
            import aiohttp  # noqa: F401
        except ImportError:
            listener("notice", {"text": "aiohttp is not installed: no progress, waiting for the result"})
            return self._finish(self._queue(prompt, body), prompt)
        return asyncio.run(self._follow(prompt, body, client_id, listener))

    def _queue(self, prompt: dict, body: dict) -> str | RunResult:
        status, data = self._request("/prompt", json.dumps(body).encode(), {"Content-Type": "application/json"})
        if status == 400:
            return RunResult(False, error=validation_message(prompt, data.get("error"), data.get("node_errors")))
        if status != 200:
            raise CliError(f"ComfyUI at {self.url} refused the prompt (HTTP {status}: {data})")
        return data["prompt_id"]

    async def _follow(self, prompt: dict, body: dict, client_id: str, listener) -> RunResult:
        """Listen on the websocket (opened before queueing, so no event is missed) until the prompt ends."""
        import aiohttp

        ws_url = self.url.replace("http", "ws", 1) + f"/ws?clientId={client_id}"
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(ws_url, heartbeat=30, max_msg_size=0) as ws:
                queued = self._queue(prompt, body)
                if isinstance(queued, RunResult):
                    return queued
                async for message in ws:
                    if message.type != aiohttp.WSMsgType.TEXT:
                        continue  # binary frames are live previews
                    event = json.loads(message.data)
                    kind, data = event.get("type"), event.get("data") or {}
                    if data.get("prompt_id") not in (None, queued):
                        continue
                    listener(kind, data)
                    if kind == "executing" and data.get("node") is None and data.get("prompt_id") == queued:
                        break  # sent after the history entry is written
        return self._finish(queued, prompt)

    def _finish(self, queued: str | RunResult, prompt: dict) -> RunResult:
        if isinstance(queued, RunResult):
            return queued
        while True:
            entry = self.get(f"/history/{queued}").get(queued)
            if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
                break
            time.sleep(POLL_SECONDS)
        if entry["status"]["status_str"] != "success":
            return RunResult(False, error=failure_message(prompt, entry["status"].get("messages", [])))
        return RunResult(True, entry.get("outputs", {}))

    def locate(self, item: dict) -> str:
        kind, subfolder, name = item.get("type", "output"), item.get("subfolder", ""), item["filename"]
        query = urllib.parse.urlencode({"filename": name, "subfolder": subfolder, "type": kind})
        relative = "/".join(p for p in (kind, subfolder, name) if p)
        return f"{relative} (on the server: {self.url}/view?{query})"

    def interrupt(self) -> None:
        self._request("/interrupt", b"{}", {"Content-Type": "application/json"})
