"""The threads that share the pack's state, each race forced deterministically (events, a
line tracer, a gated lock): ComfyUI's execution thread (runs, loads, Free Memory), the live
camera's thread (``LiveLoop``), the server's event loop (bank routes) and its worker threads
(``/streamv2v/free``)."""

import inspect
import sys
import threading
import weakref

import pytest
import torch

from streamv2v.bank import LayerEntries
from streamv2v.session import Session, SessionRegistry
from tests.test_live import TIMEOUT, Answers, blocked_in, frames, png, started
from tests.test_nodes import PACK, bank, comfy, load, sample, video  # noqa: F401 (fixture)

# -- helpers ---------------------------------------------------------------------------------


def line_of(function, text: str) -> int:
    """The line number of the first line of ``function`` containing ``text``."""
    lines, start = inspect.getsourcelines(function)
    for offset, line in enumerate(lines):
        if text in line:
            return start + offset
    raise AssertionError(text)


class PauseAt:
    """A tracer that stops the first thread (other than the main one) reaching ``line`` of
    ``function`` until ``go`` is set."""

    def __init__(self, function, text: str) -> None:
        self.code = function.__code__
        self.line = line_of(function, text)
        self.reached = threading.Event()
        self.go = threading.Event()
        self.done = False

    def __call__(self, frame, event, arg):
        if event == "call" and frame.f_code is self.code and not self.done:
            return self._local
        return None

    def _local(self, frame, event, arg):
        if event == "line" and frame.f_lineno == self.line and not self.done:
            self.done = True
            self.reached.set()
            self.go.wait(TIMEOUT)
        return self._local


def traced(tracer, target, *args):
    """Run ``target(*args)`` on a thread under ``tracer``; returns (thread, result dict)."""
    out = {}

    def body():
        sys.settrace(tracer)
        try:
            out["value"] = target(*args)
        except BaseException as exc:  # noqa: BLE001
            out["error"] = exc
        finally:
            sys.settrace(None)

    thread = threading.Thread(target=body)
    thread.start()
    return thread, out


# -- 1. two sessions run one UNet at once: a frame attends to the other bank -------------------


@pytest.mark.parametrize("other_size", [(24, 32), (32, 40)], ids=["same size", "other size"])
def test_two_banks_live_at_once_each_frame_uses_its_own_bank(tiny_model_taesd, other_size):
    """Two sessions (bank 'a' live on the camera thread, bank 'b' run by a queued run or a
    second camera) share the one loaded UNet. Stream 'a' installs its attention processors
    and calls the UNet; meanwhile stream 'b' installs its own. 'a' then runs with b's
    processors: it attends to (and could record into) bank 'b'."""
    model = tiny_model_taesd
    camera = frames(1, seed=5)[0]
    reference = started(model, "reference")
    expected = reference.run_live(camera)

    a = started(model, "a")
    h, w = other_size
    b = started(model, "b", frame=frames(1, width=w, height=h, seed=7)[0])
    unet = model.pipe.unet
    in_unet, go = threading.Event(), threading.Event()
    holder = {}

    def pause_first_call(module, args, kwargs):
        if threading.current_thread() is holder.get("thread") and not in_unet.is_set():
            in_unet.set()  # a's processors are installed, its UNet call has begun
            go.wait(TIMEOUT)

    hook = unet.register_forward_pre_hook(pause_first_call, with_kwargs=True)
    try:
        out = {}

        def live_a():
            try:
                out["value"] = a.run_live(camera)
            except Exception as exc:  # noqa: BLE001
                out["error"] = exc

        holder["thread"] = thread = threading.Thread(target=live_a)
        thread.start()
        assert in_unet.wait(TIMEOUT)
        other = threading.Thread(target=b.run_live, args=(frames(1, width=w, height=h, seed=8)[0],))
        other.start()  # bank b's frame, on another thread (a queued run, a second camera)
        other.join(2.0)  # done by now, unless it waits for a's UNet call (as it should)
        go.set()
        thread.join(TIMEOUT)
        other.join(TIMEOUT)
    finally:
        hook.remove()
    assert "error" not in out, out["error"]
    assert torch.equal(out["value"], expected)


# -- 2. Free (route, worker thread) races a queued run: the released model comes back ----------


