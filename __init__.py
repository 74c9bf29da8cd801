"""ComfyUI's entry point for the pack.

ComfyUI imports this folder as a package registered under a name made from its path, so
only relative imports work here and in ``nodes``. Importing must succeed without ComfyUI
too: the tests load this file the way ComfyUI does.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

# Every .js under web/ is served at /extensions/<folder>/ and loaded by ComfyUI's frontend.
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
