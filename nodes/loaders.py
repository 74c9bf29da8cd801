"""Model nodes: load an LCM model, add LoRAs, patch attention. Each returns a new value."""

from __future__ import annotations

from dataclasses import replace

from ..streamv2v.session import AttentionPatch, ModelSpec, PatchedModel
from . import comfy
from .state import MODELS

MODEL = "STREAMV2V_MODEL"
DTYPES = ["auto", "fp16", "bf16", "fp32"]
LOAD_LORA = "StreamV2VLoadLoRA"
HIDDEN = {"unique_id": "UNIQUE_ID", "graph": "PROMPT"}


def feeds_only_loras(graph: dict | None, node_id: str | None) -> bool:
    """Whether every node of the queued workflow (``graph``, ComfyUI's API prompt) that takes
    this node's model is a Load LoRA. Loaders load eagerly, so a bad file is named on the
    node that holds it; in a LoRA chain only its last node does, or the first run would load
    the base model once for each link of the chain."""
    if not isinstance(graph, dict) or node_id is None:
        return False
    consumers = [
        node.get("class_type")
        for node in graph.values()
        if isinstance(node, dict)
        and any(
            isinstance(value, list) and len(value) == 2 and str(value[0]) == str(node_id)
            for value in node.get("inputs", {}).values()
        )
    ]
    return bool(consumers) and all(kind == LOAD_LORA for kind in consumers)


class StreamV2VLoadModel:
    DESCRIPTION = (
        "Loads an SD1.5-family model for StreamV2V: an LCM model, or any SD1.5 checkpoint plus "
        "the LCM-LoRA. Loads once and is reused by every run."
    )
    CATEGORY = "StreamV2V"
    FUNCTION = "load"
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The loaded model, for Patch Attention, Load LoRA or the sampler.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": (
                    comfy.model_choices(),
                    {
                        "tooltip": "An SD1.5 checkpoint (models/checkpoints) or an LCM diffusers "
                        "folder (models/diffusers)."
                    },
                ),
                "lcm_lora": (
                    ["none", *comfy.lora_choices()],
                    {
                        "tooltip": "The LCM-LoRA for SD1.5 (models/loras); 'none' for a model that "
                        "is already an LCM one."
                    },
                ),
                "lcm_lora_strength": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": -2.0,
                        "max": 2.0,
                        "step": 0.05,
                        "tooltip": "Weight of the LCM-LoRA (only with an LCM-LoRA chosen).",
                    },
                ),
                "vae": (
                    comfy.vae_choices(),
                    {
                        "tooltip": "taesd: the tiny autoencoder (models/vae_approx), fastest, the "
                        "paper's choice; the model's own VAE; or a VAE file (models/vae)."
                    },
                ),
                "dtype": (
                    DTYPES,
                    {"tooltip": "Precision; auto is fp16 on a GPU and fp32 on the CPU."},
                ),
            },
            "hidden": HIDDEN,
        }

    def load(
        self,
        model: str,
        lcm_lora: str,
        lcm_lora_strength: float,
        vae: str,
        dtype: str,
        unique_id: str | None = None,
        graph: dict | None = None,
    ) -> tuple[PatchedModel]:
        from ..streamv2v.errors import StreamV2VError

        if lcm_lora == "none" and lcm_lora_strength != 1.0:
            raise StreamV2VError(
                "lcm_lora_strength has no effect without an LCM-LoRA: pick one or leave it at 1.0"
            )
        spec = ModelSpec(
            model=comfy.resolve_model(model),
            lcm_lora=None if lcm_lora == "none" else comfy.resolve_lora(lcm_lora),
            lcm_lora_weight=lcm_lora_strength,
            vae=comfy.resolve_vae(vae),
            dtype=None if dtype == "auto" else dtype,
            device=comfy.device(),
        )
        if feeds_only_loras(graph, unique_id):
            spec.check()  # the chain's last Load LoRA loads it all; bad files are named here
        else:
            MODELS.get(spec)  # load now, so a bad file is reported on this node
        return (PatchedModel(spec),)


class StreamV2VLoadLoRA:
    DESCRIPTION = "Adds a style LoRA to a StreamV2V model (chain several). The input is unchanged."
    CATEGORY = "StreamV2V"
    FUNCTION = "apply"
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = (
        "The model with this LoRA fused in (loaded by the last Load LoRA of a chain).",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": (MODEL, {"tooltip": "The model to add the LoRA to."}),
                "lora_name": (
                    comfy.lora_choices() or [comfy.NO_LORAS],
                    {"tooltip": "An SD1.5 LoRA (models/loras)."},
                ),
                "strength": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": -4.0,
                        "max": 4.0,
                        "step": 0.05,
                        "tooltip": "LoRA weight; negative values push away from its style.",
                    },
                ),
            },
            "hidden": HIDDEN,
        }

    def apply(
        self,
        model: PatchedModel,
        lora_name: str,
        strength: float,
        unique_id: str | None = None,
        graph: dict | None = None,
    ) -> tuple[PatchedModel]:
        from ..streamv2v.loading import LoraSpec, check_lora_file

        lora = LoraSpec(comfy.resolve_lora(lora_name), strength)
        check_lora_file(lora)  # a wrong file is named on this node, not on the sampler
        styled = replace(model, spec=model.spec.with_lora(lora.path, strength))
        if not feeds_only_loras(graph, unique_id):
            MODELS.get(styled.spec)  # the model with the whole chain, once; errors shown here
        return (styled,)


class StreamV2VPatchAttention:
    DESCRIPTION = (
        "How self-attention uses the feature bank: extended attention over past frames' keys "
        "and values, and feature fusion in the low-resolution decoder layers. The input model "
        "is unchanged, so one model can feed differently patched branches."
    )
    CATEGORY = "StreamV2V"
    FUNCTION = "patch"
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with these attention settings.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": (MODEL, {"tooltip": "The model to patch."}),
                "extended_attention": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "Attend to the bank's keys and values too "
                        "(the paper's extended self-attention).",
                    },
                ),
                "feature_fusion": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "Blend each output token with its most similar "
                        "bank token in the mid and first up blocks.",
                    },
                ),
                "fusion_strength": (
                    "FLOAT",
                    {
                        "default": 0.8,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.05,
                        "tooltip": "Weight of the bank token in a fused token (paper: 0.8).",
                    },
                ),
                "fusion_threshold": (
                    "FLOAT",
                    {
                        "default": 0.98,
                        "min": -1.0,
                        "max": 1.0,
                        "step": 0.005,
                        "tooltip": "Cosine similarity needed to fuse a bank token (paper: 0.98).",
                    },
                ),
            }
        }

    def patch(
        self,
        model: PatchedModel,
        extended_attention: bool,
        feature_fusion: bool,
        fusion_strength: float,
        fusion_threshold: float,
    ) -> tuple[PatchedModel]:
        patch = AttentionPatch(
            extended_attention, feature_fusion, fusion_strength, fusion_threshold
        )
        return (replace(model, patch=patch),)
