"""Streams that outlive a single call: what a node graph (ComfyUI) needs from the engine.

A graph runs the sampler once per queued prompt: with a whole video, with one chunk of a long
video, or with one webcam frame. ``Session`` keeps a named bank and its stream between those
calls, so chunks and frames continue one stream; ``ModelCache`` keeps the loaded model so
a run does not reload it; both are plain objects the host keeps wherever it likes (ComfyUI
keeps them at module level, where they survive its caches being cleared).
"""

from __future__ import annotations

import gc
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch

from .bank import BankConfig, FeatureBank
from .errors import StreamV2VError
from .frames import output_size, processing_size, to_rgb
from .loading import (
    LoraSpec,
    StreamModel,
    check_model_files,
    default_dtype,
    load_model,
    resolve_device,
)
from .modes import DEFAULT_ACCEL
from .stream import StreamConfig, StreamV2V

EACH_RUN = ("continue stream", "start new stream")


@dataclass(frozen=True)
class ModelSpec:
    """Everything that decides which weights are loaded; equal specs share one load."""

    model: str
    lcm_lora: str | None = None
    lcm_lora_weight: float = 1.0
    loras: tuple[LoraSpec, ...] = ()
    vae: str | None = None
    dtype: str | None = None
    device: str | None = None

    def with_lora(self, path: str, weight: float) -> ModelSpec:
        """A new spec with one more style LoRA; this one is left as it is."""
        return replace(self, loras=(*self.loras, LoraSpec(path, weight)))

    def check(self) -> None:
        """``load``'s checks that read no weights (see ``check_model_files``)."""
        check_model_files(
            self.model,
            lcm_lora=self.lcm_lora,
            lcm_lora_weight=self.lcm_lora_weight,
            loras=self.loras,
            vae=self.vae,
        )

    def load(self) -> StreamModel:
        device = resolve_device(self.device)
        dtype = self.dtype or default_dtype(device)
        return load_model(
            self.model,
            lcm_lora=self.lcm_lora,
            lcm_lora_weight=self.lcm_lora_weight,
            loras=self.loras,
            vae=self.vae,
            dtype=dtype,
            device=device,
        )


@dataclass(frozen=True)
class AttentionPatch:
    """How a model's self-attention uses the bank (extended attention, feature fusion)."""

    extended_attention: bool = True
    fusion: bool = True
    fusion_strength: float = 0.8
    fusion_threshold: float = 0.98

    def __post_init__(self) -> None:
        # The bank's own rules (ranges, settings without effect), checked where they enter.
        self.bank_config("dyme", 1, 4)

    def bank_config(self, kind: str, size: int, interval: int) -> BankConfig:
        """The bank that applies this patch; kind 'none' takes no patch at all."""
        if kind == "none":
            if self != AttentionPatch():
                raise StreamV2VError(
                    "the attention patch has no effect with bank kind 'none': choose bank kind "
                    "'dyme' or 'queue', or remove the Patch Attention node"
                )
            return BankConfig(kind="none")
        return BankConfig(
            kind=kind,
            size=size,
            interval=interval,
            extended_attention=self.extended_attention,
            fusion=self.fusion,
            fusion_strength=self.fusion_strength,
            fusion_threshold=self.fusion_threshold,
        )


@dataclass(frozen=True)
class PatchedModel:
    """A model as a graph passes it around: a spec plus an attention patch, both values.

    Patching or adding a LoRA makes a new value, so one loaded model can feed a patched and
    an unpatched branch.
    """

    spec: ModelSpec
    patch: AttentionPatch = AttentionPatch()

    def bank_config(self, kind: str, size: int, interval: int) -> BankConfig:
        return self.patch.bank_config(kind, size, interval)


