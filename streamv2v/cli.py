"""``python -m streamv2v INPUT OUTPUT``: restyle a video file without ComfyUI.

The command checks everything it can before the slow model load (the input video, the
output path, the settings), then streams: each frame is decoded, restyled and encoded
before the next is read, so memory stays flat for a video of any length. Mistakes end
the run with one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import TYPE_CHECKING

from .errors import StreamV2VError
from .modes import DEFAULT_ACCEL, USER_ACCEL_MODES

if TYPE_CHECKING:
    from .bank import BankConfig
    from .stream import StreamConfig
    from .video import VideoReader, VideoWriter

PROG = "streamv2v"
INTERRUPTED = 130  # what shells report for a process ended by Ctrl-C

DESCRIPTION = """\
Restyle a video with StreamV2V: Stable Diffusion 1.5 made few-step by LCM, kept consistent
over time by a feature bank of past frames. Frames are decoded, restyled and encoded one at
a time; the output keeps the input's frame rate, length and sound (copied, or re-encoded
when OUTPUT's container cannot hold it). OUTPUT's extension picks the container: .mp4,
.mov, .mkv (H.264) or .webm (VP9). Defaults are the paper's."""

EPILOG = """\
example (ComfyUI's model folders):
  python -m streamv2v in.mp4 out.mp4 --prompt "a watercolor painting" \\
    --model models/checkpoints/DreamShaper_8_pruned.safetensors \\
    --lcm-lora models/loras/lcm-lora-sdv1-5.safetensors --vae models/vae_approx"""


