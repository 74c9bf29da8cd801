"""The Stream Batch Sampler: frames in, restyled frames out, the stream kept between runs."""

from __future__ import annotations

import torch

from ..streamv2v.errors import StreamV2VError
from ..streamv2v.modes import DEFAULT_ACCEL, USER_ACCEL_MODES
from ..streamv2v.session import PatchedModel
from ..streamv2v.stream import CFG_TYPES, StreamConfig
from . import comfy
from .bank import BANK, BankHandle, describe
from .loaders import MODEL
from .state import BANK_USERS, MODEL_IN_USE, MODELS, SESSIONS


def samplers_sharing(graph: dict | None, node_id: str | None, name: str) -> list[str]:
    """The other samplers of the queued workflow (``graph``, ComfyUI's API prompt) on this
    sampler's bank: fed by the same Feature Bank node, or by one named ``name``, or by one whose
    name comes from the same output as this one's. Two samplers would take turns restarting one
    stream, each undoing the other's, so the run is refused instead, before either runs."""
    if not isinstance(graph, dict):
        return []
    mine = _feature_bank(graph, graph.get(str(node_id)))
    keys = {("name", name)} | (_bank_keys(*mine) if mine else set())
    others = []
    for other_id, node in graph.items():
        if str(other_id) == str(node_id) or not isinstance(node, dict):
            continue
        if node.get("class_type") != "StreamV2VSampler":
            continue
        source = _feature_bank(graph, node)
        if source is not None and keys & _bank_keys(*source):
            others.append(str(other_id))
    return sorted(others)


def _feature_bank(graph: dict, sampler: object) -> tuple[str, dict] | None:
    """(id, node) of the Feature Bank node a sampler's bank input is linked to."""
    link = sampler.get("inputs", {}).get("bank") if isinstance(sampler, dict) else None
    if not isinstance(link, list) or not link:
        return None
    source = graph.get(str(link[0]))
    if not isinstance(source, dict) or source.get("class_type") != "StreamV2VFeatureBank":
        return None
    return str(link[0]), source


def _bank_keys(bank_id: str, bank: dict) -> set[tuple]:
    """What makes two Feature Bank nodes one bank, as far as the queued workflow shows: the
    node itself, its name as typed, or the output its name is linked to."""
    keys: set[tuple] = {("node", bank_id)}
    name = bank.get("inputs", {}).get("name")
    if isinstance(name, str):
        keys.add(("name", name.strip()))
    elif isinstance(name, list) and name:
        keys.add(("link", *map(str, name)))
    return keys


def samplers_before(name: str, node_id: str | None) -> list[str]:
    """Another sampler that ran bank ``name`` earlier in the queued run now executing.

    ``samplers_sharing`` reads the queued workflow, which holds no name that another node
    computes (two String nodes with one text); this catches those when the second sampler
    runs. The first has run by then, so this is the fallback."""
    run = comfy.running_prompt_id()
    if run is None or node_id is None:
        return []
    previous = BANK_USERS.get(name)
    if previous is not None and previous[0] == run and previous[1] != str(node_id):
        return [previous[1]]
    BANK_USERS[name] = (run, str(node_id))
    return []


