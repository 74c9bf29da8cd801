"""CUDA graph capture beside the rest of ComfyUI: another thread's GPU work must not spoil the
stream's capture, and a capture that fails anyway must leave the process as it was."""

import threading
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from streamv2v import capture
from streamv2v.capture import CAPTURE_TRIES, capture_graph
from streamv2v.errors import StreamV2VError
from streamv2v.stream import StreamConfig, StreamV2V
from tests.test_accel import BANKS, GPU, assert_frames_close, on_device, run
from tests.test_stream import video


def busy(stop: threading.Event, errors: list[str], empty_cache: bool) -> None:
    """GPU work as another ComfyUI workflow does it: new sizes (so new allocations), noise from
    its own seeded generator, and the cache emptied as ComfyUI's memory manager does."""
    generator = torch.Generator(device="cuda")
    n = 0
    while not stop.is_set():
        try:
            x = torch.randn(512 + n % 40 * 64, 512, device="cuda", generator=generator)
            y = x @ x.T
            del x, y
            if empty_cache:
                torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001 - what the other workflow would see
            errors.append(repr(exc)[:300])
        n += 1


@GPU
@pytest.mark.parametrize(
    ("accel", "empty_cache"),
    [("graphs", False), ("graphs", True), ("compile", True)],
    ids=["graphs-allocating", "graphs-emptying-the-cache", "compile-emptying-the-cache"],
)
def test_a_stream_captures_while_another_thread_works_the_gpu(tiny_model_taesd, accel, empty_cache):
    model = on_device(tiny_model_taesd, accel)
    frames = video(12)
    want, _ = run(model, "off", BANKS["dyme"], frames, prompt="ink")
    stop, errors, failure, got = threading.Event(), [], [], []

    def live() -> None:  # the live camera's thread
        try:
            stream = StreamV2V(model, StreamConfig(), BANKS["dyme"], prompt="ink", accel=accel)
            got.extend(frame.cpu() for frame in stream.process(frames))
        except Exception as exc:  # noqa: BLE001
            failure.append(repr(exc)[:500])

    other = threading.Thread(target=busy, args=(stop, errors, empty_cache))
    other.start()
    try:
        stream_thread = threading.Thread(target=live)
        stream_thread.start()
        stream_thread.join()
    finally:
        stop.set()
        other.join()
    assert not failure, failure
    assert not errors, errors[:3]
    assert_frames_close(got, [w.cpu() for w in want], accel)


def spoiling(tries: int):
    """A body whose first ``tries`` captures fail as one spoiled by a device-wide synchronize
    (here its own: another thread's is not reproducible), then a step that draws noise."""
    noise = torch.Generator(device="cuda").manual_seed(7)
    out = torch.zeros(64, device="cuda")
    calls = []

    def body() -> None:
        calls.append(1)
        if len(calls) <= tries:
            torch.cuda.synchronize()
        out.copy_(torch.randn(64, device="cuda", generator=noise))

    return body, noise, out, calls


def clean(**options) -> tuple:
    """A graph of a body that captures at the first try, and its pool."""
    body, noise, _, _ = spoiling(0)
    return capture_graph(body, generators=[noise], **options)


@GPU
def test_a_spoiled_capture_is_undone_and_tried_again_in_a_new_pool():
    body, noise, out, calls = spoiling(1)
    before = torch.cuda.current_stream()
    shared = torch.cuda.graph_pool_handle()  # as the stream's two graphs share one
    graph, pool = capture_graph(body, pool=shared, generators=[noise])
    assert len(calls) == 2 and pool != shared  # the spoiled pool is left alone
    assert torch.cuda.current_stream() == before
    torch.randn(4, device="cuda")  # the default generator draws outside a capture again
    torch.randn(4, device="cuda", generator=noise)
    graph.replay()
    first = out.clone()
    graph.replay()
    assert not torch.equal(first, out)  # the graph's own noise moves on at each replay
    again, same = clean(pool=pool)  # the next graph shares the new one
    assert same == pool
    again.replay()


@GPU
def test_a_capture_that_keeps_failing_says_so_and_leaves_the_gpu_usable():
    body, noise, _, calls = spoiling(CAPTURE_TRIES)
    before = torch.cuda.current_stream()
    with pytest.raises(StreamV2VError, match="failed 3 times.*set acceleration to 'off'"):
        capture_graph(body, generators=[noise])
    assert len(calls) == CAPTURE_TRIES
    assert torch.cuda.current_stream() == before
    torch.randn(4, device="cuda")
    torch.randn(4, device="cuda", generator=noise)
    clean()[0].replay()