class ModelCache:
    """The one loaded model (SD1.5 weights are 2-4 GB: keeping several helps nobody).

    ``let_go`` makes whatever else holds the loaded model (the sessions' streams) drop it
    before other weights load, so two models never sit in memory together.
    """

    def __init__(self, let_go: Callable[[], None] | None = None) -> None:
        self._spec: ModelSpec | None = None
        self._model: StreamModel | None = None
        self._lock = threading.Lock()
        self._let_go = let_go

    def get(self, spec: ModelSpec) -> StreamModel:
        with self._lock:
            if self._spec != spec or self._model is None:
                if self._model is not None:  # release the old weights before loading new ones
                    spec.check()  # but first name a wrong pick, keeping the loaded model
                    if self._let_go is not None:
                        self._let_go()
                    self._model = None
                    _free_memory()
                self._model = spec.load()
                self._spec = spec
            return self._model

    def adopt(self, spec: ModelSpec, model: StreamModel) -> None:
        """Serve ``model`` for ``spec`` without loading it (a host or benchmark that built it)."""
        with self._lock:
            self._spec, self._model = spec, model

    @property
    def loaded(self) -> ModelSpec | None:
        return self._spec if self._model is not None else None

    def clear(self) -> bool:
        """Drop the loaded model; True if there was one."""
        with self._lock:
            had = self._model is not None
            self._model, self._spec = None, None
        if had:
            _free_memory()
        return had


