"""ComfyUI nodes over the StreamV2V engine: widgets in, one engine call, pack types out.

Importing this package needs no ComfyUI (tests, tools); inside ComfyUI it also adds the
pack's routes and hooks ComfyUI's memory manager.
"""

from .bank import StreamV2VFeatureBank
from .consistency import StreamV2VTemporalConsistency
from .free import StreamV2VFree, add_routes, hook_free_memory
from .live import add_live_route
from .loaders import StreamV2VLoadLoRA, StreamV2VLoadModel, StreamV2VPatchAttention
from .sampler import StreamV2VSampler
from .state import log

NODE_CLASS_MAPPINGS: dict[str, type] = {
    "StreamV2VLoadModel": StreamV2VLoadModel,
    "StreamV2VLoadLoRA": StreamV2VLoadLoRA,
    "StreamV2VPatchAttention": StreamV2VPatchAttention,
    "StreamV2VFeatureBank": StreamV2VFeatureBank,
    "StreamV2VSampler": StreamV2VSampler,
    "StreamV2VFree": StreamV2VFree,
    "StreamV2VTemporalConsistency": StreamV2VTemporalConsistency,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "StreamV2VLoadModel": "Load LCM Model (StreamV2V)",
    "StreamV2VLoadLoRA": "Load LoRA (StreamV2V)",
    "StreamV2VPatchAttention": "Patch Attention (StreamV2V)",
    "StreamV2VFeatureBank": "Feature Bank (StreamV2V)",
    "StreamV2VSampler": "Stream Batch Sampler (StreamV2V)",
    "StreamV2VFree": "Free Memory (StreamV2V)",
    "StreamV2VTemporalConsistency": "Temporal Consistency (StreamV2V)",
}

try:
    import server  # noqa: F401  (present only inside a running ComfyUI)
except ImportError:
    pass
else:
    add_routes()
    add_live_route()
    hook_free_memory()
    log.info("StreamV2V: routes added, ComfyUI's memory manager releases the pack's model")