def test_free_memory_during_a_run_on_another_bank_really_frees_the_model(comfy):  # noqa: F811
    """/streamv2v/free runs release_models on a worker thread; it waits for bank 'b' (a live
    frame under way). Meanwhile the execution thread runs a sampler on bank 'a': MODELS.get
    still has the model, a.run makes a new stream on it. Then Free clears the cache and
    answers released=True, but bank 'a' holds the model; the next load makes a second one."""
    state = comfy.state_module
    model = load(comfy)
    handle_a, _ = bank(comfy, name="free-a")
    handle_b, _ = bank(comfy, name="free-b")
    sample(comfy, model, handle_a, video(2))
    sample(comfy, model, handle_b, video(2))
    loaded = weakref.ref(state.MODELS.get(model.spec))
    a, b = state.SESSIONS.find("free-a"), state.SESSIONS.find("free-b")
    out = {}
    busy, done = threading.Event(), threading.Event()

    def live_frame_on_b():
        with b._busy:
            busy.set()
            done.wait(TIMEOUT)

    frame_b = threading.Thread(target=live_frame_on_b)
    frame_b.start()
    assert busy.wait(TIMEOUT)
    free = threading.Thread(target=lambda: out.setdefault("released", state.release_models()))
    free.start()
    blocked_in(free, "release", on=b)  # a released, waiting for b
    run = threading.Thread(target=sample, args=(comfy, model, handle_a, video(2)))
    run.start()  # the queued run on bank a (ComfyUI's execution thread)
    run.join(2.0)  # done by now, unless it waits for the release (as it should)
    done.set()
    for thread in (frame_b, free, run):
        thread.join(TIMEOUT)
    assert out["released"] is True
    import gc

    gc.collect()
    current = state.MODELS._model
    assert a.stream is None or a.stream.model is current, "bank a holds a released model"
    assert loaded() is None, "the released model is still in memory"


# -- 3. Free (worker thread) while a run adds a bank: drop_streams iterates a changing dict -----


def test_free_memory_while_a_new_bank_appears_releases_everything():
    """drop_streams loops over the registry's dict and waits in each release (a live frame
    on bank 'a'); the execution thread's sampler makes bank 'b' meanwhile (SESSIONS.get)."""
    registry = SessionRegistry()
    a = registry.get("a")
    errors = []

    def free():
        try:
            registry.drop_streams()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    with a._busy:  # a live frame on bank a
        thread = threading.Thread(target=free)
        thread.start()
        blocked_in(thread, "release")
        registry.get("b")  # a queued run on a new bank
    thread.join(TIMEOUT)
    assert errors == []  # RuntimeError: dictionary changed size during iteration


# -- 4. stats read while another thread drops the stream: AttributeError ----------------------


def test_bank_stats_while_the_stream_is_let_go(tiny_model_taesd):
    """/streamv2v/banks (event loop) reads Session.stats while /streamv2v/free (worker
    thread) releases the stream: 'stream is not None' and 'stream._next_index' straddle it."""
    session = started(tiny_model_taesd)
    pause = PauseAt(Session.stats, "._next_index")
    thread, out = traced(pause, session.stats)
    assert pause.reached.wait(TIMEOUT)
    session.release()
    pause.go.set()
    thread.join(TIMEOUT)
    assert "error" not in out, repr(out.get("error"))


def test_reset_bank_while_live_does_not_end_the_live_camera(comfy, monkeypatch):  # noqa: F811
    """The live loop's status line (describe -> Session.stats, on the live thread, between
    frames) races the Reset bank route (session idle, so it resets at once: stream None).
    The camera ends with 'the live stream failed: 'NoneType' object has no attribute...'."""
    live_module = comfy.engine("live")
    describe = sys.modules[PACK + ".nodes.bank"].describe
    Session_ = comfy.engine("session").Session
    state = comfy.state_module
    monkeypatch.setattr(live_module, "STATUS_EVERY_S", 0.0)
    model = load(comfy)
    handle, _ = bank(comfy, name="cam")
    first = frames(1)[0]
    sample(comfy, model, handle, (first.float() / 255)[None])
    session = state.SESSIONS.find("cam")
    pause = PauseAt(Session_.stats, "._next_index")
    answers = Answers()
    threading.settrace(pause)  # the live thread (started by LiveLoop) runs traced
    try:
        loop = live_module.LiveLoop(session, answers, describe=lambda: describe("cam"))
    finally:
        threading.settrace(None)
    loop.offer(png(first))
    assert pause.reached.wait(TIMEOUT)  # the frame is answered; its status line is being made
    assert state.SESSIONS.reset("cam") is True  # POST /streamv2v/bank/reset
    pause.go.set()
    loop.offer(png(first))
    answers.wait(2)
    loop.close()
    loop.join(TIMEOUT)
    errors = [m for m in answers.messages if isinstance(m, dict) and m["type"] == "error"]
    assert errors == []


