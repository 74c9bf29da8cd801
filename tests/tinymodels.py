"""Tiny random SD1.5-shaped models and every on-disk format users hand us.

The real models are gigabytes and live on a hub we must never reach from tests, so the
tests build miniature ones with the same *structure* (block layout, which layers have
self-attention, key names, LDM single-file layout, LoRA and TAESD file layouts) and
random weights from fixed seeds. Structure is what loading and the feature bank depend
on; the numbers only have to be reproducible.

The diffusers -> original (LDM/CompVis) key mapping below is the inverse of diffusers'
single-file conversion, written independently so that a round trip through
``from_single_file`` checks both directions.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = REPO_ROOT / "streamv2v" / "configs" / "sd15" / "tokenizer"

UNET_LAYERS_PER_BLOCK = 2  # as in SD1.5, so the UNet has SD1.5's 16 self-attention layers
VAE_LAYERS_PER_BLOCK = 1
LATENT_CHANNELS = 4
VAE_SCALING_FACTOR = 0.18215
CROSS_ATTENTION_DIM = 32
SD15_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def tiny_unet(seed: int = 0, in_channels: int = 4) -> UNet2DConditionModel:
    """SD1.5 block layout (self-attention everywhere except up_blocks.0), tiny channels."""
    _seeded(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=UNET_LAYERS_PER_BLOCK,
        norm_num_groups=8,
        attention_head_dim=4,
        cross_attention_dim=CROSS_ATTENTION_DIM,
    ).eval()


def tiny_text_encoder(seed: int = 1) -> CLIPTextModel:
    """A CLIP text tower small enough for CPU but with the real vocabulary and context length."""
    _seeded(seed)
    config = CLIPTextConfig(
        hidden_size=CROSS_ATTENTION_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=49408,
        max_position_embeddings=77,
        projection_dim=CROSS_ATTENTION_DIM,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config).eval()


def tiny_vae(seed: int = 2) -> AutoencoderKL:
    """Four blocks like SD1.5's VAE, so images are 8x the latent size."""
    _seeded(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=VAE_LAYERS_PER_BLOCK,
        norm_num_groups=4,
        latent_channels=LATENT_CHANNELS,
        sample_size=64,
        scaling_factor=VAE_SCALING_FACTOR,
    ).eval()


def tiny_taesd(seed: int = 3, full_size: bool = False) -> AutoencoderTiny:
    """TAESD; ``full_size`` gives the real TAESD structure (64 channels, 1-3-3-3 blocks)."""
    _seeded(seed)
    if full_size:
        return AutoencoderTiny(latent_channels=LATENT_CHANNELS).eval()
    return AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=LATENT_CHANNELS,
    ).eval()


def tiny_scheduler() -> PNDMScheduler:
    return PNDMScheduler(**SD15_SCHEDULER)


def shipped_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True)


def tiny_pipeline(seed: int = 0, in_channels: int = 4) -> StableDiffusionPipeline:
    """The source model every on-disk artifact is written from (same seed, same weights)."""
    return StableDiffusionPipeline(
        vae=tiny_vae(seed + 2),
        text_encoder=tiny_text_encoder(seed + 1),
        tokenizer=shipped_tokenizer(),
        unet=tiny_unet(seed, in_channels=in_channels),
        scheduler=tiny_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# --- diffusers pipeline folder ------------------------------------------------------------


def write_diffusers_dir(pipe: StableDiffusionPipeline, path: Path) -> Path:
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path


# --- original (LDM) single-file layout ------------------------------------------------------

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _unet_key_to_ldm(key: str, up_has_attention: list[bool]) -> str:
    """One diffusers UNet key -> its LDM name (SD1.5 layout, any ``layers_per_block``)."""
    step = UNET_LAYERS_PER_BLOCK + 1
    parts = key.split(".")
    module, leaf = ".".join(parts[:-1]), parts[-1]
    if module in _UNET_TOP:
        return f"{_UNET_TOP[module]}.{leaf}"
    if parts[0] == "down_blocks":
        block, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":  # down_blocks.b.downsamplers.0.conv.<leaf>
            return f"input_blocks.{(block + 1) * step}.0.op.{leaf}"
        index = 1 + block * step + int(parts[3])
        rest = parts[4:]
        if kind == "resnets":
            return f"input_blocks.{index}.0.{_UNET_RESNET[rest[0]]}.{leaf}"
        return f"input_blocks.{index}.1." + ".".join(rest)
    if parts[0] == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), parts[3:]
        if kind == "resnets":
            return f"middle_block.{2 * index}.{_UNET_RESNET[rest[0]]}.{leaf}"
        return "middle_block.1." + ".".join(rest)
    if parts[0] == "up_blocks":
        block, kind = int(parts[1]), parts[2]
        if kind == "upsamplers":
            slot = 2 if up_has_attention[block] else 1
            return f"output_blocks.{block * step + step - 1}.{slot}.conv.{leaf}"
        index = block * step + int(parts[3])
        rest = parts[4:]
        if kind == "resnets":
            return f"output_blocks.{index}.0.{_UNET_RESNET[rest[0]]}.{leaf}"
        return f"output_blocks.{index}.1." + ".".join(rest)
    raise KeyError(f"no LDM name for UNet key {key}")


