"""How consistent a restyled video is over time: warp error and raw frame-to-frame change.

A restyled video may change between frames only where the input moved. The warp error (Lai
et al. 2018, the paper's Table 2) measures the rest: optical flow is computed on the *input*
video, output frame t is warped onto frame t+1 along it, and the mean absolute difference to
output frame t+1 is taken over the pixels both frames see. Flow comes from the *input* so a
method cannot look consistent by blurring its own output.

Conventions, chosen to match the authors' ``tools/warp_error.py`` where it is well defined:

- Direction: output t is carried to t+1 by backward warping with the backward flow b
  (t+1 -> t): ``warped(q) = out_t(q + b(q))``, bilinear, compared with ``out_{t+1}(q)``.
- Scale: 8-bit pixel levels, 0..255, averaged over pixels and the three RGB channels, then
  over frame pairs. Frames may come as float 0..1 or uint8; both give the same number.
- Occlusion: forward-backward check with UnFlow's constants as the authors write it,
  ``|b + f(q + b)| > 0.01 (|b| + |f|) + 0.5``, evaluated on frame t+1's grid, the grid where
  the comparison happens. (The authors' tool applies the mask computed on frame t's grid to
  the t+1 image; for small motion the two nearly coincide.)
- Border: pixels whose flow points outside frame t are left out too; the authors' tool
  compares them with black unless the occlusion check happens to catch them.
- Arithmetic: true absolute differences. The authors' tool subtracts two uint8 arrays, so a
  negative difference d wraps to 256 - d; their absolute numbers (73.4, 85.2) are inflated
  by that and are not comparable with ours, while rankings within one run are.

Flow defaults to OpenCV's DIS (no weights to download); Farnebäck is the other built-in, and
RAFT runs only from a torchvision weights file the user already has on disk.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import pairwise, zip_longest
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from .errors import StreamV2VError, one_line
from .frames import resize, to_rgb

if TYPE_CHECKING:
    from PIL import Image

SCALE = "0..255"
FLOW_METHODS = ("dis", "farneback", "raft")
# Forward-backward consistency constants of UnFlow (Meister et al. 2018), as the authors use.
FB_ALPHA = 0.01
FB_BETA = 0.5
RAFT_STRIDE = 8  # RAFT's feature maps are 1/8 of the image: sides must be multiples of 8
RAFT_MIN_SIDE = 128  # its correlation pyramid halves 1/8-size maps thrice more
PLOT_SIZE = (480, 160)
LINE_COLOUR = (90, 200, 255)

Frame = np.ndarray | torch.Tensor


class FlowEstimator(Protocol):
    """Optical flow between two frames, both ways.

    Frames are ``[H, W, 3]`` float32 RGB in 0..255. Flows are ``[H, W, 2]`` float32 pixel
    offsets ``(dx, dy)`` with ``first(y, x) ~ second(y + dy, x + dx)`` for the forward flow,
    and the same from ``second`` to ``first`` for the backward one.
    """

    name: str

    def __call__(self, first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def _cv2():
    try:
        import cv2
    except ImportError:
        raise StreamV2VError(
            "optical flow needs OpenCV, which is not installed: pip install opencv-python-headless"
        ) from None
    return cv2


def _levels(frame: Frame, what: str) -> np.ndarray:
    """``[H, W, 3]`` float32 in 0..255 from any frame the engine accepts."""
    return to_rgb(frame, what).cpu().numpy() * np.float32(255)


class OpenCVFlow:
    """DIS (fast, robust, the default) or Farnebäck, on grey 8-bit frames."""

    def __init__(self, method: str = "dis") -> None:
        cv2 = _cv2()
        self._cv2 = cv2
        self.method = method
        if method == "dis":
            self._dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
            self.name = f"OpenCV {cv2.__version__} DIS (medium preset)"
        elif method == "farneback":
            self.name = f"OpenCV {cv2.__version__} Farneback"
        else:
            raise StreamV2VError(
                f"OpenCV flow method {method!r} is unknown: use 'dis' or 'farneback'"
            )

    def _grey(self, levels: np.ndarray) -> np.ndarray:
        image = np.clip(np.rint(levels), 0, 255).astype(np.uint8)
        return self._cv2.cvtColor(image, self._cv2.COLOR_RGB2GRAY)

    def _flow(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if self.method == "dis":
            try:
                return self._dis.calc(a, b, None)
            except self._cv2.error:  # its 8-pixel patches do not fit frames of a few pixels
                h, w = a.shape[:2]
                raise StreamV2VError(
                    f"DIS optical flow cannot follow frames as small as {w}x{h}: use flow "
                    "'farneback' or larger frames"
                ) from None
        # OpenCV's documented example settings: 3 levels of halving, 15 px windows.
        return self._cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)

    def __call__(self, first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a, b = self._grey(first), self._grey(second)
        return self._flow(a, b), self._flow(b, a)


class RaftFlow:
    """torchvision's RAFT (large or small, told apart by the weights) from a local file only.

    ``weights=None`` in torchvision's builders means "random", so nothing is ever downloaded;
    the user's state dict then replaces the random weights.
    """

    def __init__(self, weights: str | Path, device: str | torch.device | None = None) -> None:
        from .loading import resolve_device

        path = Path(weights).expanduser()
        if not path.is_file():
            raise StreamV2VError(
                f"RAFT weights {str(path)!r} is not a file: give the path of a torchvision "
                "RAFT state dict (e.g. raft_large_C_T_SKHT_V2-ff5fadd5.pth), or use flow 'dis'"
            )
        try:
            from torchvision.models.optical_flow import raft_large, raft_small
        except ImportError:
            raise StreamV2VError(
                "RAFT flow needs torchvision, which is not installed: install the torchvision "
                "release that matches your torch, or use flow 'dis'"
            ) from None
        self.device = resolve_device(device)
        state = _load_state_dict(path)
        for build in (raft_large, raft_small):
            model = build(weights=None, progress=False)
            try:
                model.load_state_dict(state)
            except RuntimeError:
                continue
            break
        else:
            raise StreamV2VError(
                f"RAFT weights {path.name!r} fit neither torchvision's raft_large nor raft_small: "
                "give a torchvision RAFT state dict, or use flow 'dis'"
            )
        self.model = model.eval().to(self.device)
        self.name = f"torchvision {build.__name__} ({path.name}) on {self.device}"

    def __call__(self, first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch.nn.functional as F

        h, w = first.shape[:2]
        if min(h, w) < RAFT_MIN_SIDE:
            raise StreamV2VError(
                f"RAFT needs frames of at least {RAFT_MIN_SIDE}x{RAFT_MIN_SIDE}, these are "
                f"{w}x{h}: use flow 'dis' for small videos"
            )
        pairs = torch.from_numpy(np.stack([first, second])).permute(0, 3, 1, 2)
        pairs = pairs.to(self.device) / 127.5 - 1  # RAFT takes -1..1
        pad_w, pad_h = -w % RAFT_STRIDE, -h % RAFT_STRIDE
        pairs = F.pad(pairs, (0, pad_w, 0, pad_h), mode="replicate")
        with torch.inference_mode():
            flows = self.model(pairs, pairs.flip(0))[-1]
        flows = flows[:, :, :h, :w].permute(0, 2, 3, 1).float().cpu().numpy()
        return flows[0], flows[1]


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and safetensors each raise their own types
        raise StreamV2VError(
            f"RAFT weights {path.name!r} could not be read ({one_line(exc)}): "
            "give a torchvision RAFT state dict (.pth or .safetensors)"
        ) from None


def optical_flow(
    method: str = "dis",
    *,
    raft_weights: str | Path | None = None,
    device: str | torch.device | None = None,
) -> FlowEstimator:
    """The flow estimator for a method name; RAFT needs ``raft_weights`` (a local file)."""
    if method not in FLOW_METHODS:
        raise StreamV2VError(
            f"flow method {method!r} is unknown: use one of {', '.join(FLOW_METHODS)}"
        )
    if method == "raft":
        if raft_weights is None:
            raise StreamV2VError(
                "flow 'raft' needs a local RAFT weights file (nothing is downloaded): give "
                "its path, or use flow 'dis'"
            )
        return RaftFlow(raft_weights, device)
    if raft_weights is not None:
        raise StreamV2VError(
            f"RAFT weights have no effect with flow {method!r}: use flow 'raft' or leave them out"
        )
    if device is not None:
        raise StreamV2VError(
            f"a device has no effect with flow {method!r}, which runs in OpenCV on the CPU: "
            "leave it out"
        )
    return OpenCVFlow(method)


def warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """``image`` sampled at ``q + flow(q)`` for every pixel q (bilinear; pixel centres at
    whole coordinates, as OpenCV's flow uses them). Pulling along the backward flow carries
    frame t onto frame t+1's grid."""
    cv2 = _cv2()
    h, w = flow.shape[:2]
    grid_x, grid_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    map_x = grid_x + flow[..., 0]
    map_y = grid_y + flow[..., 1]
    # Outside samples are masked by the caller; replicate keeps edge samples from mixing in 0s.
    return cv2.remap(
        np.ascontiguousarray(image, dtype=np.float32),
        map_x,
        map_y,
        cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )


def outside_mask(flow: np.ndarray) -> np.ndarray:
    """Pixels whose flow points outside the image: nothing there to compare with."""
    h, w = flow.shape[:2]
    x = np.arange(w, dtype=np.float32)[None, :] + flow[..., 0]
    y = np.arange(h, dtype=np.float32)[:, None] + flow[..., 1]
    return (x < 0) | (x > w - 1) | (y < 0) | (y > h - 1)


def occlusion_mask(
    flow: np.ndarray, reverse: np.ndarray, alpha: float = FB_ALPHA, beta: float = FB_BETA
) -> np.ndarray:
    """Pixels of ``flow``'s grid where going there and back does not return:
    ``|flow + reverse(q + flow)| > alpha (|flow| + |reverse|) + beta`` (magnitudes unwarped,
    as the authors compute them). Such pixels are hidden in the other frame."""
    back = warp(reverse, flow)
    mismatch = np.linalg.norm(flow + back, axis=-1)
    magnitude = np.linalg.norm(flow, axis=-1) + np.linalg.norm(reverse, axis=-1)
    return mismatch > alpha * magnitude + beta


@dataclass(frozen=True)
class Correspondence:
    """How output frame t lands on frame t+1, from the input's flow, reusable across outputs.

    ``backward`` is the flow t+1 -> t; ``valid`` marks the pixels of frame t+1 that frame t
    also sees (not occluded, not from outside the frame).
    """

    backward: np.ndarray
    valid: np.ndarray

    @classmethod
    def from_flows(cls, forward: np.ndarray, backward: np.ndarray) -> Correspondence:
        hidden = occlusion_mask(backward, forward) | outside_mask(backward)
        return cls(backward, ~hidden)

    def error(self, earlier: Frame, later: Frame) -> float:
        """Mean |warped earlier - later| in 0..255 levels over valid pixels (NaN if none)."""
        a, b = _levels(earlier, "earlier output frame"), _levels(later, "later output frame")
        if a.shape != b.shape or a.shape[:2] != self.valid.shape:
            h, w = self.valid.shape
            raise StreamV2VError(
                f"output frames are {a.shape[1]}x{a.shape[0]} and {b.shape[1]}x{b.shape[0]} "
                f"but the input's flow is {w}x{h}: resize the outputs to the input's size"
            )
        if not self.valid.any():
            return math.nan
        return float(np.abs(warp(a, self.backward) - b)[self.valid].mean())


def _flow_estimator(
    flow: str | FlowEstimator, raft_weights: str | Path | None, device: str | torch.device | None
) -> FlowEstimator:
    if isinstance(flow, str):
        return optical_flow(flow, raft_weights=raft_weights, device=device)
    if raft_weights is not None or device is not None:
        raise StreamV2VError(
            "raft_weights and device only configure a named flow method: give flow='raft', "
            "or configure your own flow estimator yourself"
        )
    return flow


def correspondences(
    inputs: Iterable[Frame], flow: str | FlowEstimator = "dis"
) -> Iterator[Correspondence]:
    """One ``Correspondence`` per consecutive pair of input frames, holding two frames at most."""
    estimator = _flow_estimator(flow, None, None)
    previous: np.ndarray | None = None
    for index, frame in enumerate(inputs):
        current = _levels(frame, f"input frame {index}")
        if previous is not None:
            if current.shape != previous.shape:
                raise StreamV2VError(
                    f"input frame {index} is {current.shape[1]}x{current.shape[0]} but earlier "
                    f"frames are {previous.shape[1]}x{previous.shape[0]}: give frames of one size"
                )
            yield Correspondence.from_flows(*estimator(previous, current))
        previous = current


@dataclass(frozen=True)
class WarpErrorResult:
    """The warp error of a video (lower is more consistent) and how it was measured.

    ``per_pair[i]`` compares output frames i and i+1; it is NaN when no pixel of the pair
    survives the masks (a cut), and such pairs are left out of ``mean`` (NaN if all are).
    """

    mean: float
    per_pair: list[float]
    flow_method: str
    scale: str = SCALE

    @classmethod
    def from_pairs(cls, per_pair: list[float], flow_method: str) -> WarpErrorResult:
        return cls(mean_of_pairs(per_pair), list(per_pair), flow_method)


def mean_of_pairs(per_pair: list[float]) -> float:
    """The mean over pairs that could be measured (not NaN); NaN if none could."""
    finite = [e for e in per_pair if not math.isnan(e)]
    return sum(finite) / len(finite) if finite else math.nan


def warp_error(
    inputs: Iterable[Frame],
    outputs: Iterable[Frame],
    flow: str | FlowEstimator = "dis",
    *,
    raft_weights: str | Path | None = None,
    device: str | torch.device | None = None,
) -> WarpErrorResult:
    """Warp error of ``outputs`` (translations of ``inputs``, frame for frame), in 0..255 levels.

    Frames are ``[H, W, 3]`` (or grey/RGBA) uint8 or float 0..1, numpy or torch; both
    sequences are read once, side by side, so they may be generators over a long video.
    ``flow`` names a method (``dis``, ``farneback``, ``raft`` with ``raft_weights``) or is a
    ``FlowEstimator``.
    """
    estimator = _flow_estimator(flow, raft_weights, device)
    per_pair: list[float] = []
    for pair, outs in zip_longest(correspondences(inputs, estimator), pairwise(outputs)):
        if pair is None or outs is None:
            raise StreamV2VError(
                f"warp error needs one output per input, but after {len(per_pair) + 1} frames "
                f"only the {'outputs' if pair is None else 'inputs'} go on: give sequences of "
                "equal length"
            )
        per_pair.append(pair.error(*outs))
    if not per_pair:
        raise StreamV2VError("warp error needs at least 2 frames: give a longer video")
    return WarpErrorResult.from_pairs(per_pair, estimator.name)


def frame_difference(earlier: Frame, later: Frame) -> float:
    """Mean absolute difference of two frames in 0..255 levels, with no flow involved."""
    a, b = _levels(earlier, "earlier frame"), _levels(later, "later frame")
    if a.shape != b.shape:
        raise StreamV2VError(
            f"frames are {a.shape[1]}x{a.shape[0]} and {b.shape[1]}x{b.shape[0]}: give frames "
            "of one size"
        )
    return float(np.abs(a - b).mean())


def pixel_consistency(frames: Iterable[Frame]) -> float:
    """Mean ``frame_difference`` of consecutive frames, in 0..255 levels.

    It needs no flow, so any two runs over the same input can be compared with it; it counts
    motion as change too, so only runs over the same input are comparable.
    """
    differences = [frame_difference(a, b) for a, b in pairwise(frames)]
    if not differences:
        raise StreamV2VError("pixel consistency needs at least 2 frames: give a longer video")
    return sum(differences) / len(differences)


@dataclass(frozen=True)
class ConsistencyReport:
    """A restyled clip's warp error and plain frame-to-frame change, as one report: what a
    front end shows of a run (a line of text and a chart per frame pair)."""

    warp: WarpErrorResult
    difference: float
    # The inputs' (width, height) when they were scaled to the outputs' size, else None.
    resized_from: tuple[int, int] | None
    size: tuple[int, int]

    @property
    def title(self) -> str:
        return f"warp error {self.warp.mean:.2f} ({self.warp.flow_method})"

    @property
    def summary(self) -> str:
        text = f"{self.title}; frame-to-frame difference {self.difference:.2f}"
        if self.resized_from is not None:
            (w, h), (ow, oh) = self.resized_from, self.size
            text += f"; inputs resized from {w}x{h} to {ow}x{oh}"
        return text

    def plot(self) -> Image.Image:
        """A small line chart of the error per frame pair (PIL only: no plotting dependency)."""
        from PIL import Image, ImageDraw

        per_pair = self.warp.per_pair
        width, height = PLOT_SIZE
        left, right, top, bottom = 40, 10, 22, 18
        image = Image.new("RGB", PLOT_SIZE, (24, 24, 28))
        draw = ImageDraw.Draw(image)
        draw.text((left, 4), self.title, fill=(230, 230, 230))
        values = [v for v in per_pair if math.isfinite(v)]
        top_value = max(values, default=1.0) or 1.0
        x0, x1, y0, y1 = left, width - right, height - bottom, top
        draw.line([(x0, y1), (x0, y0), (x1, y0)], fill=(120, 120, 130))
        draw.text((4, y1 - 4), f"{top_value:.1f}", fill=(170, 170, 170))
        draw.text((4, y0 - 10), "0", fill=(170, 170, 170))
        draw.text((x1 - 60, y0 + 3), f"{len(per_pair)} pairs", fill=(170, 170, 170))
        span = max(len(per_pair) - 1, 1)
        runs: list[list[tuple[float, float]]] = [[]]  # a cut (NaN) breaks the line
        for i, v in enumerate(per_pair):
            if not math.isfinite(v):
                runs.append([])
                continue
            runs[-1].append((x0 + (x1 - x0) * i / span, y0 - (y0 - y1) * v / top_value))
        for points in runs:
            if len(points) > 1:
                draw.line(points, fill=LINE_COLOUR, width=2)
            elif points:
                (x, y), r = points[0], 2
                draw.ellipse([x - r, y - r, x + r, y + r], fill=LINE_COLOUR)
        return image


def consistency_report(
    inputs: torch.Tensor, outputs: torch.Tensor, flow: str = "dis"
) -> ConsistencyReport:
    """Warp error and frame-to-frame difference of ``outputs``, ``[N, H, W, 3]`` float 0..1
    as ComfyUI passes images. Inputs of another size are scaled to the outputs' first: a
    sampler's width/height scales the video, and flow must be measured where it is applied."""
    (_, h, w, _), (_, oh, ow, _) = inputs.shape, outputs.shape
    resized_from = None
    if (h, w) != (oh, ow):
        inputs = resize(inputs.movedim(-1, 1), ow, oh).movedim(1, -1).clamp(0, 1)
        resized_from = (w, h)
    return ConsistencyReport(
        warp_error(inputs, outputs, flow), pixel_consistency(outputs), resized_from, (ow, oh)
    )
