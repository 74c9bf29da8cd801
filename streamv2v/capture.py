"""CUDA graph capture that shares the GPU with the rest of ComfyUI.

The live camera's stream captures its graphs on its own thread while ComfyUI may run another
workflow on the GPU. In CUDA's default (global) capture mode, another thread's memory
allocation or ``torch.cuda.empty_cache`` during a capture fails both the capture and the other
thread's call: on an H100, the engine's capture beside a thread that only allocated failed in
every case (docs/performance.md). Capturing in thread-local mode lets the other thread's work
through. A device-wide synchronize on another thread still spoils a capture in either mode,
and a capture that fails leaves PyTorch's default CUDA generator marked as capturing, so every
later ``torch.randn`` on that GPU in the process would fail until ComfyUI restarts; and leaves
the thread on the capture's stream. So a failed capture is undone, and tried again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from .errors import StreamV2VError, describe_failure

log = logging.getLogger(__name__)

CAPTURE_TRIES = 3
MODE = "thread_local"  # other threads' allocations and empty_cache may go on meanwhile


def capture_graph(
    body: Callable[[], None],
    *,
    pool: tuple[int, int] | None = None,
    stream: torch.cuda.Stream | None = None,
    generators: Sequence[torch.Generator] = (),
) -> torch.cuda.CUDAGraph:
    """Capture ``body`` into a new graph; a try spoiled by another thread is undone and retried.

    ``body`` runs once per try, captured, not executed, so it must change no state outside the
    GPU. ``generators`` (besides the default one) draw random numbers inside ``body``.
    """
    failures = []
    for _ in range(CAPTURE_TRIES):
        graph = torch.cuda.CUDAGraph()
        for generator in generators:
            graph.register_generator_state(generator)
        before = torch.cuda.current_stream()
        try:
            with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode=MODE):
                body()
        except Exception as exc:
            del graph
            _undo_failed_capture(before, generators)
            if not isinstance(exc, RuntimeError) or isinstance(exc, torch.cuda.OutOfMemoryError):
                raise  # not another thread's doing: trying again cannot help
            failures.append(describe_failure(exc))  # torch.AcceleratorError is a RuntimeError
            log.warning("capturing a CUDA graph failed, trying again: %s", failures[-1])
        else:
            return graph
    raise StreamV2VError(
        f"capturing the stream's CUDA graph failed {CAPTURE_TRIES} times (last: {failures[-1]}); "
        "another workflow may have been using the GPU at the same moment: run again, or set "
        "acceleration to 'off'"
    )


def _undo_failed_capture(before: torch.cuda.Stream, generators: Sequence[torch.Generator]) -> None:
    """Put back what a failed capture leaves behind: the thread's stream, and the generators.

    ``torch.cuda.graph`` leaves the thread on the capture's stream when capturing fails, and
    the generators the graph registered marked as capturing, so that they refuse to draw
    outside a capture. Only a capture that ends well marks them free again: one of an empty
    step, with the same generators.
    """
    torch.cuda.set_stream(before)
    graph = torch.cuda.CUDAGraph()
    for generator in generators:
        graph.register_generator_state(generator)
    scratch = torch.zeros(1, device=before.device)
    with torch.cuda.graph(graph, capture_error_mode=MODE):
        scratch.add_(1)
