"""Drive a real ComfyUI server from the tests, with the standard library only.

The test interpreter need not be ComfyUI's: the server runs as a subprocess under the Python
given (``COMFYUI_PYTHON``), so this module talks to it over HTTP and a websocket written
here (the test venv has neither ``requests`` nor ``websocket-client``).

Everything the server writes (input, output, temp, user settings, its database) goes into a
private base directory, so the ComfyUI checkout is never touched. The pack is installed as a
``custom_nodes/ComfyUI-StreamV2V`` symlink: ComfyUI names the pack after its folder (routes,
workflow templates), so the folder name matters.

``ui_to_api`` turns a workflow as the editor saves it (UI format) into the prompt
``POST /prompt`` takes (API format), the way the frontend does when a user presses Queue.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PACK_FOLDER = "ComfyUI-StreamV2V"
MODEL_FOLDERS = ("checkpoints", "diffusers", "loras", "vae", "vae_approx")

# Input types the frontend draws as a widget (a value in widgets_values) rather than a socket.
# WEBCAM is WebcamCapture's camera view, a widget that a frontend extension registers.
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", "WEBCAM"}
# Options that make the frontend add an upload button right after a combo, whose value
# ("image") is saved in widgets_values too.
UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
# Nodes that exist only in the editor: never sent to the server.
UI_ONLY_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
MODE_MUTED, MODE_BYPASSED = 2, 4


def comfyui_from_env() -> tuple[str, str]:
    """``COMFYUI_PATH`` and ``COMFYUI_PYTHON`` (default: this interpreter); skips the calling
    test module when no ComfyUI checkout is named."""
    import pytest

    path = os.environ.get("COMFYUI_PATH", "")
    if not path:
        pytest.skip("COMFYUI_PATH is not set", allow_module_level=True)
    return path, os.environ.get("COMFYUI_PYTHON") or sys.executable


def packs_under_test(pack_folder: str, pack_root: Path) -> dict[str, Path]:
    """This pack, plus the packs named in ``COMFYUI_EXTRA_NODES`` (folders, separated as in
    PATH), such as ComfyUI-VideoHelperSuite, which one example workflow needs."""
    packs = {pack_folder: pack_root}
    for folder in filter(None, os.environ.get("COMFYUI_EXTRA_NODES", "").split(os.pathsep)):
        path = Path(folder).resolve()
        if not path.is_dir():
            raise ComfyError(f"COMFYUI_EXTRA_NODES names {folder}, which is not a folder")
        packs[path.name] = path
    return packs


def place_tiny_models(root: Path, diffusers_dir: Path, lcm_lora: Path, taesd_dir: Path) -> Path:
    """ComfyUI model folders under ``root`` holding the tests' tiny models: the diffusers
    model as ``diffusers/tiny-sd15``, the stand-in LCM-LoRA as ``loras/lcm-lora-tiny.safetensors``
    and the TAESD files in ``vae_approx``."""
    shutil.copytree(diffusers_dir, root / "diffusers" / "tiny-sd15")
    (root / "loras").mkdir()
    shutil.copy(lcm_lora, root / "loras" / "lcm-lora-tiny.safetensors")
    shutil.copytree(taesd_dir, root / "vae_approx")
    return root


class ComfyError(RuntimeError):
    """The server refused or failed something; the message carries the server's own words."""


# -- workflow formats ----------------------------------------------------------------------------


def input_spec(info: Mapping[str, Any]) -> list[tuple[str, Any, dict]]:
    """(name, type, options) of each required then optional input, in declaration order.

    ``info`` is a node's ``/object_info`` entry or ``{"input": cls.INPUT_TYPES()}``. A combo's
    type is its list of choices (V1) or ``"COMBO"`` with ``options["options"]`` (V3).
    """
    inputs = info["input"]
    order = info.get("input_order") or {key: list(value) for key, value in inputs.items()}
    spec = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            entry = inputs[section][name]
            kind = entry[0]
            options = dict(entry[1]) if len(entry) > 1 and entry[1] else {}
            spec.append((name, kind, options))
    return spec


