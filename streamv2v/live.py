"""A live camera's frames restyled as they come, without a queued run for each.

A node graph runs once per queued prompt, and the host's work around each run (uploading the
frame, queueing it, saving a preview, sending it) holds a webcam loop far below a camera's rate
however fast the stream is. ``LiveLoop`` takes encoded frames straight from a connection (JPEG,
as a browser sends them), continues a session's stream with its last run's settings on a thread
of its own, and answers every frame with the restyled one, so the sender keeps a frame or two
in flight and the GPU never has a backlog to work through.
"""

from __future__ import annotations

import io
import logging
import queue
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from .errors import StreamV2VError, one_line
from .frames import to_uint8
from .session import FrameSizeError, Session

log = logging.getLogger(__name__)

# Frames received and not yet answered. A sender waits for an answer when it has one or two
# out; more means it ignores the answers, and its frames would only age in the queue.
MAX_WAITING = 4
MAX_FRAME_BYTES = 32 * 2**20
STATUS_EVERY_S = 1.0
JPEG_QUALITY = 90

Message = bytes | dict


def decode_image(data: bytes) -> torch.Tensor:
    """A ``[H, W, 3]`` uint8 frame from an encoded image (JPEG, PNG, WebP: what a browser's
    canvas gives)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return torch.from_numpy(np.asarray(image.convert("RGB")).copy())
    except (UnidentifiedImageError, OSError) as exc:
        raise StreamV2VError(
            f"a live frame of {len(data)} bytes is not an image ({one_line(exc)}): send JPEG or "
            "PNG frames"
        ) from exc


def encode_jpeg(image: torch.Tensor, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of a ``[H, W, 3]`` float frame in 0..1 (the stream's output)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image, "the live output")).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


class LiveLoop:
    """One connection's frames into ``session``'s stream, answered through ``send``.

    Each frame offered gets one answer, in order: the restyled frame as JPEG bytes, or
    ``{"type": "size", "width", "height"}`` when the stream's frames changed size (a queued run
    with other frames; the sender should scale its frames to that). ``{"type": "status",
    "text", "fps"}`` comes about once a second and while the stream compiles, answering no
    frame. ``{"type": "error", "text"}`` ends the loop: a frame that is not an image, a model
    released, a sender that does not wait for answers. ``send`` is called from the loop's
    thread; ``describe`` gives the bank's status line.
    """

    def __init__(
        self,
        session: Session,
        send: Callable[[Message], None],
        describe: Callable[[], str] | None = None,
    ) -> None:
        self.session = session
        self.send = send
        self.describe = describe
        self.frames_out = 0
        self._frames: queue.Queue[bytes | None] = queue.Queue()
        self._closed = threading.Event()
        self._since, self._counted = time.monotonic(), 0
        self._thread = threading.Thread(
            target=self._work, name=f"StreamV2V live '{session.name}'", daemon=True
        )
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def offer(self, data: bytes) -> None:
        """Queue a frame for the loop's thread; never waits."""
        if self.closed:
            return
        if self._frames.qsize() >= MAX_WAITING:
            self._fail(
                f"{MAX_WAITING} live frames were waiting: a sender keeps at most two frames "
                "without an answer"
            )
            return
        self._frames.put(data)

    def close(self) -> None:
        """End the loop once the frame under way (if any) is done; never waits for it."""
        self._closed.set()
        self._frames.put(None)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _work(self) -> None:
        while (data := self._frames.get()) is not None and not self.closed:
            try:
                output = self.session.run_live(decode_image(data), on_status=self._status)
                self.send(encode_jpeg(output))
                self.frames_out += 1
                self._count()
            except FrameSizeError as exc:
                height, width = exc.size
                self.send({"type": "size", "width": width, "height": height})
            except StreamV2VError as exc:
                self._fail(str(exc))
                return
            # The machine's failure, not the frame's: the sender still gets its answer, and the
            # log the trace. A thread that died in silence would leave the sender waiting.
            except Exception as exc:  # noqa: BLE001
                log.exception("StreamV2V: the live stream '%s' failed", self.session.name)
                self._fail(f"the live stream failed: {one_line(exc)}")
                return

    def _count(self) -> None:
        self._counted += 1
        now = time.monotonic()
        if now - self._since >= STATUS_EVERY_S:
            fps = self._counted / (now - self._since)
            self._since, self._counted = now, 0
            self._status(self.describe() if self.describe else "", fps)

    def _status(self, text: str, fps: float | None = None) -> None:
        self.send({"type": "status", "text": text, "fps": fps})

    def _fail(self, text: str) -> None:
        self._closed.set()
        self.send({"type": "error", "text": text})