def _index_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of whole numbers, e.g. 30,35,40,45"
        ) from None


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose and load a model, shared by every command that loads one."""
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        required=True,
        metavar="PATH",
        help="an SD1.5-family model: a single .safetensors/.ckpt file or a diffusers folder",
    )
    model.add_argument(
        "--lcm-lora",
        metavar="PATH",
        help="the LCM-LoRA for SD1.5, fused into a model that is not already an LCM one",
    )
    model.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:WEIGHT]",
        help="a style LoRA, fused at WEIGHT (default 1.0); repeat for several",
    )
    model.add_argument(
        "--vae",
        metavar="PATH",
        help="replace the model's VAE: TAESD (ComfyUI's vae_approx folder or its "
        "taesd_encoder/decoder files, fastest), a diffusers VAE folder or a VAE file",
    )
    model.add_argument(
        "--dtype",
        choices=("fp16", "bf16", "fp32"),
        help="weights and compute precision (default: fp16 on cuda and mps, fp32 on cpu)",
    )
    model.add_argument(
        "--device",
        choices=("cuda", "mps", "cpu"),
        help="where to run (default: cuda if present, else mps, else cpu)",
    )
    model.add_argument(
        "--accel",
        choices=USER_ACCEL_MODES,
        default=DEFAULT_ACCEL,
        help="on an NVIDIA GPU: compile (torch.compile + CUDA graphs, fastest; the first run at "
        "a size compiles for one to two minutes, two to three on Windows, cached on disk), "
        "graphs (CUDA graphs only, starts in seconds) or off (plain PyTorch); elsewhere plain "
        "PyTorch runs, and where compiling fails, CUDA graphs (default: compile)",
    )


def add_denoising_arguments(group: argparse._ArgumentGroup) -> None:
    """--prompt, --steps, --strength and --seed, shared by every command that restyles."""
    group.add_argument("--prompt", required=True, metavar="TEXT", help="what to turn it into")
    group.add_argument(
        "--steps", type=int, metavar="N", help="denoising steps per frame, 1 to 4 (default 4)"
    )
    group.add_argument(
        "--strength",
        type=float,
        metavar="S",
        help="how far each frame may move from the input, within (0, 1] (default 0.4)",
    )
    group.add_argument(
        "--seed", type=int, default=2, metavar="N", help="seed of the per-step noise (default 2)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", metavar="INPUT", help="the video to restyle")
    parser.add_argument(
        "output", metavar="OUTPUT", help="the video to write (.mp4, .mov, .mkv or .webm)"
    )

    add_model_arguments(parser)

    prompt = parser.add_argument_group("prompt and denoising")
    add_denoising_arguments(prompt)
    prompt.add_argument(
        "--negative-prompt",
        default="",
        metavar="TEXT",
        help="what to steer away from; acts only with --cfg-type initialize or full",
    )
    prompt.add_argument(
        "--t-index-list",
        type=_index_list,
        metavar="I,J,...",
        help="the denoising steps as ascending indices into the 50-step LCM schedule, "
        "e.g. 30,35,40,45; replaces --steps and --strength",
    )
    prompt.add_argument(
        "--guidance",
        type=float,
        metavar="SCALE",
        default=1.0,
        help="classifier-free guidance scale; above 1.0 it needs a --cfg-type (default 1.0)",
    )
    prompt.add_argument(
        "--cfg-type",
        choices=("none", "self", "initialize", "full"),
        default="none",
        help="StreamDiffusion's guidance variant: self and initialize are residual (cheap), "
        "full doubles the UNet batch (default none)",
    )
    prompt.add_argument(
        "--delta",
        type=float,
        metavar="D",
        default=1.0,
        help="residual-noise scale of --cfg-type self/initialize (default 1.0)",
    )
    prompt.add_argument(
        "--similar-filter",
        type=float,
        metavar="THRESHOLD",
        help="skip frames whose cosine similarity to the last processed one exceeds "
        "THRESHOLD (e.g. 0.98), repeating the last output (default: off)",
    )
    prompt.add_argument(
        "--max-skip",
        type=int,
        metavar="N",
        default=10,
        help="most frames --similar-filter skips in a row (default 10)",
    )

    bank = parser.add_argument_group("feature bank")
    bank.add_argument(
        "--bank",
        choices=("dyme", "queue", "none"),
        default="dyme",
        help="dyme: one frame's worth of tokens merged over time (the paper's); queue: the "
        "last --bank-size updates; none: plain StreamDiffusion (default dyme)",
    )
    bank.add_argument(
        "--bank-size",
        type=int,
        metavar="N",
        default=1,
        help="updates a queue bank keeps; dyme always keeps 1 (default 1)",
    )
    bank.add_argument(
        "--bank-interval",
        type=int,
        metavar="N",
        default=4,
        help="update the bank every this many frames (default 4)",
    )
    bank.add_argument(
        "--no-extended-attention",
        dest="extended_attention",
        action="store_false",
        help="do not let self-attention attend to the bank's keys and values",
    )
    bank.add_argument(
        "--no-fusion",
        dest="fusion",
        action="store_false",
        help="do not blend similar bank features into the low-resolution decoder layers",
    )
    bank.add_argument(
        "--fusion-strength",
        type=float,
        metavar="ALPHA",
        default=0.8,
        help="weight of the matched bank feature in a fused token, 0..1 (default 0.8)",
    )
    bank.add_argument(
        "--fusion-threshold",
        type=float,
        metavar="COS",
        default=0.98,
        help="cosine similarity a bank feature needs to be fused (default 0.98)",
    )

    output = parser.add_argument_group("output")
    output.add_argument(
        "--width",
        type=int,
        metavar="PX",
        help="output width in pixels (default: the input's; with only --height given, "
        "the input's aspect ratio)",
    )
    output.add_argument(
        "--height",
        type=int,
        metavar="PX",
        help="output height in pixels (default: the input's; with only --width given, "
        "the input's aspect ratio)",
    )
    output.add_argument(
        "--crf",
        type=int,
        metavar="N",
        help="encoder quality, lower is better and larger (default 18 for H.264, 31 for VP9)",
    )
    return parser


def _run(args: argparse.Namespace) -> int:
    from .bank import BankConfig
    from .frames import output_size
    from .stream import StreamConfig
    from .video import VideoReader, VideoWriter

    # Settings first: a mistake in them is named before any file is opened or model loaded.
    config = StreamConfig(
        steps=args.steps,
        strength=args.strength,
        t_index_list=args.t_index_list,
        guidance=args.guidance,
        cfg_type=args.cfg_type,
        delta=args.delta,
        seed=args.seed,
        width=args.width,
        height=args.height,
        similar_filter=args.similar_filter,
        max_skip=args.max_skip,
    )
    config.check_negative_prompt(args.negative_prompt)
    bank = BankConfig(
        kind=args.bank,
        size=args.bank_size,
        interval=args.bank_interval,
        extended_attention=args.extended_attention,
        fusion=args.fusion,
        fusion_strength=args.fusion_strength,
        fusion_threshold=args.fusion_threshold,
    )
    with VideoReader(args.input) as reader:
        # Created now to check OUTPUT before the model load; the file appears at frame 1.
        writer = VideoWriter(
            args.output,
            reader.fps,
            *output_size(args.width, args.height, reader.width, reader.height),
            audio_from=args.input,
            crf=args.crf,
        )
        return _stream(args, config, bank, reader, writer)


def _stream(
    args: argparse.Namespace,
    config: StreamConfig,
    bank: BankConfig,
    reader: VideoReader,
    writer: VideoWriter,
) -> int:
    import torch
    from tqdm import tqdm

    from .loading import default_dtype, load_model, parse_lora_arg, resolve_device
    from .stream import StreamV2V

    loras = [parse_lora_arg(text) for text in args.lora]
    device = resolve_device(args.device)
    dtype = args.dtype or default_dtype(device)
    _say(f"input: {_describe(reader)}")
    try:
        model = load_model(
            args.model,
            lcm_lora=args.lcm_lora,
            loras=loras,
            vae=args.vae,
            dtype=dtype,
            device=device,
        )
        stream = StreamV2V(
            model, config, bank, args.prompt, args.negative_prompt, args.accel, on_status=_say
        )
        if stream.accel_note:
            _say(stream.accel_note)
        _say(f"model: {model.description}")
        with writer, tqdm(total=reader.frame_count, unit="frame", desc=PROG) as bar:
            for index, image in enumerate(stream.process(reader)):
                writer.write(image, reader.times[index])  # output i translates input i
                bar.update()
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        # CUDA's is an OutOfMemoryError; MPS and the CPU allocator raise RuntimeErrors.
        known = isinstance(e, (torch.OutOfMemoryError, MemoryError))
        if not known and "out of memory" not in str(e).lower():
            raise
        raise StreamV2VError(
            f"out of {device.type} memory: lower --width/--height, use --vae with TAESD, "
            "or --dtype fp16"
        ) from e
    except KeyboardInterrupt:
        if not writer.frames_written:
            raise
        _say(f"error: interrupted; {args.output} holds the first {writer.frames_written} frames")
        return INTERRUPTED
    _say(f"wrote {args.output}: {writer.frames_written} frames at {_fps(writer.fps)} fps")
    return 0


def _describe(reader: VideoReader) -> str:
    count = "unknown length" if reader.frame_count is None else f"~{reader.frame_count} frames"
    sound = ", with sound" if reader.has_audio else ""
    return f"{reader.path} {reader.width}x{reader.height} at {_fps(reader.fps)} fps, {count}{sound}"


def _fps(rate: Fraction) -> str:
    return f"{float(rate):.3f}".rstrip("0").rstrip(".")


def _say(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def run_command(
    prog: str,
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], int],
    argv: Sequence[str] | None,
) -> int:
    """Parse and run; expected failures become one line on stderr and an exit status
    (2 for bad usage, 1 for errors, 130 for Ctrl-C), never a traceback."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed the usage and its one-line error
        return e.code if isinstance(e.code, int) else 2
    try:
        return run(args)
    except StreamV2VError as e:
        message = _flag_names(parser, " ".join(str(e).split()))
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: error: interrupted", file=sys.stderr, flush=True)
        return INTERRUPTED


def _flag_names(parser: argparse.ArgumentParser, message: str) -> str:
    """The engine names settings as its API and the nodes do (``max_skip``); on the command
    line the fix is a flag (``--max-skip``), so each name that is one of ours becomes it."""
    flags = set(re.findall(r"--[a-z][a-z0-9-]*", parser.format_usage()))

    def flag(match: re.Match) -> str:
        name = "--" + match[0].replace("_", "-")
        return name if name in flags else match[0]

    return re.sub(r"(?<![\w-])[a-z][a-z0-9]*(?:_[a-z0-9]+)+(?![\w-])", flag, message)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status (see ``run_command``)."""
    return run_command(PROG, build_parser(), _run, argv)
