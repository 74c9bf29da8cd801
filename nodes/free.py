"""Releasing the pack's memory: a node, two routes, and ComfyUI's own memory manager.

The pack's diffusers model is invisible to ComfyUI's model manager, which frees room for the
models it loads (and for "unload models") by unloading only its own. Wrapping its
``free_memory`` lets it release ours too when its own were not enough.
"""

from __future__ import annotations

import asyncio

import torch

from ..streamv2v.loading import resolve_device
from . import comfy
from .state import MODELS, SESSIONS, log, release_models


class StreamV2VFree:
    DESCRIPTION = (
        "Releases the StreamV2V model from memory once its input is ready (put it after the "
        "sampler); banks are kept. ComfyUI's 'Unload models' does the same."
    )
    CATEGORY = "StreamV2V"
    FUNCTION = "free"
    OUTPUT_NODE = True
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The input images, passed through.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "images": (
                    "IMAGE",
                    {"tooltip": "Images to wait for (e.g. the sampler's output); passed through."},
                )
            }
        }

    @classmethod
    def IS_CHANGED(cls, **kwargs) -> int:
        return comfy.every_run()

    def free(self, images: torch.Tensor) -> dict:
        released = release_models()
        text = "released the StreamV2V model" if released else "no StreamV2V model was loaded"
        return {"ui": {"text": [text]}, "result": (images,)}


def hook_free_memory() -> None:
    """Have ComfyUI's memory manager release our model when it needs the room (once).

    ComfyUI unloads its own models first. If the device still lacks the room asked for, our
    model goes too, unless the running prompt has StreamV2V nodes: releasing it there would
    reload it at every run, where ComfyUI's low-VRAM loading copes. "Unload models" asks for
    more room than any device has, so it always releases ours (between prompts).
    """
    import comfy.model_management as mm

    original = mm.free_memory
    if getattr(original, "_streamv2v", False):
        return

    def free_memory(memory_required, device, *args, **kwargs):
        unloaded = original(memory_required, device, *args, **kwargs)
        spec = MODELS.loaded
        if (
            spec is not None
            and _same_device(resolve_device(spec.device), torch.device(device))
            and mm.get_free_memory(device) < memory_required
            and not _prompt_runs_pack()
            and release_models()
        ):
            log.info(
                "StreamV2V: released its model for ComfyUI (Unload Models, or room for a model)"
            )
            mm.soft_empty_cache()
        return unloaded

    free_memory._streamv2v = True
    mm.free_memory = free_memory


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:N`` name one GPU when N is the current one."""
    current = torch.cuda.current_device() if a.type == "cuda" else 0
    return a.type == b.type and (current if a.index is None else a.index) == (
        current if b.index is None else b.index
    )


def _prompt_runs_pack() -> bool:
    """Whether the prompt ComfyUI is running has one of the pack's nodes."""
    from server import PromptServer

    from . import NODE_CLASS_MAPPINGS

    running, _ = PromptServer.instance.prompt_queue.get_current_queue_volatile()
    return any(
        isinstance(node, dict) and node.get("class_type") in NODE_CLASS_MAPPINGS
        for item in running
        for node in item[2].values()
    )


def add_routes() -> None:
    from aiohttp import web
    from server import PromptServer

    from ..streamv2v.bank import BankConfig
    from ..streamv2v.errors import StreamV2VError
    from ..streamv2v.session import validate_bank_name
    from .bank import describe

    routes = PromptServer.instance.routes

    @routes.get("/streamv2v/banks")
    async def banks(request):
        return web.json_response(
            {
                name: {**SESSIONS.find(name).stats(), "text": describe(name)}
                for name in SESSIONS.names()
            }
        )

    @routes.get("/streamv2v/bank")
    async def bank(request):
        # What a Feature Bank node named `name` shows now, with its `kind` (optional): the
        # frontend asks when the node's name or kind changes and when a workflow opens, since
        # banks outlive both. A name no run has used yet reads as an empty bank.
        kind = request.query.get("kind") or None
        try:
            name = validate_bank_name(request.query.get("name", ""))
            if kind is not None:
                BankConfig(kind=kind)  # the engine's own check and message
        except StreamV2VError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"text": describe(name, kind)})

    @routes.post("/streamv2v/bank/reset")
    async def reset(request):
        try:
            body = await request.json()
            name = validate_bank_name(body.get("name", "") if isinstance(body, dict) else "")
            done = SESSIONS.reset(name)
        except (ValueError, StreamV2VError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        # done: True now, False when the run using the bank ends, None: no bank of that name
        return web.json_response({"reset": done, "text": describe(name)})

    @routes.post("/streamv2v/free")
    async def free(request):
        # on a thread: releasing waits for a live camera's frame under way
        return web.json_response({"released": await asyncio.to_thread(release_models)})
