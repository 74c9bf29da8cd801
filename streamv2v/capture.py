"""CUDA graph capture that shares the GPU with the rest of ComfyUI.

The live camera's stream captures its graphs on its own thread while ComfyUI may run another
workflow on the GPU. In CUDA's default (global) capture mode, another thread's memory
allocation or ``torch.cuda.empty_cache`` during a capture fails both the capture and the other
thread's call: on an H100, the engine's capture beside a thread that only allocated failed in
every case (docs/performance.md). Capturing in thread-local mode lets the other thread's work
through. A device-wide synchronize on another thread still spoils a capture in either mode,
and a capture that fails leaves PyTorch's default CUDA generator marked as capturing, so every
later ``torch.randn`` on that GPU in the process would fail until ComfyUI restarts; it leaves
the thread on the capture's stream, and its memory pool marked as capturing (a capture into it
fails from then on). So a failed capture is undone, and tried again in a new pool.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence

import torch

from .cudastreams import side_stream
from .errors import StreamV2VError, describe_failure

log = logging.getLogger(__name__)

CAPTURE_TRIES = 3
MODE = "thread_local"  # other threads' allocations and empty_cache may go on meanwhile
# torch.cuda.graph synchronizes the whole device as it begins, which spoils a capture under way
# on another thread: this process's captures take turns.
ONE_AT_A_TIME = threading.Lock()


def capture_graph(
    body: Callable[[], None],
    *,
    pool: tuple[int, int] | None = None,
    stream: torch.cuda.Stream | None = None,
    generators: Sequence[torch.Generator] = (),
) -> tuple[torch.cuda.CUDAGraph, tuple[int, int]]:
    """Capture ``body`` into a new graph, and the memory pool it was captured into.

    A try spoiled by another thread is undone and made again, into a new pool (a spoiled one
    stays marked as capturing): the returned pool is the one later graphs may share. ``body``
    runs once per try, captured, not executed, so it must change no state outside the GPU.
    ``generators`` (besides the default one) draw random numbers inside ``body``.
    """
    device = torch.device("cuda", torch.cuda.current_device())
    stream = stream or side_stream(device, "capture")
    last = ""
    with ONE_AT_A_TIME:
        for _ in range(CAPTURE_TRIES):
            pool = pool or torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            for generator in generators:
                graph.register_generator_state(generator)
            before = torch.cuda.current_stream()
            try:
                with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode=MODE):
                    body()
            except Exception as exc:
                del graph
                _undo_failed_capture(exc, before, generators, device, pool)
                pool = None
                if not _spoiled(exc):
                    raise  # not another thread's doing: trying again cannot help
                last = describe_failure(exc)
                log.warning("capturing a CUDA graph failed, trying again: %s", last)
            else:
                return graph, pool
    raise StreamV2VError(
        f"capturing a CUDA graph failed {CAPTURE_TRIES} times (last: {last}): another "
        "workflow may have been using the GPU at the same moment; run again, or set "
        "acceleration to 'off'"
    )


def _spoiled(exc: Exception) -> bool:
    """Whether ``exc`` is a capture that something spoiled (CUDA names the capture in it), the
    kind of failure another thread's work causes and a second try may not meet."""
    return (
        isinstance(exc, RuntimeError)  # torch.AcceleratorError is one
        and not isinstance(exc, torch.cuda.OutOfMemoryError)
        and "captur" in str(exc).lower()
    )


def _undo_failed_capture(
    exc: Exception,
    before: torch.cuda.Stream,
    generators: Sequence[torch.Generator],
    device: torch.device,
    pool: tuple[int, int],
) -> None:
    """Put back what a failed capture leaves behind: the thread's stream, the pool, and the
    generators.

    ``torch.cuda.graph`` leaves the thread on the capture's stream when capturing fails, the
    memory allocator still routing to the pool (it then holds memory back from reuse), and the
    generators the graph registered marked as capturing, so that they refuse to draw outside
    a capture. Only a capture that ends well marks them free again: one of an empty step, with
    the same generators.
    """
    torch.cuda.set_stream(before)
    with contextlib.suppress(RuntimeError):  # raised where the capture had ended after all
        torch._C._cuda_endAllocateToPool(device.index, pool)
    try:
        graph = torch.cuda.CUDAGraph()
        for generator in generators:
            graph.register_generator_state(generator)
        scratch = torch.zeros(1, device=device)
        with torch.cuda.graph(graph, capture_error_mode=MODE):
            scratch.add_(1)
    except Exception as undo:
        raise StreamV2VError(
            f"capturing a CUDA graph failed ({describe_failure(exc)}) and could not be undone "
            f"({describe_failure(undo)}): if random numbers on the GPU fail from now on, "
            "restart ComfyUI; set acceleration to 'off' to capture nothing"
        ) from exc
