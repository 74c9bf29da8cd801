"""Releasing the pack's memory: a node, two routes, and ComfyUI's own "unload models".

The pack's diffusers model is invisible to ComfyUI's model manager, so ``/free`` alone would
not release it; wrapping ``unload_all_models`` makes ComfyUI's "unload models" (and
``POST /free {"unload_models": true}``) release ours too.
"""

from __future__ import annotations

from . import comfy
from .state import SESSIONS, log, release_models


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
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": (
                    "IMAGE",
                    {"tooltip": "Images to wait for (e.g. the sampler's output); passed through."},
                )
            }
        }

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return comfy.every_run()

    def free(self, images):
        released = release_models()
        text = "released the StreamV2V model" if released else "no StreamV2V model was loaded"
        return {"ui": {"text": [text]}, "result": (images,)}


def hook_unload_models() -> None:
    """Make ComfyUI's unload_all_models release our model too (once)."""
    import comfy.model_management as mm

    original = mm.unload_all_models
    if getattr(original, "_streamv2v", False):
        return

    def unload_all_models(*args, **kwargs):
        if release_models():
            log.info("StreamV2V: released its model with ComfyUI's unload")
        return original(*args, **kwargs)

    unload_all_models._streamv2v = True
    mm.unload_all_models = unload_all_models


def add_routes() -> None:
    from aiohttp import web
    from server import PromptServer

    from ..streamv2v.errors import StreamV2VError
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

    @routes.post("/streamv2v/bank/reset")
    async def reset(request):
        try:
            body = await request.json()
            name = body.get("name", "") if isinstance(body, dict) else ""
            done = SESSIONS.reset(name)
        except (ValueError, StreamV2VError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        # done: True now, False when the run using the bank ends, None: no bank of that name
        return web.json_response({"reset": done, "text": describe(name)})

    @routes.post("/streamv2v/free")
    async def free(request):
        return web.json_response({"released": release_models()})
