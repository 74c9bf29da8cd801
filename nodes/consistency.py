"""Temporal Consistency: the paper's warp error of a restyled video, with a plot per frame."""

from __future__ import annotations

import uuid
from pathlib import Path

import torch

from ..streamv2v.errors import StreamV2VError
from ..streamv2v.metrics import consistency_report


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
        report = consistency_report(input_images, output_images, flow)
        name = f"streamv2v_consistency_{uuid.uuid4().hex[:12]}.png"
        report.plot().save(Path(folder_paths.get_temp_directory()) / name)
        return {
            "ui": {
                "images": [{"filename": name, "subfolder": "", "type": "temp"}],
                "text": [report.summary],
            },
            "result": (report.warp.mean, report.difference),
        }
