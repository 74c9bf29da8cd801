"""StreamV2V: streaming video-to-video translation with a feature bank, on diffusers.

The engine of ComfyUI-StreamV2V, usable on its own (``python -m streamv2v``) and free of any
ComfyUI import. Typical use::

    from streamv2v import StreamConfig, StreamV2V, load_model

    model = load_model("DreamShaper_8_pruned.safetensors", lcm_lora="lcm-lora-sdv1-5.safetensors",
                       vae="models/vae_approx")
    stream = StreamV2V(model, StreamConfig(), prompt="a watercolor painting")
    for frame in stream.process(frames):  # one output per input, aligned
        ...
"""

import torch

if not hasattr(torch.library, "custom_op"):  # the bank's and the kernel's operators are ones
    raise ImportError(
        f"ComfyUI-StreamV2V needs PyTorch 2.4 or newer, and this Python has torch "
        f"{torch.__version__}: update PyTorch (for ComfyUI, update ComfyUI and its requirements)"
    )

from .bank import BankConfig, FeatureBank
from .errors import StreamV2VError
from .loading import LoraSpec, StreamModel, load_model
from .stream import StreamConfig, StreamV2V

__all__ = [
    "BankConfig",
    "FeatureBank",
    "LoraSpec",
    "StreamConfig",
    "StreamModel",
    "StreamV2V",
    "StreamV2VError",
    "load_model",
]
