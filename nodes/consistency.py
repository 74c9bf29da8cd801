"""Temporal Consistency: the paper's warp error of a restyled video, with a plot per frame."""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..streamv2v.errors import StreamV2VError
from ..streamv2v.frames import resize
from ..streamv2v.metrics import pixel_consistency, warp_error

if TYPE_CHECKING:
    from PIL import Image

PLOT_SIZE = (480, 160)


def plot(per_pair: list[float], title: str) -> Image.Image:
    """A small line chart of the error per frame pair (PIL only: no plotting dependency)."""
    from PIL import Image, ImageDraw

    width, height = PLOT_SIZE
    left, right, top, bottom = 40, 10, 22, 18
    image = Image.new("RGB", PLOT_SIZE, (24, 24, 28))
    draw = ImageDraw.Draw(image)
    draw.text((left, 4), title, fill=(230, 230, 230))
    values = [v for v in per_pair if math.isfinite(v)]
    top_value = max(values, default=1.0) or 1.0
    x0, x1, y0, y1 = left, width - right, height - bottom, top
    draw.line([(x0, y1), (x0, y0), (x1, y0)], fill=(120, 120, 130))
    draw.text((4, y1 - 4), f"{top_value:.1f}", fill=(170, 170, 170))
    draw.text((4, y0 - 10), "0", fill=(170, 170, 170))
    draw.text((x1 - 60, y0 + 3), f"{len(per_pair)} pairs", fill=(170, 170, 170))
    span = max(len(per_pair) - 1, 1)
    points = [
        (x0 + (x1 - x0) * i / span, y0 - (y0 - y1) * v / top_value)
        for i, v in enumerate(per_pair)
        if math.isfinite(v)
    ]
    if len(points) > 1:
        draw.line(points, fill=(90, 200, 255), width=2)
    elif points:
        draw.ellipse(
            [points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2],
            fill=(90, 200, 255),
        )
    return image


class StreamV2VTemporalConsistency:
    DESCRIPTION = (
        "Measures flicker the way the StreamV2V paper does: optical flow on the input video "
        "carries each output frame onto the next, and the warp error is the mean difference "
        "over pixels the flow can follow (0..255 levels; lower is steadier). Also gives the "
        "plain frame-to-frame difference of the outputs."
    )
    CATEGORY = "StreamV2V"
    FUNCTION = "measure"
    OUTPUT_NODE = True
    RETURN_TYPES = ("FLOAT", "FLOAT")
    RETURN_NAMES = ("warp_error", "pixel_difference")
    OUTPUT_TOOLTIPS = (
        "Mean warp error over frame pairs, in 0..255 levels.",
        "Mean absolute difference of consecutive output frames, no flow, 0..255 levels.",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "input_images": ("IMAGE", {"tooltip": "The original video frames."}),
                "output_images": (
                    "IMAGE",
                    {
                        "tooltip": "The restyled frames, one per input frame (at another size, the "
                        "inputs are resized to it)."
                    },
                ),
                "flow": (
                    ["dis", "farneback"],
                    {"tooltip": "OpenCV optical flow on the input: DIS (default) or Farnebäck."},
                ),
            }
        }

    def measure(self, input_images: torch.Tensor, output_images: torch.Tensor, flow: str) -> dict:
        import folder_paths

        if len(input_images) != len(output_images):
            raise StreamV2VError(
                f"input_images has {len(input_images)} frames and output_images "
                f"{len(output_images)}: connect the sampler's input and output of one run"
            )
        if len(input_images) < 2:
            raise StreamV2VError(
                "the warp error compares consecutive frames: connect at least 2 frames"
            )
        (_, h, w, _), (_, oh, ow, _) = input_images.shape, output_images.shape
        resized = (h, w) != (oh, ow)
        if resized:  # the sampler's width/height scaled the video: follow it at that size
            input_images = resize(input_images.movedim(-1, 1), ow, oh).movedim(1, -1).clamp(0, 1)
        note = f"; inputs resized from {w}x{h} to {ow}x{oh}" if resized else ""
        result = warp_error(input_images, output_images, flow)
        difference = pixel_consistency(output_images)
        title = f"warp error {result.mean:.2f} ({result.flow_method})"
        name = f"streamv2v_consistency_{uuid.uuid4().hex[:12]}.png"
        plot(result.per_pair, title).save(Path(folder_paths.get_temp_directory()) / name)
        return {
            "ui": {
                "images": [{"filename": name, "subfolder": "", "type": "temp"}],
                "text": [f"{title}; frame-to-frame difference {difference:.2f}{note}"],
            },
            "result": (result.mean, difference),
        }
