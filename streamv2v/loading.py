"""Load an SD1.5-family model from the user's disk, ready for streaming.

Users arrive with whatever their other tools use: a diffusers folder, a single-file
checkpoint from ComfyUI's ``checkpoints`` folder, LoRAs in kohya or diffusers layout,
TAESD as ComfyUI keeps it in ``vae_approx``. All of it is turned into one plain
``StableDiffusionPipeline`` whose LoRAs are fused into the weights, so the per-frame
step runs ordinary layers (no adapter indirection, nothing that defeats compilation).

Nothing here may reach a model hub: single files are built against the SD1.5 configs
shipped in ``streamv2v/configs/sd15`` and every diffusers call gets ``local_files_only``.
The model family is identified from key names and config values *before* anything
heavy is read, so an SDXL or SD3 file fails in milliseconds with a message saying so.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import StreamV2VError, one_line

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

SHIPPED_SD15_DIR = Path(__file__).resolve().parent / "configs" / "sd15"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
DTYPES = {
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
SUPPORTED = "StreamV2V supports SD1.5-family models only"


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA file and the strength to fuse it with (1.0 = as trained)."""

    path: str | Path
    weight: float = 1.0


@dataclass
class StreamModel:
    """A loaded model: the pipeline (its ``.vae`` is the chosen VAE) and how it was made."""

    pipe: StableDiffusionPipeline
    dtype: torch.dtype
    device: torch.device
    description: str
    family: str = "SD1.5"
    vae_kind: str = "kl"  # "kl" (AutoencoderKL) or "taesd" (AutoencoderTiny)
    # What the fast path prepared once per model (compiled modules, layout): see accel.py.
    accelerated: dict = field(default_factory=dict, repr=False, compare=False)


# --- small argument parsers -------------------------------------------------------------------


def parse_lora_arg(text: str) -> LoraSpec:
    """``"path[:weight]"`` as typed on a command line.

    Only a number after the last colon is a weight, so Windows drives (``C:\\x.safetensors``)
    and colons inside file names stay part of the path.
    """
    text = text.strip()
    if not text:
        raise StreamV2VError("LoRA argument is empty: give 'path' or 'path:weight'")
    head, sep, tail = text.rpartition(":")
    if not sep or not head or Path(text).expanduser().is_file():
        return LoraSpec(text, 1.0)
    try:
        weight = float(tail)
    except ValueError:
        if Path(head).expanduser().is_file():
            raise StreamV2VError(
                f"LoRA argument {text!r}: weight {tail!r} is not a number; write 'path:0.8'"
            ) from None
        return LoraSpec(text, 1.0)
    if not math.isfinite(weight):
        raise StreamV2VError(f"LoRA argument {text!r}: weight must be a finite number")
    return LoraSpec(head, weight)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Names as users type them (fp16, bf16, fp32) or a torch dtype; nothing else runs."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        raise StreamV2VError(f"dtype {dtype} is not supported; use fp16, bf16 or fp32")
    key = str(dtype).strip().lower()
    if key not in DTYPES:
        raise StreamV2VError(f"dtype {dtype!r} is not supported; use fp16, bf16 or fp32")
    return DTYPES[key]


