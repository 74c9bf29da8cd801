"""The live camera's rate: JPEG frames in, restyled JPEG frames out, as the browser sends them.

The sampler's "Live camera" sends camera frames over a websocket to the engine's ``LiveLoop``,
keeping two frames without an answer. This times that loop alone (no browser, no network), on
a session started by one run as the button needs: synthetic camera frames encoded as JPEG
once, then answered by the loop; and, in the same process, what each frame's parts cost
(decoding, the stream's frame, encoding), so the loop's rate can be read against them.

    python bench/live.py --device cuda --width 512 --height 384 --accel compile
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamv2v import bench  # noqa: E402
from streamv2v.bank import BankConfig  # noqa: E402
from streamv2v.errors import StreamV2VError  # noqa: E402
from streamv2v.live import LiveLoop, decode_image, encode_jpeg  # noqa: E402
from streamv2v.loading import default_dtype, resolve_device, resolve_dtype  # noqa: E402
from streamv2v.session import Session  # noqa: E402
from streamv2v.stream import StreamConfig  # noqa: E402


def camera(count: int, width: int, height: int) -> list[bytes]:
    """JPEG frames of a scene that moves, as a browser's canvas encodes them (quality 0.9)."""
    import torch

    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    frames = []
    for i in range(count):
        phase = i / count
        image = torch.stack([(x + phase) % 1, (y + 2 * phase) % 1, (x * y + phase) % 1], -1)
        frames.append(encode_jpeg(image, quality=90))
    return frames


def run_loop(session: Session, frames: list[bytes], count: int, in_flight: int) -> float:
    """Seconds for ``count`` answers, the sender keeping ``in_flight`` frames out."""
    slots = threading.Semaphore(in_flight)
    answered = threading.Event()
    answers = 0
    failure: list[str] = []

    def send(message: object) -> None:
        nonlocal answers
        if isinstance(message, dict):
            if message["type"] == "status":
                return
            failure.append(str(message))
        answers += 1
        slots.release()
        if answers == count or failure:
            answered.set()

    loop = LiveLoop(session, send)
    start = time.perf_counter()
    for i in range(count):
        slots.acquire()
        if failure:
            break
        loop.offer(frames[i % len(frames)])
    answered.wait()
    elapsed = time.perf_counter() - start
    loop.close()
    if failure:
        raise StreamV2VError(f"the live loop failed: {failure[0]}")
    return elapsed


def median_ms(action, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/live.py", description=__doc__)
    bench.add_model_arguments(parser)
    parser.add_argument("--device", default="cuda", help="cuda, mps or cpu (default cuda)")
    parser.add_argument("--width", type=int, default=512, help="camera frame width")
    parser.add_argument("--height", type=int, default=384, help="camera frame height")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps")
    parser.add_argument("--accel", default="compile", help="compile, graphs or off")
    parser.add_argument("--frames", type=int, default=600, help="timed frames")
    parser.add_argument("--warmup", type=int, default=30, help="untimed frames first")
    parser.add_argument("--in-flight", type=int, default=2, help="frames the sender keeps out")
    args = parser.parse_args(argv)

    import torch

    try:
        if min(args.frames, args.warmup, args.in_flight) < 1:
            raise StreamV2VError("--frames, --warmup and --in-flight must be at least 1")
        device = resolve_device(args.device)
        dtype = resolve_dtype(default_dtype(device))
        model = bench.bench_model(args.model, args.vae, device, dtype)
        frames = camera(30, args.width, args.height)
        session = Session("bench")
        start = time.perf_counter()
        session.run(
            model,
            StreamConfig(steps=args.steps),
            BankConfig(),
            "a watercolor painting",
            "",
            decode_image(frames[0])[None],
            accel=args.accel,
        )
        first = time.perf_counter() - start
        run_loop(session, frames, args.warmup, args.in_flight)
        elapsed = run_loop(session, frames, args.frames, args.in_flight)
        repeats = min(args.frames, 100)
        decoded = decode_image(frames[1])
        decode = median_ms(lambda: decode_image(frames[1]), repeats)
        frame = median_ms(lambda: session.run_live(decoded), repeats)
        output = session.run_live(decoded)
        encode = median_ms(lambda: encode_jpeg(output), repeats)
    except StreamV2VError as exc:
        print(f"bench/live.py: error: {exc}", file=sys.stderr)
        return 1
    print(
        f"device: {bench.describe_device(device)}   torch {torch.__version__}   accel "
        f"{session.stream.accel}   {args.width}x{args.height}, {args.steps} steps, DyMe bank"
    )
    print(f"first run (loads, compiles, captures): {first:.1f} s")
    print(
        f"live loop: {args.frames} frames in {elapsed:.3f} s = {args.frames / elapsed:.1f} "
        f"frames/s ({1000 * elapsed / args.frames:.2f} ms per frame, {args.in_flight} in flight)"
    )
    print(
        f"per frame, medians of {repeats}: decode {decode:.2f} ms, stream frame (run_live) "
        f"{frame:.2f} ms, encode {encode:.2f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
