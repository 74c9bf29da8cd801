"""``python -m streamv2v.ablate INPUT --model PATH --prompt TEXT``: the paper's bank ablation.

The paper's Table 2 compares no bank, FIFO queues of 1, 2 and 4 past frames, and dynamic
merging (DyMe) on speed, memory and temporal consistency, on an A100. This command runs the
same five configurations over the user's own video, model and GPU, so the trade-off can be
judged where it will be used. Everything that can be wrong with the arguments is found
before the slow model load, and mistakes end the run with one line on stderr.

The input frames (at most ``--max-frames``) and their optical flow are held in memory so
that all five runs see exactly the same frames and the flow is computed once.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from itertools import islice
from typing import TYPE_CHECKING

from .cli import add_denoising_arguments, add_model_arguments, run_command
from .errors import StreamV2VError
from .modes import DEFAULT_ACCEL

if TYPE_CHECKING:
    import numpy as np
    import torch

    from .loading import StreamModel
    from .metrics import Correspondence
    from .stream import StreamConfig, StreamV2V

PROG = "streamv2v.ablate"
# The paper's rows: (label, bank kind, bank size).
CONFIGURATIONS = (
    ("no bank", "none", None),
    ("queue(1)", "queue", 1),
    ("queue(2)", "queue", 2),
    ("queue(4)", "queue", 4),
    ("DyMe(1)", "dyme", 1),
)

DESCRIPTION = """\
Run one video through the paper's feature-bank ablation (Table 2): no bank, a queue of the
last 1, 2 and 4 bank updates, and DyMe, with the same model, prompt and seed. Prints per
configuration: ms per frame (after --warmup frames); peak GPU memory (CUDA only, the model's
weights included as in the paper); the warp error (output frame t carried to t+1 along the
input's optical flow, mean absolute difference over the pixels both frames see, in 0..255
levels); and the raw frame-to-frame difference of the output. Lower is more consistent."""


EPILOG = """\
example:
  python -m streamv2v.ablate clip.mp4 --prompt "a watercolor painting" \\
    --model models/checkpoints/DreamShaper_8_pruned.safetensors \\
    --lcm-lora models/loras/lcm-lora-sdv1-5.safetensors --vae models/vae_approx \\
    --width 512 --height 512

The paper's warp errors (73.4 to 85.2) come from the authors' tool, which subtracts 8-bit
frames without widening them, so negative differences wrap around to 256 - d; compare the
rows of one run with each other, not with the paper's absolute values."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m {PROG}",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", metavar="INPUT", help="the video to run the ablation on")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")

    add_model_arguments(parser)

    add_denoising_arguments(parser.add_argument_group("denoising"))

    video = parser.add_argument_group("video and measurement")
    video.add_argument(
        "--width",
        type=int,
        metavar="PX",
        help="resize the input to this width first (the paper: 512); with only --height, "
        "the input's aspect ratio",
    )
    video.add_argument(
        "--height",
        type=int,
        metavar="PX",
        help="resize the input to this height first; with only --width, the input's aspect ratio",
    )
    video.add_argument(
        "--max-frames",
        type=int,
        default=100,
        metavar="N",
        help="use the first N frames; they and their flow are held in memory (default 100)",
    )
    video.add_argument(
        "--warmup",
        type=int,
        default=4,
        metavar="N",
        help="leave the first N output frames out of ms/frame (default 4)",
    )
    video.add_argument(
        "--flow",
        choices=("dis", "farneback", "raft"),
        help="optical flow for the warp error: OpenCV's DIS or Farneback, or RAFT from "
        "--raft-weights (default: raft with --raft-weights, else dis)",
    )
    video.add_argument(
        "--raft-weights",
        metavar="PATH",
        help="a torchvision RAFT state dict on disk (needs torchvision; nothing is downloaded)",
    )
    return parser


@dataclass
class Row:
    """One configuration's measurements; ``None`` where it could not be measured."""

    bank: str
    kind: str
    size: int | None
    ms_per_frame: float | None
    peak_memory_gib: float | None
    warp_error: float | None
    pixel_consistency: float | None
    error: str | None = None