def default_dtype(device: torch.device) -> str:
    """Half precision where it is fast (GPUs), full precision on the CPU, where fp16 is slow."""
    return "fp32" if device.type == "cpu" else "fp16"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` picks the fastest present device; a named one must exist on this machine."""
    if device is None or str(device).strip().lower() in ("", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(str(device).strip().lower())
    except RuntimeError:
        raise StreamV2VError(
            f"device {device!r} is not a device name; use cuda, cuda:N, mps or cpu"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise StreamV2VError(
                f"device {device!r} requested but CUDA is not available here; use cpu or "
                "install a CUDA build of PyTorch"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise StreamV2VError(
                f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA "
                "device(s); pick one that exists"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise StreamV2VError(f"device {device!r} requested but MPS is not available; use cpu")
    elif dev.type != "cpu":
        raise StreamV2VError(f"device {device!r} is not supported; use cuda, mps or cpu")
    return dev


# --- reading files safely ---------------------------------------------------------------------


def _existing(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise StreamV2VError(f"{what} {str(p)!r} does not exist; check the path")
    return p


def _safetensors_shapes(path: Path, what: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape from the header only (cheap even for multi-GB files)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            names = f.keys()
            return {key: tuple(f.get_slice(key).get_shape()) for key in names}
    except Exception as exc:  # safetensors raises several types for damaged headers
        raise StreamV2VError(
            f"{what} {str(path)!r} is not a readable .safetensors file ({exc}); it is "
            "damaged or incomplete, download it again"
        ) from None


def _load_pickle_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Tensors-only loading: a ``.ckpt`` may carry arbitrary code, which we refuse to run."""
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for truncated or hostile pickles
        raise StreamV2VError(
            f"{what} {str(path)!r} could not be read as tensors only ({type(exc).__name__}); "
            "it is damaged or contains code; convert it to .safetensors"
        ) from None
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not any(isinstance(v, torch.Tensor) for v in data.values()):
        raise StreamV2VError(f"{what} {str(path)!r} holds no tensors; it is not a model file")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StreamV2VError(f"{what} {str(path)!r} is not valid JSON ({exc}); repair it") from None
    if not isinstance(data, dict):
        raise StreamV2VError(f"{what} {str(path)!r} is not a JSON object; repair it")
    return data


# --- model family detection -------------------------------------------------------------------


def _unsupported(path: Path, family: str) -> StreamV2VError:
    article = "an" if family.startswith(("SD", "A", "E", "I", "O", "U")) else "a"
    return StreamV2VError(
        f"{str(path)!r} is {article} {family} model; {SUPPORTED} (not supported yet: "
        f"{family}); pick an SD1.5 or LCM SD1.5 model"
    )


def detect_checkpoint_family(shapes: dict[str, tuple[int, ...]]) -> str:
    """Family of an original-layout checkpoint from key names and a few tell-tale shapes."""
    keys = shapes.keys()

    def has(*names: str) -> bool:
        return any(n in keys for n in names)

    def any_prefix(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has(
        "model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale",
        "double_blocks.0.img_attn.norm.key_norm.scale",
    ):
        return "Flux"
    if has(
        "model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias",
        "joint_blocks.0.context_block.adaLN_modulation.1.bias",
    ):
        return "SD3"
    if any_prefix("conditioner.embedders.") or has("model.diffusion_model.label_emb.0.0.weight"):
        return "SDXL"
    attn2 = shapes.get(
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    )
    attn2 = attn2 or shapes.get(
        "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
    )
    if any_prefix("cond_stage_model.model.") or (attn2 is not None and attn2[-1] == 1024):
        return "SD2"
    conv_in = shapes.get("model.diffusion_model.input_blocks.0.0.weight")
    if conv_in is None:
        unet_keys = [k for k in keys if k.startswith(("down_blocks.", "input_blocks."))]
        if unet_keys:
            return "diffusers-layout UNet"
        if any(k.startswith(("lora_", "unet.", "text_encoder.")) or "lora" in k for k in keys):
            return "LoRA"
        return "unknown"
    if conv_in[1] == 9:
        return "SD1.5 inpainting"
    if conv_in[1] == 8:
        return "InstructPix2Pix"
    if conv_in[1] != 4:
        return "unknown"
    if not any_prefix("cond_stage_model.transformer."):
        return "UNet-only"
    return "SD1.5"


def _check_single_file_family(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    family = detect_checkpoint_family(shapes)
    if family == "SD1.5":
        return
    if family == "LoRA":
        raise StreamV2VError(
            f"{str(path)!r} is a LoRA, not a model; pass it as a LoRA and pick an SD1.5 "
            "checkpoint as the model"
        )
    if family in ("unknown", "diffusers-layout UNet", "UNet-only"):
        raise StreamV2VError(
            f"{str(path)!r} is not a complete Stable Diffusion checkpoint ({family}: no "
            "model.diffusion_model + cond_stage_model weights); pick a full SD1.5 checkpoint"
        )
    raise _unsupported(path, family)


def _diffusers_family(folder: Path, index: dict) -> str:
    cls = str(index.get("_class_name", ""))
    if cls.startswith("StableDiffusionXL"):
        return "SDXL"
    if cls.startswith("StableDiffusion3"):
        return "SD3"
    if cls.startswith("Flux"):
        return "Flux"
    if "unet" not in index or not (folder / "unet" / "config.json").is_file():
        return "non-UNet"
    unet = _read_json(folder / "unet" / "config.json", "UNet config")
    if unet.get("addition_embed_type") == "text_time" or unet.get("cross_attention_dim") == 2048:
        return "SDXL"
    if unet.get("cross_attention_dim") == 1024:
        return "SD2"
    in_channels = unet.get("in_channels", 4)
    if in_channels == 9:
        return "SD1.5 inpainting"
    if in_channels == 8:
        return "InstructPix2Pix"
    if in_channels != 4 or "Inpaint" in cls or "Upscale" in cls or "Depth" in cls:
        return f"{cls or 'unknown'} (UNet in_channels {in_channels})"
    return "SD1.5"


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Hide diffusers/transformers/peft chatter (load reports, adapter warnings, progress
    bars) during loading: our own checks report what matters, in one line."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = (diffusers_logging.get_verbosity(), transformers_logging.get_verbosity())
    bars_were_enabled = (
        diffusers_logging.is_progress_bar_enabled(),
        transformers_logging.is_progress_bar_enabled(),
    )
    for module in (diffusers_logging, transformers_logging):
        # Critical only: a LoRA that does not fit is logged as an error, a size mismatch per
        # layer, just before the exception that our one-line message explains.
        module.set_verbosity(module.CRITICAL)
        module.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])
        for module, enabled in zip((diffusers_logging, transformers_logging), bars_were_enabled):
            if enabled:
                module.enable_progress_bar()


# --- building the pipeline --------------------------------------------------------------------


def _variant(subfolder: Path) -> str | None:
    """``fp16`` when a folder only ships ``*.fp16.*`` weights (common in LCM repos)."""
    names = [p.name for p in subfolder.glob("*") if p.is_file()]
    plain = any(re.fullmatch(r"[\w-]+\.(safetensors|bin)", n) for n in names)
    half = any(re.fullmatch(r"[\w-]+\.fp16\.(safetensors|bin)", n) for n in names)
    return "fp16" if half and not plain else None


def _check_diffusers_folder(folder: Path, load_vae: bool) -> None:
    """A diffusers folder's index and configs: an SD1.5 UNet and every part a load reads."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise StreamV2VError(
            f"folder {str(folder)!r} is not a diffusers model (no model_index.json); pick a "
            "diffusers model folder or a .safetensors checkpoint file"
        )
    index = _read_json(index_path, "model index")
    if "unet" in index and not (folder / "unet" / "config.json").is_file():
        raise StreamV2VError(
            f"diffusers folder {str(folder)!r} lacks its 'unet' subfolder (or its config.json); "
            "the download is incomplete, fetch the whole model folder"
        )
    family = _diffusers_family(folder, index)
    if family == "non-UNet":
        raise StreamV2VError(
            f"diffusers folder {str(folder)!r} has no UNet ({index.get('_class_name')}); "
            f"{SUPPORTED}"
        )
    if family != "SD1.5":
        raise _unsupported(folder, family)
    for part in ("unet", "text_encoder", "scheduler") + (("vae",) if load_vae else ()):
        if not (folder / part).is_dir():
            raise StreamV2VError(
                f"diffusers folder {str(folder)!r} lacks its {part!r} subfolder; the "
                "download is incomplete, fetch the whole model folder"
            )


def _load_diffusers_folder(folder: Path, dtype: torch.dtype, load_vae: bool):
    from diffusers import (
        AutoencoderKL,
        LCMScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        unet = UNet2DConditionModel.from_pretrained(
            str(folder),
            subfolder="unet",
            torch_dtype=dtype,
            local_files_only=True,
            variant=_variant(folder / "unet"),
        )
        text_encoder = CLIPTextModel.from_pretrained(
            str(folder),
            subfolder="text_encoder",
            dtype=dtype,
            local_files_only=True,
            variant=_variant(folder / "text_encoder"),
        )
        vae = None
        if load_vae:
            vae = AutoencoderKL.from_pretrained(
                str(folder),
                subfolder="vae",
                torch_dtype=dtype,
                local_files_only=True,
                variant=_variant(folder / "vae"),
            )
        tokenizer_dir = folder / "tokenizer"
        if not (tokenizer_dir / "vocab.json").is_file():
            tokenizer_dir = SHIPPED_SD15_DIR / "tokenizer"
        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        scheduler_config = PNDMScheduler.load_config(str(folder), subfolder="scheduler")
    except Exception as exc:  # diffusers/transformers/safetensors raise many types here
        raise StreamV2VError(
            f"diffusers folder {str(folder)!r} could not be loaded ({one_line(exc)}); it is "
            "damaged or incomplete, download it again"
        ) from None
    scheduler = LCMScheduler.from_config(scheduler_config)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe


def _check_single_file(path: Path) -> None:
    """A checkpoint's suffix and, for .safetensors, its header: an SD1.5 checkpoint. A pickled
    .ckpt has no header to read; its tensors are checked as it loads."""
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise StreamV2VError(
            f"model file {str(path)!r} is not a checkpoint (expected one of "
            f"{', '.join(SINGLE_FILE_SUFFIXES)}); pick a .safetensors checkpoint"
        )
    if path.suffix.lower() == ".safetensors":
        _check_single_file_family(path, _safetensors_shapes(path, "model file"))


def _load_single_file(path: Path, dtype: torch.dtype, config_dir: Path):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    if path.suffix.lower() != ".safetensors":  # diffusers reads it again, with weights_only=True
        shapes = {k: tuple(v.shape) for k, v in _load_pickle_tensors(path, "model file").items()}
        _check_single_file_family(path, shapes)
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path),
            config=str(config_dir),
            local_files_only=True,
            torch_dtype=dtype,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    except Exception as exc:  # diffusers raises many types on shape/key mismatches
        raise StreamV2VError(
            f"model file {str(path)!r} could not be built as SD1.5 with the configs in "
            f"{str(config_dir)!r} ({one_line(exc)}); is it an SD1.5 checkpoint?"
        ) from None
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    return pipe


# --- LoRAs ------------------------------------------------------------------------------------


def check_lora_file(spec: LoraSpec, what: str = "LoRA") -> Path:
    """The LoRA's path, once it is known to be a LoRA file: read before a model is loaded (a
    header only, for .safetensors), so a wrong file is named before minutes of loading."""
    path = _existing(spec.path, what)
    if path.is_dir():
        raise StreamV2VError(f"{what} {str(path)!r} is a folder; give the LoRA .safetensors file")
    if not math.isfinite(float(spec.weight)):
        raise StreamV2VError(f"{what} {str(path)!r}: weight {spec.weight!r} is not finite")
    if path.suffix.lower() == ".safetensors":
        shapes = _safetensors_shapes(path, what)
    else:
        shapes = {k: tuple(v.shape) for k, v in _load_pickle_tensors(path, what).items()}
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in shapes):
        raise StreamV2VError(
            f"{what} {str(path)!r} is a full checkpoint, not a LoRA; pass it as the model"
        )
    if not any("lora" in k.lower() for k in shapes):
        raise StreamV2VError(
            f"{what} {str(path)!r} holds no LoRA weights; pick a LoRA .safetensors file"
        )
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in shapes):
        raise StreamV2VError(
            f"{what} {str(path)!r} is an SDXL LoRA (it has two text encoders); use an SD1.5 LoRA"
        )
    return path


def _apply_loras(pipe, loras: Sequence[tuple[LoraSpec, str]]) -> None:
    """Load every LoRA as a named adapter, weight them, fuse, then drop the adapters."""
    names, weights = [], []
    for i, (spec, what) in enumerate(loras):
        path = check_lora_file(spec, what)
        name = f"lora{i}"
        kwargs = {"weight_name": path.name, "adapter_name": name, "local_files_only": True}
        try:
            if path.suffix.lower() == ".safetensors":
                pipe.load_lora_weights(str(path.parent), **kwargs)
            else:
                pipe.load_lora_weights(_load_pickle_tensors(path, what), adapter_name=name)
        except Exception as exc:  # diffusers/peft raise many types on mismatched LoRAs
            raise StreamV2VError(
                f"{what} {str(path)!r} does not fit this model ({one_line(exc)}); use an SD1.5 LoRA"
            ) from None
        loaded = {a for adapters in pipe.get_list_adapters().values() for a in adapters}
        if name not in loaded:
            raise StreamV2VError(
                f"{what} {str(path)!r} matched no layer of this model; use an SD1.5 LoRA"
            )
        names.append(name)
        weights.append(float(spec.weight))
    if not names:
        return
    pipe.set_adapters(names, adapter_weights=weights)
    components = [c for c, a in pipe.get_list_adapters().items() if a]
    pipe.fuse_lora(components=components, lora_scale=1.0, adapter_names=names)
    pipe.unload_lora_weights()


# --- VAEs -------------------------------------------------------------------------------------


def _taesd_files(path: Path) -> tuple[Path, Path] | None:
    """(encoder, decoder) when ``path`` is a vae_approx folder or one of the two files."""

    def pick(folder: Path, part: str) -> Path | None:
        for suffix in (".safetensors", ".pth", ".pt"):
            candidate = folder / f"taesd_{part}{suffix}"
            if candidate.is_file():
                return candidate
        return None

    if path.is_dir():
        encoder, decoder = pick(path, "encoder"), pick(path, "decoder")
    elif path.name.startswith(("taesd_encoder.", "taesd_decoder.")):
        encoder, decoder = pick(path.parent, "encoder"), pick(path.parent, "decoder")
    else:
        return None
    if encoder is None and decoder is None:
        return None
    if encoder is None or decoder is None:
        missing = "taesd_encoder" if encoder is None else "taesd_decoder"
        raise StreamV2VError(
            f"TAESD at {str(path)!r} lacks {missing}.safetensors next to it; both the "
            "encoder and the decoder file are needed (ComfyUI's vae_approx folder)"
        )
    return encoder, decoder


def _taesd_plan(
    sd: dict[str, torch.Tensor], convs_then_blocks: bool
) -> tuple[list[int], list[int]]:
    """(blocks per stage, channels per stage) read off an original-layout Sequential.

    Encoder: ``conv, blocks, [conv(stride 2), blocks]..., conv``. Decoder (after dropping
    the Clamp): ``conv, relu, [blocks, upsample, conv]...``. Reading the structure instead of
    assuming TAESD's default keeps files from slimmer TAESD variants loadable.
    """
    indices = sorted({int(k.split(".")[0]) for k in sd})
    kinds = {i: "block" if f"{i}.conv.0.weight" in sd else "conv" for i in indices}
    counts: list[int] = []
    channels: list[int] = []
    for i in indices:
        if kinds[i] != "block":
            continue
        previous = kinds.get(i - 1)
        starts_stage = previous == "conv" if convs_then_blocks else previous != "block"
        if not counts or starts_stage:
            counts.append(0)
            channels.append(sd[f"{i}.conv.0.weight"].shape[0])
        counts[-1] += 1
    return counts, channels


def _load_taesd_original(encoder_path: Path, decoder_path: Path, dtype: torch.dtype):
    from diffusers import AutoencoderTiny
    from safetensors.torch import load_file

    sds = []
    for path in (encoder_path, decoder_path):
        if path.suffix.lower() == ".safetensors":
            _safetensors_shapes(path, "TAESD file")  # a damaged file gets our message
            sds.append(load_file(str(path)))
        else:
            sds.append(_load_pickle_tensors(path, "TAESD file"))
    encoder_sd, decoder_sd = sds
    for path, sd in ((encoder_path, encoder_sd), (decoder_path, decoder_sd)):
        if not sd or not all(k.split(".")[0].isdigit() for k in sd):
            raise StreamV2VError(
                f"TAESD file {str(path)!r} is not in TAESD's layout (keys like '0.weight'); "
                "use taesd_encoder/taesd_decoder from madebyollin/taesd"
            )
    try:
        enc_counts, enc_channels = _taesd_plan(encoder_sd, convs_then_blocks=True)
        dec_sd = {
            f"{int(k.split('.', 1)[0]) - 1}.{k.split('.', 1)[1]}": v for k, v in decoder_sd.items()
        }
        dec_counts, dec_channels = _taesd_plan(dec_sd, convs_then_blocks=False)
        last_encoder = max(int(k.split(".")[0]) for k in encoder_sd)
        latent_channels = encoder_sd[f"{last_encoder}.weight"].shape[0]
        model = AutoencoderTiny(
            encoder_block_out_channels=tuple(enc_channels),
            decoder_block_out_channels=tuple(dec_channels),
            num_encoder_blocks=tuple(enc_counts),
            num_decoder_blocks=tuple(dec_counts),
            latent_channels=latent_channels,
        )
        state = {f"encoder.layers.{k}": v for k, v in encoder_sd.items()}
        state.update({f"decoder.layers.{k}": v for k, v in dec_sd.items()})
        model.load_state_dict(state, strict=True)
    except (KeyError, ValueError, RuntimeError, IndexError) as exc:
        raise StreamV2VError(
            f"TAESD files {str(encoder_path)!r} + {str(decoder_path)!r} do not form a TAESD "
            f"({one_line(exc)}); use taesd_encoder/taesd_decoder from madebyollin/taesd"
        ) from None
    if latent_channels != 4:
        raise StreamV2VError(
            f"TAESD at {str(encoder_path.parent)!r} has {latent_channels} latent channels, "
            "which is the SD3/Flux TAESD; use taesd_encoder/taesd_decoder (SD1.5)"
        )
    return model.to(dtype).eval()


def _load_vae(spec: str | Path, dtype: torch.dtype, config_dir: Path):
    """(vae, kind, label) for any of the VAE formats we accept."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    path = _existing(spec, "VAE")
    files = _taesd_files(path)
    if files is not None:
        return _load_taesd_original(*files, dtype), "taesd", f"TAESD ({files[0].parent.name})"
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file() and (path / "vae" / "config.json").is_file():
            path, config_path = path / "vae", path / "vae" / "config.json"
        if not config_path.is_file():
            raise StreamV2VError(
                f"VAE folder {str(path)!r} has neither taesd_encoder/taesd_decoder files nor a "
                "diffusers config.json; point at a VAE file or folder"
            )
        cls_name = _read_json(config_path, "VAE config").get("_class_name")
        classes = {"AutoencoderTiny": AutoencoderTiny, "AutoencoderKL": AutoencoderKL}
        if cls_name not in classes:
            raise StreamV2VError(
                f"VAE folder {str(path)!r} holds a {cls_name}, not an AutoencoderKL or "
                "AutoencoderTiny; pick an SD1.5 VAE"
            )
        try:
            vae = classes[cls_name].from_pretrained(
                str(path), torch_dtype=dtype, local_files_only=True, variant=_variant(path)
            )
        except Exception as exc:  # diffusers/safetensors raise many types here
            raise StreamV2VError(
                f"VAE folder {str(path)!r} could not be loaded ({one_line(exc)}); download it again"
            ) from None
        if vae.config.latent_channels != 4:
            raise StreamV2VError(
                f"VAE {str(path)!r} has {vae.config.latent_channels} latent channels; SD1.5 "
                "needs 4 (pick an SD1.5 VAE)"
            )
        kind = "taesd" if cls_name == "AutoencoderTiny" else "kl"
        return vae.eval(), kind, f"{cls_name} ({path.name})"
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise StreamV2VError(
            f"VAE {str(path)!r} is not a .safetensors/.pt VAE file or a VAE folder"
        )
    if path.suffix.lower() == ".safetensors":
        shapes = _safetensors_shapes(path, "VAE file")
        source: str | dict[str, torch.Tensor] = str(path)
    else:
        tensors = _load_pickle_tensors(path, "VAE file")
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        source = tensors
    if not any(k.startswith(("encoder.", "decoder.", "first_stage_model.")) for k in shapes):
        raise StreamV2VError(
            f"VAE file {str(path)!r} holds no autoencoder weights; pick an SD1.5 VAE file"
        )
    latent = shapes.get("decoder.conv_in.weight") or shapes.get(
        "first_stage_model.decoder.conv_in.weight"
    )
    if latent is not None and latent[1] != 4:
        raise StreamV2VError(
            f"VAE file {str(path)!r} has {latent[1]} latent channels; SD1.5 needs 4 "
            "(pick an SD1.5 VAE)"
        )
    try:
        vae = AutoencoderKL.from_single_file(
            source,
            config=str(config_dir),
            subfolder="vae",
            torch_dtype=dtype,
            local_files_only=True,
        )
    except Exception as exc:  # diffusers raises many types on key/shape mismatches
        raise StreamV2VError(
            f"VAE file {str(path)!r} could not be loaded as an SD1.5 VAE ({one_line(exc)})"
        ) from None
    return vae.eval(), "kl", f"AutoencoderKL ({path.name})"


# --- entry point ------------------------------------------------------------------------------


def _lora_list(
    lcm_lora: str | Path | None, lcm_lora_weight: float, loras: Sequence[LoraSpec | str]
) -> list[tuple[LoraSpec, str]]:
    """Every LoRA to fuse, the LCM-LoRA first, each with what to call it in a message."""
    lora_list: list[tuple[LoraSpec, str]] = []
    if lcm_lora is not None:
        lora_list.append((LoraSpec(lcm_lora, lcm_lora_weight), "LCM-LoRA"))
    for spec in loras:
        if not isinstance(spec, LoraSpec):
            spec = parse_lora_arg(str(spec))
        lora_list.append((spec, "LoRA"))
    return lora_list


def check_model_files(
    model: str | Path,
    *,
    lcm_lora: str | Path | None = None,
    lcm_lora_weight: float = 1.0,
    loras: Sequence[LoraSpec | str] = (),
    vae: str | Path | None = None,
) -> Path:
    """What ``load_model`` can tell from names, headers and configs alone, before it reads any
    weights: a host that keeps one model names a wrong pick before it lets the loaded one go.
    Returns the model's path."""
    model_path = _existing(model, "model")
    for spec, what in _lora_list(lcm_lora, lcm_lora_weight, loras):
        check_lora_file(spec, what)
    if vae is not None:
        vae_path = _existing(vae, "VAE")
        if vae_path.name.startswith(("taesdxl_", "taesd3_", "taef1_")):
            raise StreamV2VError(
                f"VAE {str(vae_path)!r} is a TAESD for another model family; use "
                "taesd_encoder/taesd_decoder (SD1.5)"
            )
    if model_path.is_dir():
        _check_diffusers_folder(model_path, load_vae=vae is None)
    else:
        _check_single_file(model_path)
    return model_path


def load_model(
    model: str | Path,
    *,
    lcm_lora: str | Path | None = None,
    lcm_lora_weight: float = 1.0,
    loras: Sequence[LoraSpec] = (),
    vae: str | Path | None = None,
    dtype: str | torch.dtype = "fp16",
    device: str | torch.device | None = None,
    config_dir: str | Path | None = None,
) -> StreamModel:
    """Build the pipeline the stream runs, from files on the user's disk only.

    ``model`` is a diffusers folder or an original-layout single file; ``config_dir`` (a
    diffusers folder layout) replaces the shipped SD1.5 configs for single files.
    ``lcm_lora`` and ``loras`` are fused into the weights; ``vae`` replaces the model's VAE
    (TAESD from ComfyUI's vae_approx files, a diffusers VAE folder, or a VAE file).
    """
    torch_dtype = resolve_dtype(dtype)
    target = resolve_device(device)
    configs = SHIPPED_SD15_DIR if config_dir is None else _existing(config_dir, "config folder")
    if not (configs / "model_index.json").is_file():
        raise StreamV2VError(
            f"config folder {str(configs)!r} has no model_index.json; give a diffusers SD1.5 "
            "folder (configs only are enough)"
        )
    # fail before the slow loads, not after them
    model_path = check_model_files(
        model, lcm_lora=lcm_lora, lcm_lora_weight=lcm_lora_weight, loras=loras, vae=vae
    )
    lora_list = _lora_list(lcm_lora, lcm_lora_weight, loras)
    with quiet_libraries():
        # The VAE first: it is small, and a wrong one is named before the slow model load.
        new_vae, vae_kind, vae_label = None, "kl", "own VAE"
        if vae is not None:
            new_vae, vae_kind, vae_label = _load_vae(vae, torch_dtype, configs)
        if model_path.is_dir():
            pipe = _load_diffusers_folder(model_path, torch_dtype, load_vae=vae is None)
            source = f"{model_path.name} (diffusers)"
        else:
            pipe = _load_single_file(model_path, torch_dtype, configs)
            source = f"{model_path.name} (single file)"
        if new_vae is not None:
            pipe.register_modules(vae=new_vae)
        pipe.to(target)
        _apply_loras(pipe, lora_list)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False)
        part.eval()
    pipe.set_progress_bar_config(disable=True)

    parts = [source] + [f"{what} {Path(s.path).name} x{s.weight:g}" for s, what in lora_list]
    description = " + ".join(parts) + f"; VAE: {vae_label}; {_dtype_name(torch_dtype)} on {target}"
    return StreamModel(
        pipe=pipe, dtype=torch_dtype, device=target, description=description, vae_kind=vae_kind
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
