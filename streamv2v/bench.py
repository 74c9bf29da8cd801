"""Measure the engine: ms per frame, FPS and peak memory, per bank kind, steps and size.

Speed does not depend on trained weights, so by default the model is SD1.5-shaped with random
weights, built from the shipped configs on the device (no download, no files). ``--model``
measures a real model instead; the test suite uses that with a tiny model on the CPU.

    python -m streamv2v.bench --device cuda --sizes 512 --banks none,dyme --steps 1,4

Each row starts a new stream; "first s" is the time from creating it to its first output
frame, which includes compiling when the row is the first at its size and step count; "vs
none" is what the bank costs over the row without one (same mode, steps and size), the figure a
bank's overhead is judged by.
``--profile N`` then shows where a row's time goes: on the fast path, each CUDA graph's replay
time (frames that update the bank against frames that only read it) and its kernel time by
kind (attention, convolution, matrix product, Inductor's fused kernels, DyMe's matching and
sorts), then torch.profiler's table of the kernels (or, on a CPU, the operations) of N more
frames. ``--chunks K`` times the row's frames in K parts and prints the slowest and fastest
part and the memory still allocated after the first and the last: whether a long live session
holds its rate (a GPU that heats up and clocks down) and its memory.
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
import time
from dataclasses import dataclass
from itertools import pairwise

import torch

from . import attention
from .bank import BANK_KINDS, BankConfig
from .errors import StreamV2VError
from .frames import MAX_SIDE
from .loading import (
    SHIPPED_SD15_DIR,
    StreamModel,
    default_dtype,
    load_model,
    quiet_libraries,
    resolve_device,
    resolve_dtype,
)
from .modes import ACCEL_MODES
from .stream import StreamConfig, StreamV2V


def random_sd15(device: torch.device, dtype: torch.dtype) -> StreamModel:
    """A full-size SD1.5 UNet + CLIP text encoder + TAESD with random weights, made on device."""
    from diffusers import (
        AutoencoderTiny,
        LCMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(SHIPPED_SD15_DIR / "unet")
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig.from_json_file(SHIPPED_SD15_DIR / "text_encoder" / "config.json")
        )
        vae = AutoencoderTiny()  # the default configuration is TAESD for SD1.x
    scheduler = LCMScheduler.from_config(LCMScheduler.load_config(SHIPPED_SD15_DIR / "scheduler"))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(SHIPPED_SD15_DIR / "tokenizer"),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(device=device, dtype=dtype)
    return StreamModel(pipe, dtype, device, "random SD1.5-shaped weights + TAESD", "SD1.5", "taesd")


@dataclass
class Result:
    accel: str
    bank: str
    steps: int
    size: int
    ms_per_frame: float
    fps: float
    peak_mib: float | None
    first_s: float
    attention: str = ""
    profile: str | None = None
    frames: int = 0
    chunk_ms: tuple[float, ...] = ()
    allocated_mib: tuple[float, float] | None = None


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--model`` and ``--vae`` that ``bench_model`` takes, for every benchmark."""
    parser.add_argument("--model", help="a model to measure (default: random SD1.5 + TAESD)")
    parser.add_argument("--vae", help="with --model: the VAE to use (e.g. a TAESD folder)")


def bench_model(
    path: str | None, vae: str | None, device: torch.device, dtype: torch.dtype
) -> StreamModel:
    """The model a benchmark's ``--model`` and ``--vae`` name, or the random SD1.5 + TAESD."""
    if path:
        return load_model(path, vae=vae, dtype=dtype, device=device)
    if vae:
        raise StreamV2VError("--vae only acts with --model: the random model uses TAESD")
    with quiet_libraries():
        return random_sd15(device, dtype)