def _say(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _check_counts(args: argparse.Namespace) -> None:
    if args.max_frames < 2:
        raise StreamV2VError(
            f"--max-frames {args.max_frames}: the warp error compares consecutive frames, "
            "give at least 2"
        )
    if args.warmup < 0:
        raise StreamV2VError(f"--warmup {args.warmup}: give 0 or more frames")
    if args.warmup >= args.max_frames:
        raise StreamV2VError(
            f"--warmup {args.warmup} leaves no timed frame of --max-frames {args.max_frames}: "
            "lower --warmup or raise --max-frames"
        )


def _read_frames(args: argparse.Namespace) -> tuple[list[np.ndarray], str]:
    """The first --max-frames frames as uint8 arrays, resized to --width/--height if given."""
    import torch

    from .frames import output_size, resize, to_rgb
    from .video import VideoReader

    with VideoReader(args.input) as reader:
        resizing = args.width is not None or args.height is not None
        width, height = output_size(args.width, args.height, reader.width, reader.height)
        frames = list(islice(reader, args.max_frames))
        described = f"{reader.path.name}, {reader.width}x{reader.height}"
    if len(frames) <= args.warmup:
        raise StreamV2VError(
            f"input video {args.input} has {len(frames)} frames, not more than --warmup "
            f"{args.warmup}: give a longer video or lower --warmup"
        )
    if len(frames) < 2:
        raise StreamV2VError(
            f"input video {args.input} has 1 frame: the warp error compares consecutive "
            "frames, give a video with at least 2"
        )
    if resizing:
        resized = []
        for frame in frames:
            image = resize(to_rgb(frame).permute(2, 0, 1).unsqueeze(0), width, height)
            image = (image[0].permute(1, 2, 0) * 255).round().clamp(0, 255)
            resized.append(image.to(torch.uint8).numpy())
        frames = resized
        described += f" resized to {width}x{height}"
    return frames, described


def _timed(
    outputs: Iterator[torch.Tensor], device: torch.device
) -> Iterator[tuple[float, torch.Tensor]]:
    """Each output with the seconds the engine spent on it; the caller's work is not counted."""
    import torch

    while True:
        start = time.perf_counter()
        try:
            output = next(outputs)
        except StopIteration:
            return
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        yield time.perf_counter() - start, output


def _run_stream(
    stream: StreamV2V, frames: list[np.ndarray], pairs: list[Correspondence], device: torch.device
) -> tuple[list[float], list[float], list[float]]:
    """Seconds per output, warp error and raw difference per output pair, for one stream."""
    from .metrics import frame_difference

    seconds: list[float] = []
    errors: list[float] = []
    differences: list[float] = []
    previous = None
    for index, (spent, output) in enumerate(_timed(stream.process(frames), device)):
        seconds.append(spent)
        if previous is not None:
            errors.append(pairs[index - 1].error(previous, output))
            differences.append(frame_difference(previous, output))
        previous = output
    return seconds, errors, differences


def measure(
    model: StreamModel,
    config: StreamConfig,
    label: str,
    kind: str,
    size: int | None,
    prompt: str,
    frames: list[np.ndarray],
    pairs: list[Correspondence],
    warmup: int,
    accel: str = DEFAULT_ACCEL,
) -> Row:
    """Run one bank configuration over ``frames`` and measure it; out of memory is a result."""
    import torch

    from .bank import BankConfig
    from .metrics import mean_of_pairs
    from .stream import StreamV2V

    device = torch.device(model.device)
    bank = BankConfig(kind=kind) if size is None else BankConfig(kind=kind, size=size)
    cuda = device.type == "cuda"
    if cuda:  # the previous configuration's bank must neither linger nor count
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        stream = StreamV2V(model, config, bank, prompt, accel=accel)
        seconds, errors, differences = _run_stream(stream, frames, pairs, device)
    except torch.cuda.OutOfMemoryError:
        return Row(label, kind, size, None, None, None, None, f"out of {device.type} memory")
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    timed = seconds[warmup:]
    return Row(
        label,
        kind,
        size,
        1000 * sum(timed) / len(timed),
        peak,
        mean_of_pairs(errors),
        mean_of_pairs(differences),
    )


def _cell(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None or math.isnan(value) else f"{value:{width}.2f}"


def table(report: dict) -> str:
    """The human-readable report: a header saying what was measured, then Table 2's columns."""
    lines = [
        "StreamV2V feature-bank ablation (the paper's Table 2)",
        f"input: {report['input_description']}, {report['frames']} frames; the first "
        f"{report['warmup_frames']} outputs are warm-up, left out of ms/frame",
        f"device: {report['device']}   torch {report['torch']}   {report['dtype']}",
        f"model: {report['model']}",
        f"denoising: t_index_list {report['t_index_list']}, seed {report['seed']}, "
        f"prompt {report['prompt']!r}",
        f"warp error: flow {report['flow']} on the input; pixel levels {report['scale']}; "
        "lower is more consistent",
        "",
        f"{'bank':<10} {'ms/frame':>9} {'peak GiB':>9} {'warp error':>11} {'pixel diff':>11}",
    ]
    for row in report["rows"]:
        line = (
            f"{row['bank']:<10} {_cell(row['ms_per_frame'], 9)} "
            f"{_cell(row['peak_memory_gib'], 9)} {_cell(row['warp_error'], 11)} "
            f"{_cell(row['pixel_consistency'], 11)}"
        )
        lines.append(line + (f"   {row['error']}" if row["error"] else ""))
    reference = report["input_video"]
    lines += [
        f"{'input':<10} {'':>9} {'':>9} {_cell(reference['warp_error'], 11)} "
        f"{_cell(reference['pixel_consistency'], 11)}",
        "",
        "input: the input video itself, measured the same way: what flow errors and the "
        "input's own changes of light contribute (a reference, not a target).",
    ]
    return "\n".join(lines)


def _finite(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


def _run(args: argparse.Namespace) -> int:
    _check_counts(args)
    import torch

    from .bench import describe_device
    from .loading import default_dtype, load_model, parse_lora_arg, resolve_device
    from .metrics import (
        WarpErrorResult,
        correspondences,
        optical_flow,
        pixel_consistency,
    )
    from .stream import StreamConfig

    # Built with the size to check it; the runs get frames already at that size.
    config = StreamConfig(
        steps=args.steps,
        strength=args.strength,
        seed=args.seed,
        width=args.width,
        height=args.height,
    )
    config = replace(config, width=None, height=None)
    loras = [parse_lora_arg(text) for text in args.lora]
    device = resolve_device(args.device)
    dtype = args.dtype or default_dtype(device)
    method = args.flow or ("raft" if args.raft_weights else "dis")
    estimator = optical_flow(
        method,
        raft_weights=args.raft_weights,
        device=device if method == "raft" else None,
    )
    frames, described = _read_frames(args)
    _say(f"input: {described}, {len(frames)} frames; flow: {estimator.name}")
    pairs: list[Correspondence] = list(correspondences(frames, estimator))
    reference = WarpErrorResult.from_pairs(
        [pair.error(a, b) for pair, a, b in zip(pairs, frames, frames[1:])], estimator.name
    )
    del estimator  # RAFT's weights must not count in the first configuration's peak memory
    model = load_model(
        args.model,
        lcm_lora=args.lcm_lora,
        loras=loras,
        vae=args.vae,
        dtype=dtype,
        device=device,
    )
    _say(f"model: {model.description}")
    rows = []
    for label, kind, size in CONFIGURATIONS:
        row = measure(
            model, config, label, kind, size, args.prompt, frames, pairs, args.warmup, args.accel
        )
        _say(f"{label}: " + (row.error or f"{row.ms_per_frame:.2f} ms/frame"))
        rows.append(row)
    report = {
        "input": str(args.input),
        "input_description": described,
        "frames": len(frames),
        "width": int(frames[0].shape[1]),
        "height": int(frames[0].shape[0]),
        "warmup_frames": args.warmup,
        "device": describe_device(device),
        "torch": torch.__version__,
        "dtype": str(model.dtype).removeprefix("torch."),
        "model": model.description,
        "t_index_list": list(config.timestep_indices),
        "seed": config.seed,
        "prompt": args.prompt,
        "flow": reference.flow_method,
        "scale": reference.scale,
        "rows": [
            {key: _finite(v) if isinstance(v, float) else v for key, v in asdict(row).items()}
            for row in rows
        ],
        "input_video": {
            "warp_error": _finite(reference.mean),
            "pixel_consistency": pixel_consistency(frames),
        },
    }
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ablation; returns the exit status (see ``cli.run_command``)."""
    return run_command(PROG, build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
