"""The similar-frame filter from StreamDiffusion: skip frames that barely changed.

A static camera produces near-identical frames; denoising them again costs a UNet call and
adds nothing. The skip is probabilistic (certain only as similarity reaches 1) so slow drifts
still get processed now and then, and capped so a stream never freezes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SimilarFrameFilter:
    """A stream's filter; its threshold and ``max_skip`` come checked by ``StreamConfig``,
    where they enter."""

    def __init__(self, threshold: float, max_skip: int, generator: torch.Generator) -> None:
        self.threshold = threshold
        self.max_skip = max_skip
        self.generator = generator
        self.previous: torch.Tensor | None = None
        self.skipped_in_a_row = 0

    def skip_probability(self, similarity: float) -> float:
        """0 below the threshold, rising linearly to 1 at identical frames."""
        return max(0.0, 1.0 - (1.0 - similarity) / (1.0 - self.threshold))

    def should_skip(self, frame: torch.Tensor) -> bool:
        """Decide for ``frame`` (the model input); remembers it when it is processed."""
        if self.previous is not None and self.skipped_in_a_row < self.max_skip:
            similarity = F.cosine_similarity(
                self.previous.reshape(-1).float(), frame.reshape(-1).float(), dim=0, eps=1e-6
            ).item()
            draw = torch.rand((), generator=self.generator).item()
            if draw < self.skip_probability(similarity):
                self.skipped_in_a_row += 1
                return True
        self.previous = frame.detach().clone()
        self.skipped_in_a_row = 0
        return False