@GPU
def test_captures_on_two_threads_take_turns():
    """Each capture begins by synchronizing the device, which would spoil the other's."""
    failures = []

    def capture() -> None:
        try:
            for _ in range(5):
                clean()[0].replay()
        except Exception as exc:  # noqa: BLE001
            failures.append(repr(exc))

    threads = [threading.Thread(target=capture) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


class FakeGraph:
    """Stands in for ``torch.cuda.CUDAGraph`` off the GPU."""

    def register_generator_state(self, generator):
        self.generators = [*getattr(self, "generators", []), generator]


@pytest.fixture
def fake_cuda(monkeypatch):
    """Captures that fail as told, off the GPU: ``fails`` maps a capture's number (from 0) to
    what its end raises."""
    seen = SimpleNamespace(fails={}, modes=[], pools=[], streams=[], ended=[])
    handles = iter(range(100))

    @contextmanager
    def graph(cuda_graph, pool=None, stream=None, capture_error_mode="global"):
        seen.modes.append(capture_error_mode)
        seen.pools.append(pool)
        yield
        if len(seen.modes) - 1 in seen.fails:
            raise seen.fails[len(seen.modes) - 1]  # as capture_end raises

    current = SimpleNamespace(device=torch.device("cpu"))
    monkeypatch.setattr(capture.torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(capture.torch.cuda, "graph", graph)
    monkeypatch.setattr(capture.torch.cuda, "graph_pool_handle", lambda: (0, next(handles)))
    monkeypatch.setattr(capture.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(capture.torch.cuda, "current_stream", lambda: current)
    monkeypatch.setattr(capture.torch.cuda, "set_stream", seen.streams.append)
    monkeypatch.setattr(
        capture.torch._C, "_cuda_endAllocateToPool", lambda *a: seen.ended.append(a)
    )
    monkeypatch.setattr(capture, "side_stream", lambda device, purpose: "capture stream")
    monkeypatch.setattr(capture.torch, "zeros", lambda *a, **k: torch.tensor([0.0]))
    seen.current = current
    return seen


def test_capture_retries_what_another_thread_spoiled_and_puts_the_stream_back(fake_cuda):
    spoiled = RuntimeError("operation failed due to a previous error during capture")
    fake_cuda.fails = {0: spoiled, 2: spoiled}  # 1 and 3: the empty captures that undo them
    generator = torch.Generator()
    graph, pool = capture_graph(lambda: None, pool=(0, 99), generators=[generator])
    assert graph.generators == [generator]
    # three tries, and after each failure one empty capture that frees the generators
    assert fake_cuda.modes == ["thread_local"] * 5
    # each try after a failure in a pool of its own; the spoiled ones told to stop capturing
    assert [fake_cuda.pools[i] for i in (0, 2, 4)] == [(0, 99), (0, 0), (0, 1)] and pool == (0, 1)
    assert fake_cuda.ended == [(0, (0, 99)), (0, (0, 0))]
    assert fake_cuda.streams == [fake_cuda.current, fake_cuda.current]


def test_capture_gives_up_after_its_tries_with_what_to_do(fake_cuda):
    fake_cuda.fails = {2 * n: RuntimeError("spoiled during capture") for n in range(CAPTURE_TRIES)}
    said = "failed 3 times \\(last: RuntimeError: spoiled during capture\\).*'off'"
    with pytest.raises(StreamV2VError, match=said):
        capture_graph(lambda: None)
    assert len(fake_cuda.streams) == CAPTURE_TRIES


@pytest.mark.parametrize(
    "error",
    [
        torch.cuda.OutOfMemoryError("out of memory"),
        StreamV2VError("the user's"),
        RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED"),  # not the capture's: said as it is
    ],
)
def test_capture_does_not_retry_what_trying_again_cannot_mend(fake_cuda, error):
    def body():
        raise error

    with pytest.raises(type(error)) as raised:
        capture_graph(body)
    assert raised.value is error
    assert fake_cuda.modes == ["thread_local"] * 2  # the try, and the capture that frees
    assert fake_cuda.streams == [fake_cuda.current]


def test_a_failed_undo_says_what_failed_and_what_to_do(fake_cuda):
    fake_cuda.fails = {0: RuntimeError("spoiled during capture"), 1: RuntimeError("busy")}
    with pytest.raises(StreamV2VError, match="could not be undone .*busy.*restart ComfyUI"):
        capture_graph(lambda: None)