# -- 5. a reset asked for as a run ends is left pending with no run to apply it ---------------


class GatedLock:
    """A Lock whose refused non-blocking acquire waits for ``gate`` before saying so, to
    hold a thread between 'the lock is taken' and what it does about it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.refused, self.gate = threading.Event(), threading.Event()

    def acquire(self, blocking=True, timeout=-1):
        got = self.lock.acquire(blocking, timeout)
        if not got and not blocking:
            self.refused.set()
            self.gate.wait(TIMEOUT)
        return got

    def release(self):
        self.lock.release()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def test_a_reset_pressed_as_a_run_ends_is_done(tiny_model_taesd, monkeypatch):
    """reset() finds the session busy, then the run ends (its last check sees no reset), then
    reset() sets the flag: nothing applies it until some later run. The bank stays full and
    every status line says 'emptied when the current run ends' with no run under way."""
    session = started(tiny_model_taesd)
    session._busy = GatedLock()
    in_frame, finish = threading.Event(), threading.Event()
    push = session.stream.push

    def slow_push(*args, **kwargs):
        in_frame.set()
        finish.wait(TIMEOUT)
        return push(*args, **kwargs)

    monkeypatch.setattr(session.stream, "push", slow_push)
    run = threading.Thread(target=session.run_live, args=(frames(1)[0],))
    run.start()
    assert in_frame.wait(TIMEOUT)
    result = {}
    reset = threading.Thread(target=lambda: result.setdefault("done", session.reset()))
    reset.start()
    assert session._busy.refused.wait(TIMEOUT)  # the run holds the session
    finish.set()
    run.join(1.0)  # the run ends, or waits for the reset to decide
    session._busy.gate.set()
    reset.join(TIMEOUT)
    run.join(TIMEOUT)
    assert not session._busy.lock.locked()  # ... but no run is under way
    assert not session.reset_pending and session.bank.frames_absorbed == 0


# -- 6. the sampler's notes are read after the session is let go -------------------------------


def test_the_samplers_notes_are_its_own_runs(comfy, monkeypatch):  # noqa: F811
    """The sampler reads session.notes after session.run returned: a live frame that runs in
    between (LiveLoop thread) replaces them, and the node loses e.g. 'started a new bank'."""
    sampler_module = sys.modules[PACK + ".nodes.sampler"]
    model = load(comfy)
    handle, _ = bank(comfy, name="notes")
    first = frames(1)[0]
    sample(comfy, model, handle, (first.float() / 255)[None])
    session = comfy.state_module.SESSIONS.find("notes")
    real_describe = sampler_module.describe

    def describe_after_a_live_frame(name, kind=None):
        live = threading.Thread(target=session.run_live, args=(first,))
        live.start()  # the live camera's next frame, as soon as the run lets go
        live.join(TIMEOUT)
        return real_describe(name, kind)

    monkeypatch.setattr(sampler_module, "describe", describe_after_a_live_frame)
    _, text = sample(comfy, model, handle, (first.float() / 255)[None], strength=0.5)
    assert "settings changed: new stream, bank kept" in text, text


# -- 7. bank stats read torn against a reset -------------------------------------------------


def test_bank_stats_are_one_moments(tiny_model_taesd, monkeypatch):
    """FeatureBank.stats copies the layers, then reads frames_absorbed and nbytes() from the
    live bank: a reset in between gives layers and tokens but 0 bytes and 0 updates."""
    session = started(tiny_model_taesd)
    reading, go = threading.Event(), threading.Event()
    tokens = LayerEntries.tokens

    def slow_tokens(self):
        if threading.current_thread() is not threading.main_thread() and not reading.is_set():
            reading.set()
            go.wait(TIMEOUT)
        return tokens(self)

    monkeypatch.setattr(LayerEntries, "tokens", slow_tokens)
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("stats", session.bank.stats()))
    thread.start()
    assert reading.wait(TIMEOUT)
    reset = threading.Thread(target=session.reset)  # POST /streamv2v/bank/reset, session idle
    reset.start()
    reset.join(2.0)  # done by now, unless it waits for the stats being read
    go.set()
    thread.join(TIMEOUT)
    reset.join(TIMEOUT)
    stats = out["stats"]
    assert (stats["layers"] == 0) == (stats["bytes"] == 0) == (stats["frames_absorbed"] == 0), stats
