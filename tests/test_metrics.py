"""Warp error and pixel consistency on synthetic videos whose true motion is known."""

import math
import sys

import cv2
import numpy as np
import pytest
import torch

from streamv2v import metrics
from streamv2v.errors import StreamV2VError

SIZE = 64


def texture(height: int, width: int, seed: int, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """Smooth random RGB texture in low..high: flow estimators need structure to lock onto."""
    rng = np.random.default_rng(seed)
    image = cv2.GaussianBlur(rng.random((height, width, 3)).astype(np.float32), (0, 0), 2.0)
    image = (image - image.min()) / (image.max() - image.min())
    return low + (high - low) * image


# Each frame is a window moving over a larger canvas, so content enters at the edges and
# nothing wraps around: frame t+1 at q shows what frame t shows at q + (DX, DY).
DX, DY = 3, 2
CANVAS = texture(SIZE + 40, SIZE + 40, seed=0)


def translating(count: int = 5) -> list[np.ndarray]:
    return [CANVAS[DY * t : DY * t + SIZE, DX * t : DX * t + SIZE] for t in range(count)]


class ExactTranslation:
    """The true flow of ``translating``, so warping can be checked without estimation error."""

    name = "exact"

    def __call__(self, first, second):
        backward = np.zeros((*first.shape[:2], 2), np.float32)
        backward[..., 0], backward[..., 1] = DX, DY
        return -backward, backward


def flicker(frames: list[np.ndarray], amount: float = 0.08) -> list[np.ndarray]:
    return [np.clip(f + (amount if i % 2 else 0.0), 0, 1) for i, f in enumerate(frames)]


def test_exactly_warped_translation_has_zero_error():
    frames = translating()
    result = metrics.warp_error(frames, frames, ExactTranslation())
    assert result.per_pair == pytest.approx([0.0] * 4, abs=1e-4)
    assert result.flow_method == "exact" and result.scale == "0..255"


@pytest.mark.parametrize("method", ["dis", "farneback"])
def test_estimated_flow_separates_consistent_from_flickering(method):
    frames = translating()
    steady = metrics.warp_error(frames, frames, method)
    flickering = metrics.warp_error(frames, flicker(frames), method)
    assert steady.mean < 1.0  # a fraction of one 8-bit level: flow is estimated, not exact
    # Brightness alternating by 0.08 (20.4 levels) shows up almost in full.
    assert flickering.mean > 15.0
    assert "DIS" in steady.flow_method if method == "dis" else "Farneback" in steady.flow_method
    assert len(steady.per_pair) == 4


def test_uint8_float_and_torch_frames_give_the_same_number():
    frames8 = [np.rint(f * 255).astype(np.uint8) for f in translating()]
    as_float = [f.astype(np.float32) / 255 for f in frames8]
    as_torch = [torch.from_numpy(f) for f in as_float]
    outputs8 = [np.rint(f * 255).astype(np.uint8) for f in flicker(as_float, 0.05)]
    results = [
        metrics.warp_error(frames8, outputs8).mean,
        metrics.warp_error(as_float, [o / 255.0 for o in outputs8]).mean,
        metrics.warp_error(as_torch, [torch.from_numpy(o) for o in outputs8]).mean,
    ]
    assert results == pytest.approx([results[0]] * 3, rel=1e-5)
    assert metrics.pixel_consistency(outputs8) == pytest.approx(
        metrics.pixel_consistency([o / 255.0 for o in outputs8]), rel=1e-5
    )


def test_inputs_and_outputs_are_read_once_from_generators():
    frames = translating()
    result = metrics.warp_error(iter(frames), (f for f in frames), ExactTranslation())
    assert len(result.per_pair) == 4


def test_pixel_consistency_is_mean_absolute_change_in_levels():
    base = np.full((8, 8, 3), 0.5, np.float32)
    frames = [base, base + 0.1, base + 0.1, base]
    assert metrics.pixel_consistency(frames) == pytest.approx((25.5 + 0 + 25.5) / 3, rel=1e-5)


def test_forward_backward_check_threshold():
    shape = (4, 6, 2)
    flow = np.zeros(shape, np.float32)
    flow[..., 0] = 2.0
    # |flow + reverse| against 0.01 * (|flow| + |reverse|) + 0.5, both sides around 0.53.
    just_inside = np.zeros(shape, np.float32)
    just_inside[..., 0] = -1.48  # mismatch 0.52 <= 0.01 * 3.48 + 0.5 = 0.5348
    just_outside = np.zeros(shape, np.float32)
    just_outside[..., 0] = -1.46  # mismatch 0.54 > 0.01 * 3.46 + 0.5 = 0.5346
    assert not metrics.occlusion_mask(flow, just_inside).any()
    assert metrics.occlusion_mask(flow, just_outside).all()
    assert not metrics.occlusion_mask(flow, -flow).any()


def test_flow_that_leaves_the_frame_is_masked():
    flow = np.zeros((4, 6, 2), np.float32)
    flow[..., 0] = 2.0
    outside = metrics.outside_mask(flow)
    assert outside[:, 4:].all() and not outside[:, :4].any()


def moving_square(t: int) -> np.ndarray:
    frame = texture(SIZE, SIZE, seed=1, high=0.3).copy()  # dark static background
    x = 16 + 4 * t
    frame[24:40, x : x + 16] = texture(16, 16, seed=2, low=0.7)  # bright square moving right
    return frame


def square_flows(t: int) -> tuple[np.ndarray, np.ndarray]:
    forward = np.zeros((SIZE, SIZE, 2), np.float32)
    backward = np.zeros((SIZE, SIZE, 2), np.float32)
    x = 16 + 4 * t
    forward[24:40, x : x + 16, 0] = 4
    backward[24:40, x + 4 : x + 20, 0] = -4
    return forward, backward


def test_occlusion_mask_excludes_uncovered_background():
    earlier, later = moving_square(0), moving_square(1)
    forward, backward = square_flows(0)
    pair = metrics.Correspondence.from_flows(forward, backward)
    # The strip the square left (columns 16..19) shows background frame 0 never saw.
    hidden = ~pair.valid
    assert hidden[24:40, 16:20].all()
    assert hidden.sum() == 16 * 4
    assert pair.error(earlier, later) == pytest.approx(0.0, abs=1e-4)
    inside = ~metrics.outside_mask(backward)
    warped = metrics.warp(earlier * 255, backward)
    unmasked = np.abs(warped - later * 255)[inside].mean()
    assert unmasked > 1.0  # the strip alone: 64 of 4096 pixels differing by ~0.4 * 255


def test_mismatched_inputs_are_refused():
    frames = translating()
    with pytest.raises(StreamV2VError, match="one output per input"):
        metrics.warp_error(frames, frames[:3], ExactTranslation())
    with pytest.raises(StreamV2VError, match="one output per input"):
        metrics.warp_error(frames[:3], frames, ExactTranslation())
    with pytest.raises(StreamV2VError, match="at least 2 frames"):
        metrics.warp_error(frames[:1], frames[:1])
    with pytest.raises(StreamV2VError, match="resize the outputs"):
        metrics.warp_error(frames, [f[:32] for f in frames], ExactTranslation())
    with pytest.raises(StreamV2VError, match="frames of one size"):
        metrics.warp_error([frames[0], frames[1][:32]], frames[:2], ExactTranslation())
    with pytest.raises(StreamV2VError, match="at least 2 frames"):
        metrics.pixel_consistency(frames[:1])


def test_flow_options_are_checked():
    with pytest.raises(StreamV2VError, match="unknown"):
        metrics.optical_flow("lucas-kanade")
    with pytest.raises(StreamV2VError, match="needs a local RAFT weights file"):
        metrics.optical_flow("raft")
    with pytest.raises(StreamV2VError, match="no effect with flow 'dis'"):
        metrics.optical_flow("dis", raft_weights="raft.pth")
    with pytest.raises(StreamV2VError, match="device has no effect"):
        metrics.optical_flow("farneback", device="cpu")
    with pytest.raises(StreamV2VError, match="is not a file"):
        metrics.optical_flow("raft", raft_weights="/nonexistent/raft_large.pth")


def test_raft_without_torchvision_says_so(tmp_path, monkeypatch):
    weights = tmp_path / "raft_large.pth"
    torch.save({}, weights)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision now fails
    with pytest.raises(StreamV2VError, match="needs torchvision"):
        metrics.optical_flow("raft", raft_weights=weights)


def test_consistency_report_says_what_was_measured_and_charts_each_pair():
    cut = metrics.WarpErrorResult.from_pairs([1.0, math.nan, 3.0], "DIS")
    report = metrics.ConsistencyReport(cut, 4.5, (64, 40), (128, 80))
    assert report.summary == (
        "warp error 2.00 (DIS); frame-to-frame difference 4.50; inputs resized from 64x40 to 128x80"
    )
    chart = np.asarray(report.plot())
    assert chart.shape == (160, 480, 3)
    line = (chart == metrics.LINE_COLOUR).all(axis=-1)
    # Pairs 0 and 2 are dots at the ends; the cut between them (pair 1) is not bridged.
    assert line[:, :50].any() and line[:, 460:].any() and not line[:, 50:460].any()
    single = metrics.ConsistencyReport(
        metrics.WarpErrorResult.from_pairs([2.0], "DIS"), 1, None, (8, 8)
    )
    assert (np.asarray(single.plot()) == metrics.LINE_COLOUR).all(axis=-1).any()
    assert "resized" not in single.summary
