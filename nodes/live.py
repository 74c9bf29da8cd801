"""The live camera's connection: a browser's camera frames straight into a bank's stream.

A queued run per webcam frame (Run (Instant)) costs ComfyUI's own work around every run, a few
runs a second; the sampler's "Live camera" button (web/streamv2v.js) opens this WebSocket
instead and streams frames through the engine's ``LiveLoop``, with the settings of the
sampler's last run on that bank. Messages: see ``LiveLoop``; the first one is ``{"type":
"ready", "width", "height", "text"}``, the frame size to send, or an error. The page may send
``{"type": "record", "on": true}`` (and ``false``) to keep the live output in a video file in
ComfyUI's output folder (``recording_path``).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

from ..streamv2v.errors import StreamV2VError
from ..streamv2v.live import MAX_FRAME_BYTES, LiveLoop
from ..streamv2v.session import Session, no_live_stream, validate_bank_name
from .bank import describe
from .comfy import recordings_folder
from .state import SESSIONS

# The live loop of each bank, by name: one camera per bank, as one sampler per bank.
LIVE: dict[str, LiveLoop] = {}
# A page that went away without closing (a laptop asleep) gives its bank back within this.
HEARTBEAT_S = 20.0
# Recording files handed out in this process.
GIVEN: set[Path] = set()


def live_session(name: str) -> tuple[Session, tuple[int, int]]:
    """The session a live camera may continue and the (height, width) of its frames, or the
    reason it may not. Not the settings themselves: a connection open for hours would hold
    their model after a release."""
    name = validate_bank_name(name)
    session = SESSIONS.find(name)
    if session is None:
        raise no_live_stream(name)
    size = session.live_settings().size
    if name in LIVE:
        raise StreamV2VError(
            f"bank '{name}' is live already (a sampler's Live camera, in this tab or another): "
            "stop it there first"
        )
    return session, size


def recording_path(name: str, folder: Path) -> Path:
    """A new file in ``folder`` for bank ``name``'s live output, named by the bank and the time
    so that recordings sort, and never one given before (a file appears with its first frame)."""
    stem = f"live-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)[:40]}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, count = folder / f"{stem}.mp4", 1
    while path.exists() or path in GIVEN:
        count += 1
        path = folder / f"{stem}-{count}.mp4"
    GIVEN.add(path)
    return path


def record_request(text: str) -> bool:
    """Whether the page asks to record (True) or to stop (False); its mistakes are said."""
    try:
        message = json.loads(text)
    except ValueError:
        message = None
    if not isinstance(message, dict) or message.get("type") != "record":
        raise StreamV2VError(
            f'the live connection takes camera frames and {{"type": "record", "on": '
            f"true or false}}, not {text[:80]!r}"
        )
    if not isinstance(message.get("on"), bool):
        raise StreamV2VError(f'a record message needs "on": true or false, not {text[:80]!r}')
    return message["on"]


def add_live_route() -> None:
    from aiohttp import WSMsgType, web
    from server import PromptServer

    @PromptServer.instance.routes.get("/streamv2v/live")
    async def live(request):
        ws = web.WebSocketResponse(max_msg_size=MAX_FRAME_BYTES, heartbeat=HEARTBEAT_S)
        await ws.prepare(request)
        try:
            session, (height, width) = live_session(request.query.get("name", ""))
        except StreamV2VError as exc:
            await ws.send_json({"type": "error", "text": str(exc)})
            await ws.close()
            return ws
        name = session.name
        outbox: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        frames = LIVE[name] = LiveLoop(
            session,
            lambda message: loop.call_soon_threadsafe(outbox.put_nowait, message),
            describe=lambda: describe(name),
        )

        async def forward() -> None:
            while True:
                message = await outbox.get()
                try:
                    if isinstance(message, bytes):
                        await ws.send_bytes(message)
                        continue
                    await ws.send_json(message)
                except ConnectionResetError:  # the page went away mid-frame
                    return
                if message["type"] == "error":
                    await ws.close()
                    return

        sender = None
        try:  # from here on the bank is this connection's until the finally gives it back
            await ws.send_json(
                {"type": "ready", "width": width, "height": height, "text": describe(name)}
            )
            sender = asyncio.create_task(forward())
            async for message in ws:
                if message.type == WSMsgType.BINARY:
                    frames.offer(message.data)
                elif message.type == WSMsgType.TEXT:
                    try:
                        on = record_request(message.data)
                    except StreamV2VError as exc:  # said at once: the sender is cancelled below
                        await ws.send_json({"type": "error", "text": str(exc)})
                        break
                    frames.record(recording_path(name, recordings_folder()) if on else None)
        finally:
            frames.close()
            if LIVE.get(name) is frames:
                del LIVE[name]
            if sender is not None:
                sender.cancel()
        return ws