_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def _vae_key_to_ldm(key: str, num_blocks: int) -> str:
    """One diffusers AutoencoderKL key -> its LDM name (``first_stage_model.`` not included)."""
    parts = key.split(".")
    side, leaf = parts[0], parts[-1]
    if side in ("quant_conv", "post_quant_conv"):
        return key
    inner = parts[1:-1]
    head = inner[0]
    if head in ("conv_in", "conv_out"):
        return f"{side}.{head}.{leaf}"
    if head == "conv_norm_out":
        return f"{side}.norm_out.{leaf}"
    if head == "mid_block":
        if inner[1] == "resnets":
            return f"{side}.mid.block_{int(inner[2]) + 1}.{inner[3]}.{leaf}"
        return f"{side}.mid.attn_1.{_VAE_ATTENTION['.'.join(inner[3:])]}.{leaf}"
    block = int(inner[1])
    if head == "down_blocks":
        prefix = f"encoder.down.{block}"
    else:
        prefix = f"decoder.up.{num_blocks - 1 - block}"
    if inner[2] in ("downsamplers", "upsamplers"):
        sampler = "downsample" if head == "down_blocks" else "upsample"
        return f"{prefix}.{sampler}.conv.{leaf}"
    layer = inner[4].replace("conv_shortcut", "nin_shortcut")
    return f"{prefix}.block.{inner[3]}.{layer}.{leaf}"


