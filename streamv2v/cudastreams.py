"""The CUDA streams the engine runs work on beside a device's compute stream: one per device
and purpose for the life of the process, never one per stream, capture or timing.

cuBLAS keeps a workspace (33 MiB on an H100) for every CUDA stream that has run a matrix
product, until the process ends, and PyTorch hands out 32 streams per device in turn. With a
new stream for each capture, every new StreamV2V left 66 MiB more behind (measured on an H100
80GB HBM3 across a dozen release-and-reload cycles: 132, 198, ..., 792 MiB), up to about 1 GiB
that neither releasing the model nor ``torch.cuda.empty_cache`` gives back.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def side_stream(device: torch.device, purpose: str) -> torch.cuda.Stream:
    """The stream for ``purpose`` ("bank updates", "warm-up", "copies") on ``device``."""
    return torch.cuda.Stream(device=device)
