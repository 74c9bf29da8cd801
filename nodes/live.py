"""The live camera's connection: a browser's camera frames straight into a bank's stream.

A queued run per webcam frame (Run (Instant)) costs ComfyUI's own work around every run, a few
runs a second; the sampler's "Live camera" button (web/streamv2v.js) opens this WebSocket
instead and streams frames through the engine's ``LiveLoop``, with the settings of the
sampler's last run on that bank. Messages: see ``LiveLoop``; the first one is ``{"type":
"ready", "width", "height", "text"}``, the frame size to send, or an error.
"""

from __future__ import annotations

import asyncio

from ..streamv2v.errors import StreamV2VError
from ..streamv2v.live import MAX_FRAME_BYTES, LiveLoop
from ..streamv2v.session import RunSettings, Session, no_live_stream, validate_bank_name
from .bank import describe
from .state import SESSIONS

# The live loop of each bank, by name: one camera per bank, as one sampler per bank.
LIVE: dict[str, LiveLoop] = {}


def live_session(name: str) -> tuple[Session, RunSettings]:
    """The session a live camera may continue and the settings it goes on with, or the reason
    it may not."""
    name = validate_bank_name(name)
    session = SESSIONS.find(name)
    if session is None:
        raise no_live_stream(name)
    settings = session.live_settings()
    if name in LIVE:
        raise StreamV2VError(
            f"bank '{name}' is live already (in another tab or window): stop it there first"
        )
    return session, settings


def add_live_route() -> None:
    from aiohttp import WSMsgType, web
    from server import PromptServer

    @PromptServer.instance.routes.get("/streamv2v/live")
    async def live(request):
        ws = web.WebSocketResponse(max_msg_size=MAX_FRAME_BYTES)
        await ws.prepare(request)
        try:
            session, settings = live_session(request.query.get("name", ""))
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
        height, width = settings.size
        await ws.send_json(
            {"type": "ready", "width": width, "height": height, "text": describe(name)}
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

        sender = asyncio.create_task(forward())
        try:
            async for message in ws:
                if message.type == WSMsgType.BINARY:
                    frames.offer(message.data)
        finally:
            frames.close()
            if LIVE.get(name) is frames:
                del LIVE[name]
            sender.cancel()
        return ws