def measure(
    model: StreamModel,
    accel: str,
    bank: str,
    steps: int,
    size: int,
    frames: int,
    warmup: int,
    profile: int = 0,
    chunks: int = 1,
) -> Result:
    """Time ``frames`` pushes of ComfyUI-style frames (float32 CPU) after ``warmup`` pushes.

    Outputs stay on the device and only the last is fetched, as the sampler node does with a
    batch, so the figure is the engine's rate rather than one host sync per frame.
    """
    device = torch.device(model.device)
    config = BankConfig() if bank == "dyme" else BankConfig(kind=bank)
    g = torch.Generator().manual_seed(0)
    inputs = [torch.rand(size, size, 3, generator=g) for _ in range(8)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    stream = StreamV2V(
        model, StreamConfig(steps=steps), config, prompt="a watercolor painting", accel=accel
    )
    pushed = 0
    while not stream.push(inputs[pushed % len(inputs)]):
        pushed += 1
    first = time.perf_counter() - start
    for i in range(warmup):
        stream.push(inputs[i % len(inputs)], to_cpu=False)
    out = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    # A chunk's end waits for the GPU, once per chunk: negligible against its frames.
    bounds = [frames * k // chunks for k in range(chunks + 1)]
    chunk_ms, allocated = [], []
    start = chunk_start = time.perf_counter()
    for first_frame, end in pairwise(bounds):
        for i in range(first_frame, end):
            out = stream.push(inputs[i % len(inputs)], to_cpu=False) or out
        if end == frames and out:
            out[-1].cpu()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            allocated.append(torch.cuda.memory_allocated(device) / 2**20)
        now = time.perf_counter()
        chunk_ms.append(1000 * (now - chunk_start) / (end - first_frame))
        chunk_start = now
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    ms = 1000 * elapsed / frames
    report = where_time_goes(stream, inputs, profile) if profile else None
    attention = stream._fast.attention if stream._fast is not None else stream.attention_backend
    return Result(
        stream.accel,
        bank,
        steps,
        size,
        ms,
        1000 / ms,
        peak,
        first,
        attention,
        report,
        frames,
        tuple(chunk_ms) if chunks > 1 else (),
        (allocated[0], allocated[-1]) if chunks > 1 and allocated else None,
    )


def where_time_goes(stream: StreamV2V, inputs: list[torch.Tensor], frames: int) -> str:
    """The profile behind a row: what the benchmark's figure alone cannot say."""
    from torch.profiler import ProfilerActivity, profile

    cuda = stream.device.type == "cuda"
    lines = []
    graphs = stream._fast.graphs if stream._fast is not None else {}
    columns = {}
    for updating, graph in sorted(graphs.items()):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(frames):
            graph.replay()
        end.record()
        end.synchronize()
        kind = "frames that update the bank" if updating else "frames that only read it"
        lines.append(f"graph replay, {kind}: {start.elapsed_time(end) / frames:.2f} ms")
        columns["update" if updating else "read"] = _replayed_kernels(graph, frames)
    if columns:
        lines.append(kernel_time_by_kind(columns, frames))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for i in range(frames):
            stream.push(inputs[i % len(inputs)], to_cpu=False)
        if cuda:
            torch.cuda.synchronize(stream.device)
    lines.append(
        prof.key_averages().table(
            sort_by="cuda_time_total" if cuda else "self_cpu_time_total",
            row_limit=25,
            max_name_column_width=80,
        )
    )
    return "\n".join(lines)


# What a GPU kernel does, from its name: the first kind whose pattern is found wins. Inductor's
# kernels come first, as their names list the operations they fuse ("convolution" for a
# convolution's bias add, "sort" for what reads a sort's result).
KERNEL_KINDS = (
    ("Inductor's kernels (norms, element-wise)", re.compile(r"^triton_")),
    ("DyMe matching (Triton)", re.compile(r"best_match")),
    ("attention", re.compile(r"sdpa|fmha|flash|attention")),
    ("convolution", re.compile(r"fprop|conv|nhwc")),
    ("matrix product", re.compile(r"gemm|gemv|nvjet|cutlass")),
    ("sort (DyMe's random split)", re.compile(r"sort")),
    ("copy, fill", re.compile(r"memcpy|memset|copy|fill")),
)


def kernel_kind(name: str) -> str:
    """Which of ``KERNEL_KINDS`` a kernel named ``name`` belongs to ("other" if none)."""
    lower = name.lower()
    return next((kind for kind, pattern in KERNEL_KINDS if pattern.search(lower)), "other")


def kernel_time_by_kind(columns: dict[str, list[tuple[str, float, int]]], frames: int) -> str:
    """Per frame, the kernel time of each kind, one column per kind of frame.

    ``columns`` maps a kind of frame to its kernels' (name, total us, launches) over
    ``frames`` frames. Kernel time is not frame time: in frames that update the bank the
    merges run on a stream of their own beside the UNet, so their kernels overlap.
    """
    kinds = [kind for kind, _ in KERNEL_KINDS] + ["other"]
    sums = {label: dict.fromkeys(kinds, 0.0) for label in columns}
    for label, kernels in columns.items():
        for name, us, _ in kernels:
            sums[label][kernel_kind(name)] += us
    width = max(map(len, kinds))
    lines = [
        "kernel time per frame by kind, ms (where the bank is updated, two streams overlap):",
        f"{'':<{width}}" + "".join(f"{label:>9}" for label in columns),
    ]
    for kind in kinds:
        if any(sums[label][kind] for label in columns):
            lines.append(
                f"{kind:<{width}}"
                + "".join(f"{sums[label][kind] / frames / 1000:9.2f}" for label in columns)
            )
    lines.append(
        f"{'all kernels':<{width}}"
        + "".join(f"{sum(sums[label].values()) / frames / 1000:9.2f}" for label in columns)
    )
    lines.append(
        f"{'kernels per frame':<{width}}"
        + "".join(f"{sum(n for _, _, n in kernels) / frames:9.0f}" for kernels in columns.values())
    )
    return "\n".join(lines)


def _replayed_kernels(graph: torch.cuda.CUDAGraph, frames: int) -> list[tuple[str, float, int]]:
    """(name, total us, launches) of every kernel in ``frames`` replays of ``graph``."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(frames):
            graph.replay()
        torch.cuda.synchronize()
    return [
        (event.key, event.self_device_time_total, event.count)
        for event in prof.key_averages()
        if event.device_type == DeviceType.CUDA
    ]


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()})"


def table(
    results: list[Result],
    device: str,
    model: str,
    dtype: torch.dtype,
    kernel_times: dict[tuple, tuple[float, float] | str] | None = None,
) -> str:
    lines = [
        f"device: {device}   torch {torch.__version__}   dtype {str(dtype).removeprefix('torch.')}",
        f"model: {model}",
        "",
        f"{'accel':<8} {'bank':<6} {'steps':>5} {'size':>6} {'ms/frame':>9} {'FPS':>8} "
        f"{'peak MiB':>9} {'first s':>8} {'vs none':>8}  attention",
    ]
    # A bank's cost is read against the same configuration without one, when it was measured.
    plain = {(r.accel, r.steps, r.size): r.ms_per_frame for r in results if r.bank == "none"}
    for r in results:
        peak = f"{r.peak_mib:9.0f}" if r.peak_mib is not None else f"{'-':>9}"
        base = plain.get((r.accel, r.steps, r.size))
        extra = f"{r.ms_per_frame / base - 1:+8.1%}" if base and r.bank != "none" else f"{'-':>8}"
        lines.append(
            f"{r.accel:<8} {r.bank:<6} {r.steps:>5} {r.size:>6} {r.ms_per_frame:9.2f} "
            f"{r.fps:8.1f} {peak} {r.first_s:8.1f} {extra}  {r.attention}"
        )
    if kernel_times:
        lines += ["", "self-attention kernels timed (us per call: flash-attn-4, SDPA):"]
        for (_, _, (q, k, _), heads), times in kernel_times.items():
            shapes = f"  q {'x'.join(map(str, q))}, k/v {'x'.join(map(str, k))}, {heads} heads:"
            if isinstance(times, str):
                lines.append(f"{shapes} flash-attn-4 failed ({times}), SDPA")
            else:
                pick = "flash-attn-4" if times[0] < times[1] else "SDPA"
                lines.append(f"{shapes} {times[0] * 1e6:.1f}, {times[1] * 1e6:.1f} -> {pick}")
    for r in results:
        if r.chunk_ms:
            memory = (
                f"; allocated {r.allocated_mib[0]:.0f} MiB after the first, "
                f"{r.allocated_mib[1]:.0f} MiB after the last"
                if r.allocated_mib
                else ""
            )
            lines.append(
                f"chunks: {r.accel} {r.bank} {r.steps} steps {r.size}: {len(r.chunk_ms)} of "
                f"about {r.frames // len(r.chunk_ms)} frames, {min(r.chunk_ms):.2f} to "
                f"{max(r.chunk_ms):.2f} ms/frame (slowest {1000 / max(r.chunk_ms):.1f} FPS)"
                + memory
            )
    for r in results:
        if r.profile:
            lines += ["", f"profile: {r.accel} {r.bank} {r.steps} steps {r.size}", r.profile]
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated whole numbers, got {text!r}"
        ) from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamv2v.bench", description=__doc__)
    add_model_arguments(parser)
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: auto)")
    parser.add_argument("--dtype", default=None, help="fp16, bf16 or fp32 (default fp16 on GPU)")
    parser.add_argument("--sizes", type=_ints, default=[512], help="square sizes, e.g. 512,768")
    parser.add_argument("--steps", type=_ints, default=[4], help="step counts, e.g. 1,4")
    parser.add_argument("--banks", default="none,dyme", help="bank kinds, e.g. none,queue,dyme")
    parser.add_argument(
        "--accel",
        default="compile",
        help=f"acceleration modes to compare, from {', '.join(ACCEL_MODES)} (e.g. off,compile)",
    )
    parser.add_argument("--frames", type=int, default=100, help="timed frames per row")
    parser.add_argument("--warmup", type=int, default=10, help="untimed frames per row")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after each row, profile N more frames and print where the time goes",
    )
    parser.add_argument(
        "--chunks",
        type=int,
        default=1,
        metavar="K",
        help="time each row's frames in K parts: the slowest and fastest part, and the memory "
        "allocated after the first and the last (a long session's rate and memory)",
    )
    args = parser.parse_args(argv)
    try:
        banks = [b.strip() for b in args.banks.split(",") if b.strip()]
        for bank in banks:
            if bank not in BANK_KINDS:
                raise StreamV2VError(f"--banks: {bank!r} is not one of {', '.join(BANK_KINDS)}")
        accels = [a.strip() for a in args.accel.split(",") if a.strip()]
        for accel in accels:
            if accel not in ACCEL_MODES:
                raise StreamV2VError(f"--accel: {accel!r} is not one of {', '.join(ACCEL_MODES)}")
        if not args.sizes or any(not 8 <= size <= MAX_SIDE for size in args.sizes):
            raise StreamV2VError(f"--sizes: give sizes of 8 to {MAX_SIDE} pixels, e.g. 512,768")
        if args.frames < 1 or args.warmup < 0 or args.profile < 0:
            raise StreamV2VError("--frames must be >= 1, --warmup and --profile >= 0")
        if not 1 <= args.chunks <= args.frames:
            raise StreamV2VError(
                f"--chunks must be from 1 to --frames ({args.frames}), got {args.chunks}"
            )
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype or default_dtype(device))
        model = bench_model(args.model, args.vae, device, dtype)
        results = [
            measure(
                model, accel, bank, steps, size, args.frames, args.warmup, args.profile, args.chunks
            )
            for size in args.sizes
            for steps in args.steps
            for bank in banks
            for accel in accels
        ]
    except StreamV2VError as exc:
        print(f"streamv2v.bench: error: {exc}", file=sys.stderr)
        return 1
    print(table(results, describe_device(device), model.description, dtype, attention.KERNEL_TIMES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