def ldm_state_dict(pipe: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    """The pipeline's weights in the original Stable Diffusion checkpoint layout."""
    out: dict[str, torch.Tensor] = {}
    up_has_attention = [hasattr(block, "attentions") for block in pipe.unet.up_blocks]
    for key, value in pipe.unet.state_dict().items():
        out["model.diffusion_model." + _unet_key_to_ldm(key, up_has_attention)] = value
    num_blocks = len(pipe.vae.config.block_out_channels)
    for key, value in pipe.vae.state_dict().items():
        ldm = _vae_key_to_ldm(key, num_blocks)
        if ".mid.attn_1." in ldm and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's VAE attention uses 1x1 convs
        out["first_stage_model." + ldm] = value
    for key, value in pipe.text_encoder.state_dict().items():
        out["cond_stage_model.transformer.text_model." + key.removeprefix("text_model.")] = value
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def write_single_file(pipe: StableDiffusionPipeline, path: Path) -> Path:
    save_file(ldm_state_dict(pipe), str(path))
    return path


def write_vae_single_file(pipe: StableDiffusionPipeline, path: Path) -> Path:
    """The VAE alone in original layout without prefix, as standalone VAE files ship."""
    prefix = "first_stage_model."
    vae = {
        k.removeprefix(prefix): v for k, v in ldm_state_dict(pipe).items() if k.startswith(prefix)
    }
    save_file(vae, str(path))
    return path


def write_ckpt(pipe: StableDiffusionPipeline, path: Path) -> Path:
    torch.save({"state_dict": ldm_state_dict(pipe)}, str(path))
    return path


# --- LoRA files -----------------------------------------------------------------------------

LORA_RANK = 4
LORA_ALPHA = 2.0
LORA_KOHYA_SEED = 10  # seeds of the conftest LoRA files, to recompute their deltas
LORA_DIFFUSERS_SEED = 11
LCM_LORA_SEED = 12


_UNET_LORA_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
_TEXT_LORA_SUFFIXES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _lora_roots(pipe: StableDiffusionPipeline) -> dict[str, torch.nn.Module]:
    """The module each component's LoRA names are relative to. The text encoder's names
    (``encoder.layers.N...``) are the CLIP text transformer's: transformers 4 nests it in
    CLIPTextModel as ``text_model``, transformers 5 releases make CLIPTextModel that module."""
    text = pipe.text_encoder
    return {"unet": pipe.unet, "text_encoder": getattr(text, "text_model", text)}


def lora_target(pipe: StableDiffusionPipeline, key: str) -> torch.nn.Module:
    """The module a ``unet.<module>`` / ``text_encoder.<module>`` key of ``lora_deltas`` names."""
    component, name = key.split(".", 1)
    return _lora_roots(pipe)[component].get_submodule(name)


def lora_target_modules(pipe: StableDiffusionPipeline) -> tuple[list[str], list[str]]:
    """What kohya's sd-scripts trains: every transformer-block linear and the 1x1-conv
    ``proj_in``/``proj_out`` in the UNet, attention and MLP linears in the text encoder."""
    roots = _lora_roots(pipe)
    unet = [
        name
        for name, module in roots["unet"].named_modules()
        if "attentions" in name
        and (
            (isinstance(module, torch.nn.Linear) and name.endswith(_UNET_LORA_SUFFIXES))
            or name.endswith(("proj_in", "proj_out"))
        )
    ]
    text = [
        name
        for name, module in roots["text_encoder"].named_modules()
        if isinstance(module, torch.nn.Linear) and name.endswith(_TEXT_LORA_SUFFIXES)
    ]
    return unet, text


def _lora_pair(
    module: torch.nn.Module, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) shaped as the layer's weight is: 2-D for Linear, 1x1 kernels for Conv2d."""
    weight = module.weight
    down = torch.randn(LORA_RANK, weight.shape[1], generator=generator) * 0.1
    up = torch.randn(weight.shape[0], LORA_RANK, generator=generator) * 0.1
    if weight.ndim == 4:
        down, up = down[:, :, None, None], up[:, :, None, None]
    return down, up


def lora_delta(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``up @ down`` shaped like the layer's weight."""
    delta = up.flatten(1) @ down.flatten(1)
    return delta[:, :, None, None] if down.ndim == 4 else delta


def lora_deltas(
    pipe: StableDiffusionPipeline, seed: int, text_encoder: bool = True
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Reproducible (down, up) per target, keyed ``unet.<module>`` / ``text_encoder.<module>``.

    The same seed gives the same matrices in every file format, so tests can compute the
    expected ``W + weight * scale * up @ down`` from this alone.
    """
    generator = torch.Generator().manual_seed(seed)
    unet_targets, text_targets = lora_target_modules(pipe)
    keys = [f"unet.{name}" for name in unet_targets]
    if text_encoder:
        keys += [f"text_encoder.{name}" for name in text_targets]
    return {key: _lora_pair(lora_target(pipe, key), generator) for key in keys}


def write_lora_kohya(
    pipe: StableDiffusionPipeline, path: Path, seed: int, text_encoder: bool = True
) -> Path:
    """kohya-ss sd-scripts layout; effective scale ``LORA_ALPHA / LORA_RANK``."""
    tensors: dict[str, torch.Tensor] = {}
    for target, (down, up) in lora_deltas(pipe, seed, text_encoder).items():
        component, module = target.split(".", 1)
        if component == "unet":
            name = "lora_unet_" + module.replace(".", "_")
        else:
            name = "lora_te_text_model_" + module.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = down.contiguous()
        tensors[f"{name}.lora_up.weight"] = up.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(LORA_ALPHA)
    save_file(tensors, str(path))
    return path


def write_lora_diffusers(
    pipe: StableDiffusionPipeline, path: Path, seed: int, text_encoder: bool = True
) -> Path:
    """diffusers/peft layout (``lora_A``/``lora_B``, no alpha: effective scale 1)."""
    tensors: dict[str, torch.Tensor] = {}
    for target, (down, up) in lora_deltas(pipe, seed, text_encoder).items():
        component, module = target.split(".", 1)
        if component == "text_encoder":
            module = "text_model." + module
        tensors[f"{component}.{module}.lora_A.weight"] = down.contiguous()
        tensors[f"{component}.{module}.lora_B.weight"] = up.contiguous()
    save_file(tensors, str(path))
    return path


# --- TAESD ----------------------------------------------------------------------------------


def taesd_original_state_dicts(
    taesd: AutoencoderTiny,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(encoder, decoder) in madebyollin's layout: the original decoder starts with a
    parameter-free Clamp at index 0, so its indices are diffusers' ``decoder.layers`` + 1."""
    encoder: dict[str, torch.Tensor] = {}
    decoder: dict[str, torch.Tensor] = {}
    for key, value in taesd.state_dict().items():
        value = value.detach().clone().contiguous()
        if key.startswith("encoder.layers."):
            encoder[key.removeprefix("encoder.layers.")] = value
        elif key.startswith("decoder.layers."):
            index, rest = key.removeprefix("decoder.layers.").split(".", 1)
            decoder[f"{int(index) + 1}.{rest}"] = value
    return encoder, decoder


def write_taesd_vae_approx(taesd: AutoencoderTiny, folder: Path, fmt: str = "safetensors") -> Path:
    """ComfyUI ``models/vae_approx`` style: ``taesd_encoder.<fmt>`` + ``taesd_decoder.<fmt>``."""
    folder.mkdir(parents=True, exist_ok=True)
    encoder, decoder = taesd_original_state_dicts(taesd)
    for name, sd in (("taesd_encoder", encoder), ("taesd_decoder", decoder)):
        if fmt == "safetensors":
            save_file(sd, str(folder / f"{name}.safetensors"))
        else:
            torch.save(sd, str(folder / f"{name}.{fmt}"))
    return folder


def write_taesd_diffusers(taesd: AutoencoderTiny, folder: Path) -> Path:
    taesd.save_pretrained(str(folder), safe_serialization=True)
    return folder


# --- unsupported and broken files -----------------------------------------------------------

# Only the keys that identify each family, as tiny fp16 tensors (with the real size only
# where a size is the tell); the loader must reject these before reading anything else.
_FAMILY_KEYS: dict[str, dict[str, tuple[int, ...]]] = {
    "sdxl": {
        "model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
        "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (8,),
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (
            77,
            8,
        ),
    },
    "sd2": {
        "model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
        "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (1, 1024),
        "cond_stage_model.model.token_embedding.weight": (8, 1024),
    },
    "sd3": {
        "model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,),
        "model.diffusion_model.pos_embed": (1, 4, 8),
    },
    "flux": {
        "model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": (8,),
        "model.diffusion_model.img_in.weight": (8, 64),
    },
}


def write_fake_checkpoint(family: str, path: Path) -> Path:
    """A single file that only *looks* like ``family`` (one of sdxl, sd2, sd3, flux)."""
    tensors = {
        key: torch.zeros(shape, dtype=torch.float16) for key, shape in _FAMILY_KEYS[family].items()
    }
    save_file(tensors, str(path))
    return path


def write_truncated(source: Path, path: Path) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_inpainting_dir(source_dir: Path, path: Path) -> Path:
    """A diffusers folder whose UNet config says 9 input channels (an inpainting model)."""
    shutil.copytree(source_dir, path)
    config_path = path / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["in_channels"] = 9
    config_path.write_text(json.dumps(config))
    return path