class StreamV2VSampler:
    DESCRIPTION = (
        "Restyles video frames with StreamV2V. A batch of N frames (a video or a chunk of one) "
        "gives N frames, each the translation of its input. A single frame (webcam, Load Image, "
        "Run (Instant)) continues the stream from the previous run: the output lags 'steps - 1' "
        "frames once the stream is full (before that, the current frame finished early); right "
        "after a batch, a single frame is a video's last chunk and comes out in step. A change "
        "of frame size, model, steps, or to or from CFG initialize/full starts a new bank, and the "
        "node says so. After one run, 'Live camera' streams this browser's camera straight into "
        "the stream with that run's settings, at camera rate, and shows the output on the node."
    )
    CATEGORY = "StreamV2V"
    FUNCTION = "sample"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The restyled frames, on the CPU, at the input's size (or width/height).",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": (MODEL, {"tooltip": "From Load LCM Model (optionally patched)."}),
                "bank": (BANK, {"tooltip": "From Feature Bank: where the stream is kept."}),
                "images": (
                    "IMAGE",
                    {"tooltip": "A batch of video frames, or one frame per run (webcam)."},
                ),
                "prompt": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "",
                        "tooltip": "What to turn the video into. Changing it keeps the bank.",
                    },
                ),
                "negative_prompt": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "",
                        "tooltip": "What to avoid; acts only with cfg_type initialize or full.",
                    },
                ),
                "steps": (
                    "INT",
                    {
                        "default": 4,
                        "min": 1,
                        "max": 4,
                        "tooltip": "LCM denoising steps per frame (paper: 4).",
                    },
                ),
                "strength": (
                    "FLOAT",
                    {
                        "default": 0.4,
                        "min": 0.02,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "How far frames may move from the input (paper: 0.4).",
                    },
                ),
                "seed": (
                    "INT",
                    {
                        "default": 2,
                        "min": 0,
                        "max": 2**63 - 1,
                        "control_after_generate": False,
                        "tooltip": "Seeds the per-step noise and the bank's merging (paper: 2). "
                        "Fixed across runs so a live stream stays steady.",
                    },
                ),
                "cfg_type": (
                    list(CFG_TYPES),
                    {
                        "tooltip": "Guidance: none (fastest, the paper's), or StreamDiffusion's "
                        "self / initialize (residual, cheap) / full (doubles the batch)."
                    },
                ),
                "guidance": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 1.0,
                        "max": 20.0,
                        "step": 0.1,
                        "tooltip": "Guidance scale: above 1.0 with a cfg_type, 1.0 without.",
                    },
                ),
                "delta": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 5.0,
                        "step": 0.05,
                        "tooltip": "Residual-noise scale; acts only with cfg_type self or "
                        "initialize.",
                    },
                ),
                "similar_filter": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 0.999,
                        "step": 0.001,
                        "tooltip": "Skip frames more similar than this to the last one, repeating "
                        "its output (e.g. 0.98); 0 = off.",
                    },
                ),
                "max_skip": (
                    "INT",
                    {
                        "default": 10,
                        "min": 1,
                        "max": 100,
                        "tooltip": "Most frames skipped in a row (with similar_filter on).",
                    },
                ),
                "width": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 4096,
                        "step": 8,
                        "tooltip": "Output width; 0 keeps the input's, or its aspect ratio with a "
                        "height set.",
                    },
                ),
                "height": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 4096,
                        "step": 8,
                        "tooltip": "Output height; 0 keeps the input's, or its aspect ratio with a "
                        "width set.",
                    },
                ),
                "acceleration": (
                    list(USER_ACCEL_MODES),
                    {
                        "default": DEFAULT_ACCEL,
                        "tooltip": "compile: torch.compile + CUDA graphs, fastest (the first run "
                        "at a new size compiles for one to two minutes, two to three on Windows, "
                        "cached on disk). graphs: CUDA graphs only, starts in seconds. off: plain "
                        "PyTorch. Without an NVIDIA GPU, plain PyTorch runs and the node says so; "
                        "where compiling fails (no C compiler for Triton), CUDA graphs run and the "
                        "node says why.",
                    },
                ),
            },
            "hidden": {"unique_id": "UNIQUE_ID", "graph": "PROMPT"},
        }

    @classmethod
    def IS_CHANGED(cls, **kwargs) -> int:
        return comfy.every_run()  # every queued run is the next part of the stream

    def sample(
        self,
        model: PatchedModel,
        bank: BankHandle,
        images: torch.Tensor,
        prompt: str,
        negative_prompt: str,
        steps: int,
        strength: float,
        seed: int,
        cfg_type: str,
        guidance: float,
        delta: float,
        similar_filter: float,
        max_skip: int,
        width: int,
        height: int,
        acceleration: str = DEFAULT_ACCEL,
        unique_id: str | None = None,
        graph: dict | None = None,
    ) -> dict:
        others = samplers_sharing(graph, unique_id, bank.name) or samplers_before(
            bank.name, unique_id
        )
        if others:
            raise StreamV2VError(
                f"this sampler (node {unique_id}) and node {', '.join(others)} both use bank "
                f"'{bank.name}': a bank keeps one stream, so give each sampler a Feature Bank "
                "node of its own with a name of its own"
            )
        config = StreamConfig(
            steps=steps,
            strength=strength,
            seed=seed,
            cfg_type=cfg_type,
            guidance=guidance,
            delta=delta,
            similar_filter=similar_filter or None,
            max_skip=max_skip,
            width=width or None,
            height=height or None,
        )
        bank_config = model.bank_config(bank.kind, bank.size, bank.interval)
        session = SESSIONS.get(bank.name)
        with MODEL_IN_USE:
            outputs = session.run(
                MODELS.get(model.spec),
                config,
                bank_config,
                prompt,
                negative_prompt,
                images,
                bank.each_run,
                comfy.Progress(len(images)),
                acceleration,
                comfy.status_text(unique_id),
            )
        text = "; ".join([describe(bank.name), *session.notes])
        # "bank": which bank the status describes, so the frontend can show that bank's new
        # state on this node when the bank is reset (the frontend gets every ui key)
        return {"ui": {"text": [text], "bank": [bank.name]}, "result": (outputs,)}