def combo_choices(kind: Any, options: Mapping[str, Any]) -> list | None:
    """A combo's choices, or None for an input that is not a combo."""
    if isinstance(kind, list | tuple):
        return list(kind)
    if kind == "COMBO":
        return list(options.get("options", []))
    return None


def is_widget(kind: Any, options: Mapping[str, Any]) -> bool:
    if options.get("forceInput"):
        return False
    return combo_choices(kind, options) is not None or kind in WIDGET_TYPES


def extra_widget_values(name: str, kind: Any, options: Mapping[str, Any]) -> int:
    """How many values the frontend saves right after this widget's own value.

    A seed-like number gets a "control after generate" combo (``fixed``, ``randomize``...):
    when its options ask for one, or by default when it is named seed or noise_seed. An upload
    combo gets the upload button's value.
    """
    control = options.get("control_after_generate")
    if control is None:
        control = kind == "INT" and name in ("seed", "noise_seed")
    upload = any(options.get(key) for key in UPLOAD_OPTIONS)
    return int(bool(control)) + int(upload)


def widget_inputs(info: Mapping[str, Any]) -> list[tuple[str, Any, dict]]:
    """The inputs saved in a node's widgets_values, in the order they are saved."""
    return [(name, kind, opts) for name, kind, opts in input_spec(info) if is_widget(kind, opts)]


