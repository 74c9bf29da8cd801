"""A live camera's frames restyled as they come, without a queued run for each.

A node graph runs once per queued prompt, and the host's work around each run (uploading the
frame, queueing it, saving a preview, sending it) holds a webcam loop far below a camera's rate
however fast the stream is. ``LiveLoop`` takes encoded frames straight from a connection (JPEG,
as a browser sends them), continues a session's stream with its last run's settings on a thread
of its own, and answers every frame with the restyled one, so the sender keeps a frame or two
in flight and the GPU never has a backlog to work through. ``LiveRecording`` keeps what it
sends in a video file, when asked.
"""

from __future__ import annotations

import io
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from .errors import StreamV2VError, one_line
from .frames import to_uint8
from .session import FrameSizeError, Session
from .video import VideoWriter

log = logging.getLogger(__name__)

# Frames received and not yet answered. A sender waits for an answer when it has one or two
# out; more means it ignores the answers, and its frames would only age in the queue.
MAX_WAITING = 4
MAX_FRAME_BYTES = 32 * 2**20
STATUS_EVERY_S = 1.0
JPEG_QUALITY = 90
# Frames a recording holds for its encoder; past that it leaves frames out rather than hold
# the live loop up (a slow disk, a CPU busy with other work).
RECORD_BACKLOG = 32
# The rate a recording is made at: frames are shown at the times they came out, so this only
# sets the file's clock and what players call its rate.
RECORD_FPS = 30

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


def encode_jpeg(image: torch.Tensor | np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of a ``[H, W, 3]`` frame: float in 0..1 (the stream's output) or uint8."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image, "the live output")).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


class LiveRecording:
    """The live output kept in a video file, each frame at the time it came out.

    A live camera's rate varies with the GPU and the camera, so the file is timed by the
    clock, not by a rate, and plays at the speed it was seen. Encoding runs on a thread of its
    own so that the live loop never waits for it; the file appears with the first frame, so a
    recording stopped before any leaves nothing behind.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.dropped = 0
        self.error: str | None = None
        self._times: tuple[float, float] | None = None  # the first frame's and the last's
        self._writer: VideoWriter | None = None
        self._backlog: queue.Queue[tuple[np.ndarray, float] | None] = queue.Queue(RECORD_BACKLOG)
        self._thread = threading.Thread(target=self._work, name=f"record {path.name}", daemon=True)
        self._thread.start()

    @property
    def frames(self) -> int:
        return self._writer.frames_written if self._writer is not None else 0

    def add(self, frame: np.ndarray, at: float) -> None:
        """Hand a uint8 frame shown at ``at`` (``time.monotonic()``) to the encoder; never waits."""
        try:
            self._backlog.put_nowait((frame, at))
        except queue.Full:
            self.dropped += 1

    def stop(self) -> dict:
        """Finish the file, and say what it holds: the ``recorded`` message."""
        self._backlog.put(None)
        self._thread.join()
        first, last = self._times or (0.0, 0.0)
        return {
            "type": "recorded",
            "file": str(self.path) if self.frames else None,
            "frames": self.frames,
            "seconds": round(last - first, 3),
            "dropped": self.dropped,
            "error": self.error,
        }

    def _work(self) -> None:
        while (item := self._backlog.get()) is not None:
            if self.error is None:
                try:
                    self._write(*item)
                except StreamV2VError as exc:
                    self.error = str(exc)
                except Exception as exc:  # noqa: BLE001 - the live frames go on without it
                    log.exception("StreamV2V: recording %s failed", self.path)
                    self.error = f"recording failed: {one_line(exc)}"
        if self._writer is not None:
            try:
                self._writer.close()
            except StreamV2VError as exc:
                self.error = self.error or str(exc)

    def _write(self, frame: np.ndarray, at: float) -> None:
        if self._writer is None:
            height, width = frame.shape[:2]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = VideoWriter(self.path, RECORD_FPS, width, height)
            self._times = (at, at)
        elif frame.shape[:2] != (self._writer.height, self._writer.width):
            raise StreamV2VError(
                f"the recording stopped at {frame.shape[1]}x{frame.shape[0]} frames: a run "
                f"changed the stream's size from {self._writer.width}x{self._writer.height}; "
                "press Record again for a file of the new size"
            )
        first, last = self._times
        at = max(at, last + 1 / 1000) if self.frames else at  # a clock that did not move
        self._writer.write(frame, Fraction(at - first))
        self._times = (first, at)


@dataclass(frozen=True)
class _Record:
    """Start a recording into ``path``, or stop the one under way (``None``)."""

    path: Path | None


class LiveLoop:
    """One connection's frames into ``session``'s stream, answered through ``send``.

    Each frame offered gets one answer, in order: the restyled frame as JPEG bytes, or
    ``{"type": "size", "width", "height"}`` when the stream's frames changed size (a queued run
    with other frames; the sender should scale its frames to that). ``{"type": "status",
    "text", "fps"}`` comes about once a second and while the stream compiles, answering no
    frame. ``{"type": "error", "text"}`` ends the loop: a frame that is not an image, a model
    released, a sender that does not wait for answers. ``send`` is called from the loop's
    thread; ``describe`` gives the bank's status line. ``record`` starts and stops keeping the
    answers in a video file: ``{"type": "recording", "file"}`` says it started,
    ``{"type": "recorded", "file", "frames", "seconds", "dropped", "error"}`` that it ended (also
    when the loop ends); neither answers a frame.
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
        self._frames: queue.Queue[bytes | _Record | None] = queue.Queue()
        self._recording: LiveRecording | None = None
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

    def record(self, path: Path | None) -> None:
        """Keep the answers from the next frame on in ``path`` (a new file), or stop (None)."""
        if not self.closed:
            self._frames.put(_Record(path))

    def close(self) -> None:
        """End the loop once the frame under way (if any) is done; never waits for it."""
        self._closed.set()
        self._frames.put(None)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _work(self) -> None:
        try:
            self._answer()
        finally:
            self._stop_recording()

    def _answer(self) -> None:
        while (data := self._frames.get()) is not None and not self.closed:
            if isinstance(data, _Record):
                self._stop_recording()
                if data.path is not None:
                    self._recording = LiveRecording(data.path)
                    self.send({"type": "recording", "file": str(data.path)})
                continue
            try:
                output = to_uint8(
                    self.session.run_live(decode_image(data), on_status=self._status),
                    "the live output",
                )
                self.send(encode_jpeg(output))
                if self._recording is not None:
                    self._recording.add(output, time.monotonic())
                    if self._recording.error is not None:  # said now, not when the user stops
                        self._stop_recording()
                self.frames_out += 1
                self._count()
            except FrameSizeError as exc:
                height, width = exc.size
                self.send({"type": "size", "width": width, "height": height})
            except StreamV2VError as exc:
                self._stop_recording()  # before the error, after which the connection closes
                self._fail(str(exc))
                return
            # The machine's failure, not the frame's: the sender still gets its answer, and the
            # log the trace. A thread that died in silence would leave the sender waiting.
            except Exception as exc:  # noqa: BLE001
                log.exception("StreamV2V: the live stream '%s' failed", self.session.name)
                self._stop_recording()
                self._fail(f"the live stream failed: {one_line(exc)}")
                return

    def _stop_recording(self) -> None:
        if self._recording is not None:
            recording, self._recording = self._recording, None
            self.send(recording.stop())

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