def _free_memory() -> None:
    """Free a model let go of now, not at the next garbage collection: a stream and its fast
    step refer to each other, so only a collection frees the model they hold."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


FrameCallback = Callable[[int, int, torch.Tensor | None], None]


@dataclass
class Session:
    """One named bank and the stream using it, kept between runs."""

    name: str
    bank: FeatureBank | None = None
    stream: StreamV2V | None = None
    key: tuple | None = None
    # What the bank's tokens were made with: tokens of another model or shape mean nothing
    # to a stream, so a change starts a new bank.
    layout: BankLayout | None = None
    # How the stream's current (or last) run takes its frames: "batch" (a video, or a chunk
    # of one), "tail" (a single frame right after a batch: the video's last chunk) or "live"
    # (single frames, the output lagging); None before its first run.
    mode: str | None = None
    # The stream was let go with the model (Free Memory, Unload Models); the bank was kept.
    released: bool = False
    runs: int = 0
    # What the last queued run noted (a new bank, a new stream, acceleration): live frames'
    # notes are left out, or one coming between a run and its node's status would replace them.
    notes: list[str] = field(default_factory=list)
    # What the last run went with, for frames that come without a run of their own (a live
    # camera, ``run_live``); let go with the model.
    settings: RunSettings | None = None
    # Held for a run, a live frame or a release; ``_flag`` orders a reset asked for meanwhile
    # against the holder letting go, so that one of the two always does it.
    _busy: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _flag: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _reset_pending: bool = False

    def reset(self) -> bool:
        """Empty the bank and end the stream: the next run starts afresh.

        Reset is asked for from another thread (a button, an HTTP route); during a run it waits
        for the run to end rather than pull the tensors from under the frames being computed.
        Returns False when it was left to the run.
        """
        with self._flag:
            self._reset_pending = True
            if not self._busy.acquire(blocking=False):
                return False  # the holder does it as it lets go (``_let_go``)
        self._let_go()
        return True

    @property
    def reset_pending(self) -> bool:
        return self._reset_pending

    @contextmanager
    def _held(self) -> Iterator[None]:
        """Hold the session (a run, a live frame, a release); a reset asked for meanwhile is
        done as it is let go."""
        self._busy.acquire()
        try:
            yield
        finally:
            self._let_go()

    def _let_go(self) -> None:
        with self._flag:  # a reset refused until now set its flag under this lock: seen here
            try:
                if self._reset_pending:
                    self._reset_now()
            finally:
                self._busy.release()

    def _reset_now(self) -> None:
        if self.bank is not None:
            self.bank.reset()
        self.stream, self.key, self.layout, self.mode = None, None, None, None
        self.released = self._reset_pending = False

    def release(self) -> None:
        """Let go of the stream (and so of its model); the bank stays.

        Waits for a frame under way (a live camera's, on a thread of its own): while it runs it
        holds the model, which would outlive the release, and a failure would put the released
        stream back.
        """
        with self._held():
            self.settings = None
            if self.stream is not None:
                self.stream, self.key, self.released = None, None, True

    def stats(self) -> dict[str, object]:
        """Read without holding the session (routes, a live camera's status): each field once,
        since a release or a reset may drop it in between."""
        bank, stream, mode = self.bank, self.stream, self.mode
        stats: dict[str, object] = {"name": self.name, "runs": self.runs}
        if bank is not None:
            stats.update(bank.stats())
            tokens = stats["tokens_per_layer"].values()
            stats["tokens_per_layer"] = max(tokens, default=0)  # the largest layer, for display
        if stream is not None:
            frames_in = stream._next_index
            stats["frames_in"] = frames_in
            # How far a live output is behind its input: nothing in a batch (outputs in step)
            # or while the stream fills (the frame is finished early).
            filling = frames_in <= stream.lag
            stats["lag"] = stream.lag if mode == "live" and not filling else 0
        return stats

    def run(
        self,
        model: StreamModel,
        config: StreamConfig,
        bank_config: BankConfig,
        prompt: str,
        negative_prompt: str,
        frames: torch.Tensor | Sequence,
        each_run: str = "continue stream",
        on_frame: FrameCallback | None = None,
        accel: str = DEFAULT_ACCEL,
        on_status: Callable[[str], None] | None = None,
    ) -> torch.Tensor:
        """Restyle ``frames`` (``[N, H, W, 3]``), continuing this session's stream.

        N > 1: N outputs, output i translating frame i; with ``continue stream`` the stream is
        left where the last real frame left it, so the next chunk carries on without a seam.
        N = 1 right after such a batch (a video's last chunk) is a batch too. Any other N = 1
        (a webcam frame, a still) is a live frame: the output ``lag`` frames behind, or while
        the stream fills, the current frame finished early. Frames of another size, another
        model, or another UNet batch (step count; CFG initialize/full) than the bank's start a new
        bank, with a note.
        A failure leaves bank and stream as they were. ``accel`` and ``on_status`` are
        ``StreamV2V``'s.
        """
        if each_run not in EACH_RUN:
            raise StreamV2VError(f"each run must be one of {', '.join(EACH_RUN)}, not {each_run!r}")
        if len(frames) == 0:
            raise StreamV2VError("the image batch has no frames: connect at least one image")
        size = tuple(to_rgb(frames[0], "the first image").shape[:2])
        settings = RunSettings(model, config, bank_config, prompt, negative_prompt, accel, size)
        with self._held():
            outputs, self.notes = self._run(settings, frames, each_run, on_frame, on_status)
        return outputs

    def _run(
        self,
        settings: RunSettings,
        frames: torch.Tensor | Sequence,
        each_run: str,
        on_frame: FrameCallback | None,
        on_status: Callable[[str], None] | None,
    ) -> tuple[torch.Tensor, list[str]]:
        """``run``'s work, with the session held: the outputs and what the run noted."""
        model, config, bank_config, prompt, negative_prompt, accel, size = settings
        count = len(frames)
        saved = [getattr(self, name) for name in ROLLED_BACK]
        # a released stream's bank is kept and refilled by the next stream: save it alone
        checkpoint = self.stream.checkpoint() if self.stream else self.bank and self.bank.snapshot()
        notes: list[str] = []
        try:
            stream = self._stream_for(model, config, bank_config, each_run, accel, size, notes)
            stream.on_status = on_status
            self.settings = settings
            if (prompt, negative_prompt) != (stream.prompt, stream.negative_prompt):
                stream.set_prompt(prompt, negative_prompt)
            if count > 1:
                self.mode = "batch"
            else:
                self.mode = "tail" if self.mode == "batch" else "live"
            if self.mode == "live":
                outputs = torch.stack(self._live(stream, frames[0]))
                if on_frame is not None:
                    on_frame(1, 1, outputs[-1])
            else:
                outputs = self._batch(stream, frames, each_run, on_frame)
            if stream.accel_note:  # read after the frames: compiling may have failed on them
                notes.append(stream.accel_note)
        except BaseException as exc:
            for name, value in zip(ROLLED_BACK, saved, strict=True):
                setattr(self, name, value)
            if self.stream is not None:
                self.stream.rollback(checkpoint)
            elif self.bank is not None:
                self.bank.restore(checkpoint)
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                h, w = size
                raise StreamV2VError(
                    f"{w}x{h} frames at {len(config.timestep_indices)} steps do not fit in "
                    "GPU memory: lower width/height, use fewer steps, or free memory"
                ) from exc
            raise
        self.runs += 1
        return outputs, notes

    def live_settings(self) -> RunSettings:
        """The settings live frames go on with: the last run's, while its model is loaded."""
        settings = self.settings
        if settings is None:
            raise no_live_stream(self.name)
        return settings

    def run_live(
        self, frame: torch.Tensor, on_status: Callable[[str], None] | None = None
    ) -> torch.Tensor:
        """One more frame of the stream, with the last run's settings: a live camera sends
        frames faster than a host can queue a run for each, so they come without settings.

        The frame must have the size the last run's frames had (``settings.size``): another
        size would start a new bank behind the caller's back.
        """
        frame = to_rgb(frame, "the live frame")
        with self._held():
            # Read with the session held: a queued run (new settings) or a release (no model)
            # that came first is what this frame must go on from, not undo.
            settings = self.live_settings()
            if tuple(frame.shape[:2]) != settings.size:
                raise FrameSizeError(tuple(frame.shape[:2]), settings.size)
            # its notes are not kept: they would replace those of the run a sampler shows
            return self._run(settings, frame[None], "continue stream", None, on_status)[0][0]

    def _stream_for(
        self,
        model: StreamModel,
        config: StreamConfig,
        bank_config: BankConfig,
        each_run: str,
        accel: str,
        size: tuple[int, int],
        notes: list[str],
    ) -> StreamV2V:
        key = (id(model), config, bank_config, accel, size)
        if self.stream is not None and self.key == key and each_run == "continue stream":
            return self.stream
        layout = BankLayout.of(model, config, size)
        if self.bank is None or self.bank.config != bank_config:
            if self.bank is not None and self.bank.frames_absorbed:
                notes.append("bank settings changed: started a new bank")
            self.bank = FeatureBank(bank_config)
        elif each_run == "start new stream":
            self.bank = FeatureBank(bank_config)
        elif self.layout != layout and self.bank.frames_absorbed:
            notes.append(f"{_what_changed(self.layout, layout)}: started a new bank")
            self.bank = FeatureBank(bank_config)
        elif self.released:
            notes.append("the model was released: new stream, bank kept")
        elif self.stream is not None:
            notes.append("settings changed: new stream, bank kept")
        self.stream = StreamV2V(model, config, self.bank, accel=accel)
        self.key, self.layout, self.mode, self.released = key, layout, None, False
        return self.stream

    def _live(self, stream: StreamV2V, frame: torch.Tensor) -> list[torch.Tensor]:
        ready = stream.push(frame)
        if ready:
            return ready[-1:]
        # Still filling: finish this frame early without disturbing the stream.
        return stream.flush(keep_state=True)[-1:]

    def _batch(
        self,
        stream: StreamV2V,
        frames: torch.Tensor | Sequence,
        each_run: str,
        on_frame: FrameCallback | None,
    ) -> torch.Tensor:
        """Frames move to the GPU and back in chunks through pinned memory without waiting:
        the GPU has a queue of frames to work through while the host copies the next chunk
        in and the finished ones out, so neither waits for the other."""
        count = len(frames)
        # A stream continued from an earlier run first returns that run's last frames.
        results = _Downloads(stream.device, count, skip=stream.pending)
        for start in range(0, count, TRANSFER_CHUNK):
            chunk = frames[start : start + TRANSFER_CHUNK]
            if isinstance(chunk, torch.Tensor):
                chunk = stream.upload(chunk)
            for i, frame in enumerate(chunk, start):
                results.add(stream.push(frame, to_cpu=False))
                if on_frame is not None:
                    on_frame(i + 1, count, results.latest())
        results.add(stream.flush(keep_state=each_run == "continue stream", to_cpu=False))
        return results.finish()


# What a failed run puts back as it was, beside the bank's and the stream's tensors.
ROLLED_BACK = ("bank", "stream", "key", "layout", "mode", "released", "settings")
TRANSFER_CHUNK = 16
# Chunks on their way to the host at once: the host waits for the oldest beyond these, so the
# pinned memory a long batch holds stays a few chunks' worth.
CHUNKS_IN_FLIGHT = 4


PREVIEW_EVERY_S = 0.2


class _Downloads:
    """Images leaving the GPU in chunks, each copied into pinned memory without a host sync,
    then into the run's output tensor while the GPU works on later frames; between chunks, now
    and then a copy of the newest image alone, for the preview."""

    def __init__(self, device: torch.device, count: int, skip: int) -> None:
        self.cuda = device.type == "cuda"
        self.on_host = device.type == "cpu"  # the images need no copy to reach the host
        self.count, self.skip = count, skip
        self.out: torch.Tensor | None = None  # [count, H, W, 3] on the host, made when needed
        self.received = 0  # images that reached the host, skipped ones included
        self.pending: list[torch.Tensor] = []
        self.added = 0
        # (images added when the copy started, host copy, its event on a GPU)
        self.chunks: deque[tuple[int, torch.Tensor, torch.cuda.Event | None]] = deque()
        # The preview copy under way (or done), and the one done before it
        nothing = (0, torch.empty(0), None)
        self.preview: tuple[int, torch.Tensor, torch.cuda.Event | None] = nothing
        self.previewed = nothing
        self.preview_at = -math.inf

    def add(self, images: list[torch.Tensor]) -> None:
        self.pending += images
        self.added += len(images)
        if len(self.pending) >= TRANSFER_CHUNK:
            self._send()

    def _send(self) -> None:
        if not self.pending:
            return
        batch = torch.stack(self.pending)
        self.pending = []
        self.chunks.append((self.added, *self._copy(batch)))
        while len(self.chunks) > CHUNKS_IN_FLIGHT:
            self._receive()

    def _copy(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        if self.on_host:  # a chunk's stack is a tensor of its own already
            return images, None
        host = torch.empty(images.shape, dtype=images.dtype, pin_memory=self.cuda)
        host.copy_(images, non_blocking=self.cuda)
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        return host, event

    def _receive(self) -> None:
        """The oldest chunk into the output, once it is on the host."""
        _, host, event = self.chunks.popleft()
        if event is not None:
            event.synchronize()
        drop = min(len(host), max(0, self.skip - self.received))
        self.received += len(host)
        kept = host[drop:]
        if not len(kept):
            return
        if self.out is None:
            self.out = torch.empty((self.count, *kept.shape[1:]), dtype=kept.dtype)
        done = self.received - self.skip - len(kept)
        self.out[done : done + len(kept)] = kept

    def latest(self) -> torch.Tensor | None:
        """The newest image already on the host (for previews; never waits for the GPU)."""
        if not self.cuda:  # copies are done when made: the newest on the host is current
            if self.on_host and self.pending:
                return self.pending[-1]
            if self.chunks:
                return self.chunks[-1][1][-1]
            return self._last_received()
        self._start_preview()
        newest: tuple[int, torch.Tensor] | None = None
        for added, host, event in reversed(self.chunks):
            if event.query():
                newest = (added, host[-1])
                break
        for added, host, event in (self.preview, self.previewed):
            if event is not None and event.query() and (newest is None or added > newest[0]):
                newest = (added, host)
        return self._last_received() if newest is None else newest[1]

    def _last_received(self) -> torch.Tensor | None:
        done = self.received - self.skip
        return self.out[done - 1] if self.out is not None and done > 0 else None

    def _start_preview(self) -> None:
        """Copy the newest image on its own every PREVIEW_EVERY_S, so a preview need not wait
        for its chunk (16 frames); one small copy at a time, so it costs the frames nothing."""
        now = time.monotonic()
        if not self.pending or now - self.preview_at < PREVIEW_EVERY_S:
            return
        if self.preview[2] is not None and not self.preview[2].query():
            return
        self.previewed = self.preview  # done: shown until the new copy is
        host, event = self._copy(self.pending[-1])
        self.preview, self.preview_at = (self.added, host, event), now

    def finish(self) -> torch.Tensor:
        self._send()
        while self.chunks:
            self._receive()
        if self.received - self.skip != self.count:
            raise RuntimeError(f"{self.received - self.skip} frames came back for {self.count}")
        return self.out


class SessionRegistry:
    """Sessions by name: two graphs with different bank names never share a stream."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}

    def get(self, name: str) -> Session:
        name = validate_bank_name(name)
        return self._sessions.setdefault(name, Session(name))

    def find(self, name: str) -> Session | None:
        """The named session if a run has made it (looking does not make one)."""
        return self._sessions.get(validate_bank_name(name))

    def reset(self, name: str) -> bool | None:
        """Reset the named bank: True done, False left to the run using it, None no such bank."""
        session = self._sessions.get(validate_bank_name(name))
        return None if session is None else session.reset()

    def names(self) -> list[str]:
        return sorted(self._sessions)

    def drop_streams(self) -> None:
        """Let go of every stream (and so of the models they use); banks stay."""
        for session in list(self._sessions.values()):  # a run may add one meanwhile
            session.release()

    def clear(self) -> None:
        self._sessions.clear()


def no_live_stream(name: str) -> StreamV2VError:
    return StreamV2VError(
        f"bank '{name}' has no stream to continue (no run used it since the host started, or its "
        "model was released): run the workflow once, then go live"
    )


class FrameSizeError(StreamV2VError):
    """A live frame whose size is not the stream's: the stream's frames changed size (a run
    with other frames), so the sender should send ``size`` (height, width) from now on."""

    def __init__(self, got: tuple[int, int], size: tuple[int, int]) -> None:
        (h, w), (sh, sw) = got, size
        super().__init__(
            f"the live frame is {w}x{h}, the stream's frames are {sw}x{sh}: send frames of the "
            "stream's size"
        )
        self.size = size


class RunSettings(NamedTuple):
    """What a run of a session went with, apart from its frames."""

    model: StreamModel
    config: StreamConfig
    bank_config: BankConfig
    prompt: str
    negative_prompt: str
    accel: str
    size: tuple[int, int]  # the frames' (height, width)


class BankLayout(NamedTuple):
    """What a bank's tokens depend on: the weights, the size frames are processed at, and the
    UNet's batch rows (one per step, plus CFG's)."""

    model: str
    size: tuple[int, int]
    rows: int

    @classmethod
    def of(cls, model: StreamModel, config: StreamConfig, size: tuple[int, int]) -> BankLayout:
        height, width = size
        processed = processing_size(*output_size(config.width, config.height, width, height))
        return cls(model.description, processed, config.unet_rows)


def _what_changed(old: BankLayout | None, new: BankLayout) -> str:
    if old is None:
        return "the bank was filled by another stream"
    changed = []
    if old.model != new.model:
        changed.append("the model")
    if old.size != new.size:
        (w0, h0), (w1, h1) = old.size, new.size
        changed.append(f"the frame size ({w0}x{h0} to {w1}x{h1})")
    if old.rows != new.rows:
        changed.append("the step count or CFG type")
    return " and ".join(changed) + " changed"


def validate_bank_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise StreamV2VError("bank name is empty: give the bank a name, e.g. 'bank'")
    return name.strip()