def ui_to_api(workflow: Mapping[str, Any], object_info: Mapping[str, Any]) -> dict[str, dict]:
    """The API-format prompt for a UI-format workflow: what the frontend queues.

    Widget values are matched to widget inputs by position (skipping the extra values of
    seed controls and upload buttons); a linked input, widget or socket, becomes
    ``[origin node id, origin slot]``. Notes and muted nodes are left out; a workflow with a
    bypassed node is refused (the frontend rewires around it, which is not done here).
    """
    links = {link[0]: link for link in workflow["links"]}
    prompt: dict[str, dict] = {}
    for node in workflow["nodes"]:
        if node["type"] in UI_ONLY_TYPES or node.get("mode", 0) == MODE_MUTED:
            continue
        if node.get("mode", 0) == MODE_BYPASSED:
            raise ComfyError(f"node {node['id']} ({node['type']}) is bypassed: not supported")
        if node["type"] not in object_info:
            raise ComfyError(f"node {node['id']}: the server has no node type {node['type']}")
        info = object_info[node["type"]]
        values = node.get("widgets_values") or []
        inputs: dict[str, Any] = {}
        if isinstance(values, Mapping):  # VideoHelperSuite saves widgets by name
            inputs = {n: values[n] for n, _, _ in widget_inputs(info) if n in values}
        else:
            position = 0
            for name, kind, options in widget_inputs(info):
                if position >= len(values):
                    break
                inputs[name] = values[position]
                position += 1 + extra_widget_values(name, kind, options)
        for slot in node.get("inputs", []):
            if slot.get("link") is None:
                continue
            _, origin, origin_slot, target, _, _ = links[slot["link"]]
            if target != node["id"]:
                raise ComfyError(f"link {slot['link']} does not end at node {node['id']}")
            name = (slot.get("widget") or {}).get("name", slot["name"])
            inputs[name] = [str(origin), origin_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def nodes_of_type(prompt: Mapping[str, dict], class_type: str) -> list[str]:
    """Ids of the prompt's nodes of one class, in id order."""
    ids = [key for key, node in prompt.items() if node["class_type"] == class_type]
    return sorted(ids, key=int)


def set_inputs(prompt: dict[str, dict], class_type: str, **values: Any) -> None:
    """Set literal inputs on every node of ``class_type`` (there must be at least one)."""
    ids = nodes_of_type(prompt, class_type)
    if not ids:
        raise ComfyError(f"the prompt has no {class_type} node")
    for key in ids:
        prompt[key]["inputs"].update(values)


# -- a minimal websocket client (RFC 6455, client side, no extensions) ---------------------------

_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class WebSocket:
    """A websocket read in a thread so the server never waits on an unread socket.

    Messages are kept in arrival order: text ones parsed as JSON, binary ones as bytes with
    ``binary`` (ComfyUI's /ws sends previews as binary: dropped without); readers wait on
    ``changed``.
    """

    def __init__(
        self, host: str, port: int, path: str, timeout: float = 30.0, binary: bool = False
    ) -> None:
        self.messages: list[dict[str, Any] | bytes] = []
        self.binary = binary
        self.changed = threading.Condition()
        self.closed = False
        self._sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self._sock.sendall(request.encode())
        self._buffer = b""
        while b"\r\n\r\n" not in self._buffer:
            chunk = self._sock.recv(4096)
            if not chunk:
                raise ComfyError("websocket handshake: connection closed")
            self._buffer += chunk
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        if " 101 " not in lines[0] + " ":
            raise ComfyError(f"websocket handshake refused: {lines[0]}")
        headers = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:])}
        accept = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode()).digest()).decode()
        if headers.get("sec-websocket-accept") != accept:
            raise ComfyError("websocket handshake: bad Sec-WebSocket-Accept")
        self._sock.settimeout(None)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="comfy-ws", daemon=True)
        self._thread.start()

    def _read(self, size: int) -> bytes:
        while len(self._buffer) < size:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("websocket closed")
            self._buffer += chunk
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def _send(self, opcode: int, payload: bytes) -> None:
        """Clients must mask what they send (RFC 6455 5.3)."""
        mask = os.urandom(4)
        header = bytes([0x80 | opcode])
        if len(payload) < 126:
            header += bytes([0x80 | len(payload)])
        elif len(payload) < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack(">H", len(payload))
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", len(payload))
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        with self._lock:
            self._sock.sendall(header + mask + masked)

    def _frame(self) -> tuple[bool, int, bytes]:
        first, second = self._read(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack(">H", self._read(2))
        elif length == 127:
            (length,) = struct.unpack(">Q", self._read(8))
        mask = self._read(4) if second & 0x80 else None
        payload = self._read(length)
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return bool(first & 0x80), first & 0x0F, payload

    def _run(self) -> None:
        parts: list[bytes] = []
        kind = 0
        try:
            while True:
                final, opcode, payload = self._frame()
                if opcode == 0x8:  # close
                    break
                if opcode == 0x9:  # ping
                    self._send(0xA, payload)
                    continue
                if opcode in (0x1, 0x2):
                    kind, parts = opcode, []
                if opcode in (0x0, 0x1, 0x2):
                    parts.append(payload)
                    if final and (kind == 0x1 or self.binary):
                        data = b"".join(parts)
                        message = json.loads(data.decode("utf-8")) if kind == 0x1 else data
                        with self.changed:
                            self.messages.append(message)
                            self.changed.notify_all()
        except (OSError, ConnectionError, ValueError):
            pass
        finally:
            with self.changed:
                self.closed = True
                self.changed.notify_all()

    def send_bytes(self, data: bytes) -> None:
        self._send(0x2, data)

    def send_json(self, message: Any) -> None:
        self._send(0x1, json.dumps(message).encode())

    def wait(
        self, count: int, timeout: float = 120.0, kept: Callable[[Any], bool] = lambda m: True
    ) -> list[dict[str, Any] | bytes]:
        """The first ``count`` messages that ``kept`` keeps, once they came (fewer if the server
        closed)."""

        def received() -> list[dict[str, Any] | bytes]:
            return [m for m in self.messages if kept(m)]

        with self.changed:
            self.changed.wait_for(lambda: len(received()) >= count or self.closed, timeout)
            return received()[:count]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._send(0x8, b"")  # a close frame: the server ends its side at once
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(timeout=5)


# -- the server ----------------------------------------------------------------------------------


@dataclass
class RunResult:
    """What one queued prompt did, from the websocket events and its /history entry."""

    prompt_id: str
    status: str  # "success" or "error" (an interrupted run is an "error" too)
    outputs: dict[str, Any]  # node id -> its UI output, e.g. {"images": [{filename, ...}]}
    executed: list[str] = field(default_factory=list)  # node ids run this time, in order
    cached: list[str] = field(default_factory=list)  # node ids served from the cache
    error: dict[str, Any] | None = None  # the execution_error payload, if any
    interrupted: bool = False
    events: list[dict[str, Any]] = field(default_factory=list)  # this prompt's JSON messages
    history: dict[str, Any] = field(default_factory=dict)  # the raw /history/<id> entry

    def error_text(self) -> str:
        if not self.error:
            return ""
        trace = "".join(self.error.get("traceback") or [])
        return f"{self.error.get('exception_type')}: {self.error.get('exception_message')}\n{trace}"


def free_port() -> int:
    """A port nobody listens on now; the tiny race until the server binds it is acceptable."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def import_failures(log: str) -> list[str]:
    """Custom-node folders that ComfyUI reported as IMPORT FAILED in its startup log."""
    return [
        line.split("(IMPORT FAILED):", 1)[1].strip()
        for line in log.splitlines()
        if "(IMPORT FAILED):" in line
    ]


def _not_json(name: str) -> Any:
    raise ComfyError(f"the reply holds {name}, which is not JSON: a browser cannot parse it")


class ComfyServer:
    """One ComfyUI process on 127.0.0.1 (CPU only) with the given packs installed.

    ``packs`` maps a folder name under ``custom_nodes/`` to the pack's folder; ``models_dir``
    holds ``checkpoints/``, ``diffusers/``, ``loras/``, ``vae/``, ``vae_approx/`` and is added
    through an ``extra_model_paths.yaml``.
    """

    def __init__(
        self,
        comfyui_path: str | os.PathLike[str],
        packs: Mapping[str, str | os.PathLike[str]],
        *,
        python: str | os.PathLike[str] = sys.executable,
        models_dir: str | os.PathLike[str] | None = None,
        extra_args: Iterable[str] = (),
        startup_timeout: float = 180.0,
    ) -> None:
        self.comfyui_path = Path(comfyui_path).resolve()
        if not (self.comfyui_path / "main.py").is_file():
            raise ComfyError(f"COMFYUI_PATH {self.comfyui_path} has no main.py")
        self.packs = {name: Path(folder).resolve() for name, folder in packs.items()}
        self.python = str(python)
        self.models_dir = Path(models_dir).resolve() if models_dir is not None else None
        self.base_dir = Path(tempfile.mkdtemp(prefix="comfy-test-"))
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.port = 0
        self.client_id = uuid.uuid4().hex
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.base_dir / "server.log"
        self._ws: WebSocket | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    def start(self) -> ComfyServer:
        """Start the process; return once HTTP and the websocket both answer."""
        nodes_dir = self.base_dir / "custom_nodes"
        nodes_dir.mkdir(parents=True)
        for name, folder in self.packs.items():
            (nodes_dir / name).symlink_to(folder, target_is_directory=True)
        for sub in ("input", "output", "temp", "user"):
            (self.base_dir / sub).mkdir()
        self.port = free_port()
        cmd = [
            self.python,
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--base-directory",
            str(self.base_dir),
            "--database-url",
            "sqlite:///:memory:",
            "--disable-auto-launch",
        ]
        if self.models_dir is not None:
            cmd += ["--extra-model-paths-config", str(self._write_models_yaml())]
        cmd += self.extra_args
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # the server must see only what ComfyUI itself would
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
        # Tiny test models gain nothing from a thread pool, and beside other torch processes
        # (the test runner, parallel suites) spinning OpenMP pools slow every run ~10x.
        env.setdefault("OMP_NUM_THREADS", "1")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                cmd, cwd=self.comfyui_path, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        try:
            self._wait_ready()
            self._ws = WebSocket("127.0.0.1", self.port, f"/ws?clientId={self.client_id}")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Terminate the process (kill it if it lingers) and remove the private base dir."""
        if self._ws is not None:
            self._ws.close()
            self._ws = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=15)
            self.process = None
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def log(self) -> str:
        """The server's combined stdout and stderr so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- HTTP --------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        route: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """(status, body) of one request; an HTTP error status is returned, not raised."""
        req = urllib.request.Request(self.url + route, data=body, method=method)
        for key, value in (headers or {}).items():
            req.add_header(key, value)
        try:
            with urllib.request.urlopen(req, timeout=60) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def get(self, route: str) -> Any:
        """GET a JSON route, e.g. ``get("/object_info/LoadVideo")``."""
        status, body = self.request("GET", route)
        if status != 200:
            raise ComfyError(f"GET {route}: {status} {body[:500]!r}")
        return json.loads(body, parse_constant=_not_json)  # as strict as the browser's parser

    def post(self, route: str, payload: Any = None) -> tuple[int, Any]:
        """POST JSON; (status, decoded JSON reply or None when the reply is not JSON)."""
        data = json.dumps({} if payload is None else payload).encode()
        status, body = self.request("POST", route, data, {"Content-Type": "application/json"})
        try:
            return status, json.loads(body) if body else None
        except ValueError:
            return status, None

    def object_info(self) -> dict[str, Any]:
        """Every node class the server knows, with its inputs and outputs."""
        return self.get("/object_info")

    def websocket(self, path: str) -> WebSocket:
        """A websocket to one of the pack's routes, keeping binary messages too."""
        return WebSocket("127.0.0.1", self.port, path, binary=True)

    def upload(self, data: bytes, name: str, *, subfolder: str = "", kind: str = "input") -> str:
        """Upload a file as the frontend does; return the value a node's combo expects.

        ``kind="temp", subfolder="webcam"`` is what WebcamCapture uploads on queue and gives
        ``"webcam/<name> [temp]"``; ``kind="input"`` gives ``"<name>"`` (LoadImage, LoadVideo).
        """
        boundary = uuid.uuid4().hex
        parts = []
        for key, value in (("subfolder", subfolder), ("type", kind), ("overwrite", "true")):
            parts.append(
                f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'
            )
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        )
        body = "".join(parts).encode() + head.encode() + data + f"\r\n--{boundary}--\r\n".encode()
        content_type = f"multipart/form-data; boundary={boundary}"
        status, reply = self.request("POST", "/upload/image", body, {"Content-Type": content_type})
        if status != 200:
            raise ComfyError(f"upload {name}: {status} {reply[:500]!r}")
        info = json.loads(reply)
        path = f"{info['subfolder']}/{info['name']}" if info["subfolder"] else info["name"]
        return path if info["type"] == "input" else f"{path} [{info['type']}]"

    def view(self, item: Mapping[str, str]) -> bytes:
        """The file an output entry ({filename, subfolder, type}) names."""
        query = urllib.parse.urlencode(
            {
                "filename": item["filename"],
                "subfolder": item.get("subfolder", ""),
                "type": item.get("type", "output"),
            }
        )
        status, body = self.request("GET", "/view?" + query)
        if status != 200:
            raise ComfyError(f"view {item}: {status}")
        return body

    def interrupt(self, prompt_id: str | None = None) -> None:
        """Interrupt the running prompt (only that one when prompt_id is given)."""
        self.post("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        """ComfyUI applies this in its worker between prompts, not at once."""
        status, body = self.post(
            "/free", {"unload_models": unload_models, "free_memory": free_memory}
        )
        if status != 200:
            raise ComfyError(f"/free: {status} {body}")

    # -- prompts -----------------------------------------------------------------------------

    def queue(self, prompt: Mapping[str, Any]) -> str:
        """Queue an API-format prompt; return its id. A refusal raises with the server's JSON."""
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if status != 200 or not body or body.get("node_errors"):
            raise ComfyError(f"prompt refused ({status}): {json.dumps(body)}")
        return body["prompt_id"]

    def events(self, prompt_id: str) -> list[dict[str, Any]]:
        """The websocket messages about one prompt received so far."""
        assert self._ws is not None
        with self._ws.changed:
            return [
                m for m in self._ws.messages if (m.get("data") or {}).get("prompt_id") == prompt_id
            ]

    def wait_for_event(
        self, prompt_id: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 60.0
    ) -> dict[str, Any]:
        """The first of the prompt's messages that satisfies ``predicate``, waiting for it.

        Raises if the prompt ends (``executing`` with ``node: null``) without one.
        """
        assert self._ws is not None
        deadline = time.monotonic() + timeout
        with self._ws.changed:
            while True:
                mine = [
                    m
                    for m in self._ws.messages
                    if (m.get("data") or {}).get("prompt_id") == prompt_id
                ]
                for message in mine:
                    if predicate(message):
                        return message
                    if message["type"] == "executing" and message["data"].get("node") is None:
                        errors = [m["data"] for m in mine if m["type"] == "execution_error"]
                        raise ComfyError(f"prompt {prompt_id} ended without the event: {errors}")
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._ws.closed:
                    raise ComfyError(f"prompt {prompt_id}: no such event within {timeout}s")
                self._ws.changed.wait(remaining)

    def wait(self, prompt_id: str, timeout: float = 300.0) -> RunResult:
        """Wait for the prompt to end, then read its history.

        The end is ``executing`` with ``node: null``: the history entry is written between
        ``execution_success`` and that message.
        """
        self.wait_for_event(
            prompt_id,
            lambda m: m["type"] == "executing" and m["data"].get("node") is None,
            timeout,
        )
        entry = self.get(f"/history/{prompt_id}").get(prompt_id)
        if entry is None:
            raise ComfyError(f"prompt {prompt_id} ended but has no history entry")
        result = RunResult(
            prompt_id=prompt_id,
            status=entry["status"]["status_str"],
            outputs=entry.get("outputs", {}),
            history=entry,
            events=self.events(prompt_id),
        )
        for message in result.events:
            kind, data = message["type"], message["data"]
            if kind == "executing" and data.get("node") is not None:
                result.executed.append(data["node"])
            elif kind == "execution_cached":
                result.cached.extend(data.get("nodes", []))
            elif kind == "execution_error":
                result.error = data
            elif kind == "execution_interrupted":
                result.interrupted = True
        return result

    def run(self, prompt: Mapping[str, Any], timeout: float = 300.0) -> RunResult:
        """Queue a prompt and wait for it; a failed run is returned, not raised."""
        return self.wait(self.queue(prompt), timeout=timeout)

    def wait_idle(self, timeout: float = 300.0) -> None:
        """Wait until the queue is empty: runs that a pack queues itself (VideoHelperSuite's
        meta batch) have no prompt id of ours to wait for."""
        deadline = time.monotonic() + timeout
        while (queue := self.get("/queue"))["queue_running"] or queue["queue_pending"]:
            if time.monotonic() > deadline:
                raise ComfyError(f"the queue did not empty within {timeout}s: {queue}")
            time.sleep(0.5)

    # -- internals ---------------------------------------------------------------------------

    def _write_models_yaml(self) -> Path:
        """Point ComfyUI's model folders at models_dir/<name> (utils/extra_config.py)."""
        assert self.models_dir is not None
        lines = ["streamv2v_tests:", f"    base_path: {json.dumps(str(self.models_dir))}"]
        for name in MODEL_FOLDERS:
            (self.models_dir / name).mkdir(parents=True, exist_ok=True)
            lines.append(f"    {name}: {name}")
        path = self.base_dir / "extra_model_paths.yaml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise ComfyError(
                    f"ComfyUI exited with {self.process.returncode} during startup:\n"
                    + self.log()[-4000:]
                )
            try:
                if self.request("GET", "/system_stats")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise ComfyError(f"ComfyUI not ready after {self.startup_timeout}s:\n" + self.log()[-4000:])
