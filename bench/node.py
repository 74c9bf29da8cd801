"""The Stream Batch Sampler node's own function against the engine, in one process.

ComfyUI hands the node a whole video as one float32 CPU tensor ``[N, H, W, 3]``; the node
must add no per-frame cost to the engine's. This loads the pack the way ComfyUI does (a
package under its folder name) over stand-ins for the few ComfyUI services the nodes call,
then times the node's function on N-frame batches (the stream continuing from run to run, as
with a video in chunks) and the engine's steady rate (``python -m streamv2v.bench``'s
measurement) for the same settings, and prints both with their ratio.

    python bench/node.py --device cuda --frames 120 --size 512 --accel compile
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACK = "ComfyUI_StreamV2V_bench"


def stand_in_comfyui(device: str) -> None:
    """The modules the nodes import from ComfyUI, doing what they do during a run."""
    import torch

    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_folder_paths = lambda kind: []
    folder_paths.get_filename_list = lambda kind: []
    folder_paths.get_full_path = lambda kind, name: None
    folder_paths.get_temp_directory = lambda: str(ROOT)

    class ProgressBar:  # ComfyUI's sends a websocket message per update; this only counts
        def __init__(self, total: int) -> None:
            self.updates = 0

        def update_absolute(self, value, total=None, preview=None) -> None:
            self.updates += 1

    comfy = types.ModuleType("comfy")
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    management = types.ModuleType("comfy.model_management")
    management.get_torch_device = lambda: torch.device(device)
    management.throw_exception_if_processing_interrupted = lambda: None
    comfy.utils, comfy.model_management = utils, management
    sys.modules.update(
        {
            "folder_paths": folder_paths,
            "comfy": comfy,
            "comfy.utils": utils,
            "comfy.model_management": management,
        }
    )


def stand_in_server() -> None:
    """ComfyUI's server, for the text a node shows while it runs ("compiling ...").

    Installed after the pack is imported: at import, a ``server`` module means a running
    ComfyUI, and the pack would add its HTTP routes to it.
    """
    server = types.ModuleType("server")
    server.PromptServer = types.SimpleNamespace(
        instance=types.SimpleNamespace(
            send_progress_text=lambda text, node: print(f"node says: {text}")
        )
    )
    sys.modules["server"] = server


def load_pack() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(
        PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    pack = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = pack
    spec.loader.exec_module(pack)
    return pack


def node_defaults(node: type) -> dict[str, object]:
    """Each widget at the value a new node shows (its default, or a list's first choice)."""
    values = {}
    for name, spec in node.INPUT_TYPES()["required"].items():
        kind, options = spec[0], spec[1] if len(spec) > 1 else {}
        if "default" in options:
            values[name] = options["default"]
        elif isinstance(kind, list):
            values[name] = kind[0]
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/node.py", description=__doc__)
    # bench.add_model_arguments's two, written out: the pack is imported only once ComfyUI's
    # stand-ins are in place, below
    parser.add_argument("--model", help="a model to measure (default: random SD1.5 + TAESD)")
    parser.add_argument("--vae", help="with --model: the VAE to use (e.g. a TAESD folder)")
    parser.add_argument("--device", default="cuda", help="cuda, mps or cpu (default cuda)")
    parser.add_argument("--frames", type=int, default=120, help="frames per node run")
    parser.add_argument("--size", type=int, default=512, help="square frame size")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps")
    parser.add_argument("--accel", default="compile", help="compile, graphs or off")
    parser.add_argument("--runs", type=int, default=3, help="timed node runs (best is kept)")
    args = parser.parse_args(argv)

    import torch

    stand_in_comfyui(args.device)
    pack = load_pack()
    stand_in_server()
    engine = sys.modules[f"{PACK}.streamv2v"]
    bench = importlib.import_module(f"{PACK}.streamv2v.bench")
    loading = importlib.import_module(f"{PACK}.streamv2v.loading")
    session = importlib.import_module(f"{PACK}.streamv2v.session")
    nodes_bank = importlib.import_module(f"{PACK}.nodes.bank")
    state = importlib.import_module(f"{PACK}.nodes.state")
    try:
        device = loading.resolve_device(args.device)
        dtype = loading.resolve_dtype(loading.default_dtype(device))
        model = bench.bench_model(args.model, args.vae, device, dtype)
        spec = session.ModelSpec(model=args.model or "random")
        state.MODELS.adopt(spec, model)
        node = pack.NODE_CLASS_MAPPINGS["StreamV2VSampler"]()
        handle = nodes_bank.BankHandle("bench", "dyme", 1, 4, "continue stream")
        widgets = node_defaults(type(node))
        widgets.update(
            prompt="a watercolor painting", steps=args.steps, acceleration=args.accel, unique_id="1"
        )
        g = torch.Generator().manual_seed(0)

        def batch() -> torch.Tensor:
            return torch.rand(args.frames, args.size, args.size, 3, generator=g)

        start = time.perf_counter()
        node.sample(session.PatchedModel(spec), handle, batch(), **widgets)
        first = time.perf_counter() - start
        times = []
        for _ in range(args.runs):
            frames = batch()
            start = time.perf_counter()
            out = node.sample(session.PatchedModel(spec), handle, frames, **widgets)
            times.append(time.perf_counter() - start)
            if out["result"][0].shape != frames.shape:
                raise engine.StreamV2VError("the node returned another number of frames")
        rate = bench.measure(
            model, args.accel, "dyme", args.steps, args.size, args.frames, warmup=10
        )
    except engine.StreamV2VError as exc:
        print(f"bench/node.py: error: {exc}", file=sys.stderr)
        return 1
    node_fps = args.frames / min(times)
    print(
        f"device: {bench.describe_device(device)}   torch {torch.__version__}   "
        f"accel {rate.accel}   {args.size}x{args.size}, {args.steps} steps, DyMe bank"
    )
    print(f"node, first run (loads, compiles, captures): {first:.1f} s")
    runs = f"{[round(1000 * t) for t in times]} ms" if len(times) <= 5 else f"{len(times)} runs"
    print(
        f"node: {args.frames} frames in {1000 * min(times):.1f} ms (best of {runs}; "
        f"median {1000 * statistics.median(times):.1f} ms) = {node_fps:.1f} FPS"
    )
    print(f"engine: {rate.ms_per_frame:.2f} ms/frame = {rate.fps:.1f} FPS")
    print(f"node / engine: {100 * node_fps / rate.fps:.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
