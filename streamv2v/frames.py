"""Frames in whatever form users have them, into the form the model needs, and back.

Video decoders give uint8 RGB, ComfyUI gives float RGB, webcams and PNGs can carry alpha or be
grey. Everything becomes float RGB in 0..1 here, once, so the stream deals with one format.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .errors import StreamV2VError

LATENT_FACTOR = 8  # the VAE downsamples by 8: processing sizes are multiples of it
# The largest value a float frame may hold: 0..1 with room for the overshoot of a sharpening
# or bicubic resize upstream.
FLOAT_MAX = 1.5


def to_rgb(frame: np.ndarray | torch.Tensor, what: str = "frame") -> torch.Tensor:
    """A ``[H, W, 3]`` float32 tensor in 0..1 from uint8/float, grey/RGB/RGBA input.

    Alpha is dropped (as PIL's ``convert("RGB")`` does) and grey is repeated to three
    channels, so stills from any source can enter a stream.
    """
    if isinstance(frame, np.ndarray):
        frame = torch.from_numpy(np.ascontiguousarray(frame))
    if not isinstance(frame, torch.Tensor):
        raise StreamV2VError(
            f"{what} must be an image array (numpy or torch), got {type(frame).__name__}"
        )
    if frame.ndim == 2:
        frame = frame.unsqueeze(-1)
    if frame.ndim != 3 or frame.shape[-1] not in (1, 3, 4):
        raise StreamV2VError(
            f"{what} has shape {tuple(frame.shape)}: expected height x width x channels "
            "with 1 (grey), 3 (RGB) or 4 (RGBA) channels"
        )
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise StreamV2VError(f"{what} is empty ({tuple(frame.shape)}): give a non-empty image")
    if frame.dtype == torch.uint8:
        frame = frame.to(torch.float32) / 255.0
    elif frame.is_floating_point():
        frame = frame.to(torch.float32)
        # 0..255 floats (OpenCV or PIL through numpy) would come out a white blur. Checked on
        # the CPU only, where reading a value back costs no wait for a GPU.
        if frame.device.type == "cpu" and (peak := float(frame.max())) > FLOAT_MAX:
            raise StreamV2VError(
                f"{what} is a float image with values up to {peak:.4g}: float frames are 0..1, "
                "so divide 0..255 values by 255 (or pass uint8)"
            )
    else:
        raise StreamV2VError(f"{what} has dtype {frame.dtype}: use uint8 (0..255) or float (0..1)")
    if frame.shape[-1] == 1:
        frame = frame.expand(-1, -1, 3)
    elif frame.shape[-1] == 4:
        frame = frame[..., :3]
    return frame


def to_uint8(frame: np.ndarray | torch.Tensor, what: str = "frame") -> np.ndarray:
    """A ``[H, W, 3]`` uint8 array on the host, what encoders (video, JPEG) take."""
    if isinstance(frame, np.ndarray) and frame.dtype == np.uint8 and frame.shape[2:] == (3,):
        return np.ascontiguousarray(frame)
    rgb = to_rgb(frame, what).detach()
    return (rgb.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


MAX_SIDE = 4096  # the largest width or height a stream takes


def output_size(
    width: int | None, height: int | None, input_width: int, input_height: int
) -> tuple[int, int]:
    """The size to return frames at: the input's where neither side is given, and the missing
    side from the input's aspect ratio where one is, so frames are scaled, never stretched."""
    if width is None and height is None:
        return input_width, input_height
    if width is None:
        width = max(1, round(height * input_width / input_height))
        computed, given = ("width", width), ("height", height)
    elif height is None:
        height = max(1, round(width * input_height / input_width))
        computed, given = ("height", height), ("width", width)
    else:
        return width, height
    if computed[1] > MAX_SIDE:
        raise StreamV2VError(
            f"{given[0]} {given[1]} on {input_width}x{input_height} frames makes them "
            f"{computed[1]} pixels {'wide' if computed[0] == 'width' else 'high'}, over "
            f"{MAX_SIDE}: give the {computed[0]} too"
        )
    return width, height


def processing_size(width: int, height: int) -> tuple[int, int]:
    """The nearest size the VAE accepts (multiples of 8, at least 8) for a frame size."""

    def snap(x: int) -> int:
        return max(LATENT_FACTOR, int(round(x / LATENT_FACTOR)) * LATENT_FACTOR)

    return snap(width), snap(height)


def resize(images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Resize ``[B, C, H, W]`` images; a no-op when the size already matches."""
    if images.shape[-2:] == (height, width):
        return images
    return F.interpolate(
        images, size=(height, width), mode="bilinear", align_corners=False, antialias=True
    )
