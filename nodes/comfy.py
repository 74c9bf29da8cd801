"""The few ComfyUI services the nodes use, imported when a node runs.

Importing them at module level would make the pack unimportable without ComfyUI (tests,
tools); ComfyUI itself has them in ``sys.modules`` by the time any node runs.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..streamv2v.errors import StreamV2VError

_RUNS = itertools.count()


def every_run() -> int:
    """An IS_CHANGED value that differs at every call, so the node runs every time.

    Not NaN (the usual idiom): ComfyUI stores the value in the prompt, its history is sent as
    JSON, and NaN is not JSON (the frontend's queue then fails to load).
    """
    return next(_RUNS)


NO_MODELS = "no models found"
NO_LORAS = "no LoRAs found"
MODEL_OWN_VAE = "model's own"
TAESD = "taesd"
DIFFUSERS_PREFIX = "diffusers/"


def _folder_paths():
    import folder_paths

    return folder_paths


def recordings_folder() -> Path:
    """Where live recordings go: ComfyUI's output folder, as for Save Image and Save Video."""
    return Path(_folder_paths().get_output_directory()) / "streamv2v"


def _files(kind: str) -> list[str]:
    fp = _folder_paths()
    try:
        return list(fp.get_filename_list(kind))
    except KeyError:
        return []


def _folders(kind: str) -> list[str]:
    try:
        return list(_folder_paths().get_folder_paths(kind))
    except KeyError:
        return []


def diffusers_models() -> dict[str, Path]:
    """``diffusers/<name>`` -> folder, for every folder with a model_index.json."""
    found: dict[str, Path] = {}
    for root in _folders("diffusers"):
        root_path = Path(root)
        if not root_path.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root_path, followlinks=True):
            if "model_index.json" in filenames:
                rel = Path(dirpath).relative_to(root_path).as_posix()
                found.setdefault(DIFFUSERS_PREFIX + rel, Path(dirpath))
                dirnames.clear()  # a pipeline's subfolders are its components
    return found


def model_choices() -> list[str]:
    choices = _files("checkpoints") + sorted(diffusers_models())
    return choices or [NO_MODELS]


def resolve_model(choice: str) -> str:
    if choice == NO_MODELS:
        raise StreamV2VError(
            "no models found: put an SD1.5 checkpoint in "
            f"{' or '.join(_folders('checkpoints')) or 'models/checkpoints'}, or an LCM diffusers "
            f"folder in {' or '.join(_folders('diffusers')) or 'models/diffusers'}, then press R "
            "to refresh"
        )
    if choice.startswith(DIFFUSERS_PREFIX):
        folder = diffusers_models().get(choice)
        if folder is None:
            raise StreamV2VError(f"diffusers model {choice!r} is gone: pick another and refresh")
        return str(folder)
    return _full_path("checkpoints", choice)


def _full_path(kind: str, name: str) -> str:
    path = _folder_paths().get_full_path(kind, name)
    if path is None:
        raise StreamV2VError(
            f"{name!r} is not in {' or '.join(_folders(kind)) or kind}: pick a file from the list "
            "(press R to refresh it)"
        )
    return path


def lora_choices() -> list[str]:
    return _files("loras")


def resolve_lora(name: str) -> str:
    if name == NO_LORAS:
        folders = " or ".join(_folders("loras")) or "models/loras"
        raise StreamV2VError(
            f"no LoRAs found: put an SD1.5 LoRA in {folders} (then press R to refresh), or "
            "remove the Load LoRA node"
        )
    return _full_path("loras", name)


def _taesd_encoder() -> str | None:
    """The SD1.x TAESD encoder file, when its decoder sits beside it in vae_approx."""
    names = [Path(n) for n in _files("vae_approx")]
    for name in names:
        if name.name.startswith("taesd_encoder.") and any(
            other.name.startswith("taesd_decoder.") and other.parent == name.parent
            for other in names
        ):
            return _full_path("vae_approx", name.as_posix())
    return None


def vae_choices() -> list[str]:
    # taesd is listed even before its files are there: the examples choose it, and a run then
    # says where the files go (resolve_vae) instead of ComfyUI's "Value not in list".
    return [TAESD, MODEL_OWN_VAE] + _files("vae")


def resolve_vae(choice: str) -> str | None:
    if choice == MODEL_OWN_VAE:
        return None
    if choice == TAESD:
        encoder = _taesd_encoder()
        if encoder is None:
            raise StreamV2VError(
                "TAESD needs taesd_encoder and taesd_decoder files in "
                f"{' or '.join(_folders('vae_approx')) or 'models/vae_approx'}: download both from "
                "huggingface.co/madebyollin/taesd (then press R), or pick another vae"
            )
        return encoder
    return _full_path("vae", choice)


PREVIEW_EVERY_S = 0.25  # a JPEG preview per quarter second: enough to watch, cheap to send


class Progress:
    """ComfyUI's progress bar with a throttled preview, and the interrupt check per frame."""

    def __init__(self, total: int) -> None:
        import comfy.utils

        self.bar = comfy.utils.ProgressBar(total)
        self.last = 0.0

    def __call__(self, done: int, total: int, image: torch.Tensor | None) -> None:
        import comfy.model_management

        comfy.model_management.throw_exception_if_processing_interrupted()
        now = time.monotonic()
        preview = None
        if image is not None and (now - self.last >= PREVIEW_EVERY_S or done == total):
            from PIL import Image

            self.last = now
            # in place after one product: a third of the time of four new tensors (webcam runs)
            array = (image * 255).round_().clamp_(0, 255).to(torch.uint8).numpy()
            preview = ("JPEG", Image.fromarray(array), 512)
        self.bar.update_absolute(done, total, preview)


def device() -> str:
    """ComfyUI's chosen device (honours --cpu, --gpu-only, ...)."""
    import comfy.model_management

    return str(comfy.model_management.get_torch_device())


def running_prompt_id() -> str | None:
    """The id of the queued run ComfyUI is executing (its execution context), or None."""
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None
    context = get_executing_context()
    return None if context is None else context.prompt_id


def status_text(node_id: str | None) -> Callable[[str], None]:
    """Show a message under the running node (ComfyUI's progress text), e.g. "compiling"."""

    def show(text: str) -> None:
        from server import PromptServer

        server = PromptServer.instance
        if node_id is not None and hasattr(server, "send_progress_text"):
            server.send_progress_text(text, node_id)

    return show
