"""Loading: every user format gives the source weights; LoRAs fuse exactly; bad input is
refused with a one-line message that names the file; nothing reaches the network."""

from __future__ import annotations

import gc
import json
import shutil
import socket
from dataclasses import replace
from pathlib import Path
from unittest import mock

import pytest
import tinymodels
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, LCMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from tinymodels import LCM_LORA_SEED, LORA_DIFFUSERS_SEED, LORA_KOHYA_SEED

import streamv2v.loading as loading
from streamv2v.errors import StreamV2VError
from streamv2v.loading import (
    SHIPPED_SD15_DIR,
    LoraSpec,
    StreamModel,
    detect_checkpoint_family,
    load_model,
    parse_lora_arg,
    resolve_device,
    resolve_dtype,
)

CPU32 = {"dtype": "fp32", "device": "cpu"}


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def assert_no_lora_layers(model: StreamModel) -> None:
    for part in (model.pipe.unet, model.pipe.text_encoder):
        assert not getattr(part, "peft_config", None)
        assert not [n for n, _ in part.named_modules() if "lora" in n.lower()]


# --- shipped data -----------------------------------------------------------------------------


def test_shipped_tokenizer_is_clips():
    tokenizer = tinymodels.shipped_tokenizer()
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    padded = tokenizer("cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == 49407
    assert (SHIPPED_SD15_DIR.parent / "README.md").is_file()


def test_shipped_configs_describe_sd15():
    """Parameter counts of the public SD1.5 UNet, VAE and CLIP ViT-L/14 text tower."""
    from accelerate import init_empty_weights
    from diffusers import PNDMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(str(SHIPPED_SD15_DIR / "unet"))
        )
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(SHIPPED_SD15_DIR / "vae")))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(str(SHIPPED_SD15_DIR / "text_encoder")))
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text)]
    assert counts == [859_520_964, 83_653_863, 123_060_480]
    assert len([n for n, _ in unet.named_modules() if n.endswith("attn1")]) == 16
    assert vae.config.scaling_factor == 0.18215
    scheduler = PNDMScheduler.from_pretrained(str(SHIPPED_SD15_DIR / "scheduler"))
    lcm = LCMScheduler.from_config(scheduler.config)
    assert (lcm.config.beta_start, lcm.config.beta_end) == (0.00085, 0.012)
    assert lcm.config.beta_schedule == "scaled_linear" and lcm.config.num_train_timesteps == 1000
    index = json.loads((SHIPPED_SD15_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None]


# --- model formats ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["diffusers", "safetensors", "ckpt"])
def test_every_model_format_loads_the_source_weights(fmt, request, tiny_source, tiny_diffusers_dir):
    path = request.getfixturevalue(
        {"diffusers": "tiny_diffusers_dir", "safetensors": "tiny_single_file", "ckpt": "tiny_ckpt"}[
            fmt
        ]
    )
    model = load_model(path, config_dir=tiny_diffusers_dir, **CPU32)
    assert isinstance(model, StreamModel)
    for part in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(model.pipe, part), getattr(tiny_source, part))
    assert isinstance(model.pipe.scheduler, LCMScheduler)
    assert model.pipe.tokenizer("a photo of a cat").input_ids[1:3] == [320, 1125]
    assert (model.family, model.vae_kind) == ("SD1.5", "kl")
    assert model.dtype == torch.float32 and model.device == torch.device("cpu")
    assert path.name in model.description and "fp32 on cpu" in model.description
    assert not any(p.requires_grad for p in model.pipe.unet.parameters())


def test_single_file_uses_the_shipped_configs_by_default(tiny_single_file):
    # The tiny file does not fit the real SD1.5 shapes, which shows the shipped configs were used.
    with pytest.raises(StreamV2VError, match="configs/sd15") as info:
        load_model(tiny_single_file, **CPU32)
    assert str(tiny_single_file) in str(info.value)


def test_lcm_and_fp16_variant_folders(tmp_path, tiny_source, tiny_diffusers_dir):
    lcm_dir = tmp_path / "lcm"
    shutil.copytree(tiny_diffusers_dir, lcm_dir)
    index = json.loads((lcm_dir / "model_index.json").read_text())
    index["_class_name"] = "LatentConsistencyModelPipeline"
    index["scheduler"] = ["diffusers", "LCMScheduler"]
    (lcm_dir / "model_index.json").write_text(json.dumps(index))
    LCMScheduler.from_config(tiny_source.scheduler.config).save_pretrained(lcm_dir / "scheduler")
    assert_same_weights(load_model(lcm_dir, **CPU32).pipe.unet, tiny_source.unet)

    variant_dir = tmp_path / "variant"
    tiny_source.save_pretrained(variant_dir, variant="fp16")
    assert not (variant_dir / "unet" / "diffusion_pytorch_model.safetensors").exists()
    model = load_model(variant_dir, **CPU32)
    assert_same_weights(model.pipe.unet, tiny_source.unet)
    assert_same_weights(model.pipe.text_encoder, tiny_source.text_encoder)


@pytest.mark.parametrize(
    "dtype,expected",
    [("fp16", torch.float16), ("bf16", torch.bfloat16), (torch.float16, torch.float16)],
)
def test_dtype(dtype, expected, tiny_diffusers_dir, tiny_taesd_dir, tiny_source):
    model = load_model(tiny_diffusers_dir, vae=tiny_taesd_dir, dtype=dtype, device="cpu")
    assert model.dtype == expected
    for part in (model.pipe.unet, model.pipe.vae, model.pipe.text_encoder):
        assert {p.dtype for p in part.parameters()} == {expected}
    want = tiny_source.unet.conv_in.weight.to(expected)
    assert torch.equal(model.pipe.unet.conv_in.weight, want)


def test_dtype_and_device_parsing():
    assert resolve_dtype("FP32") is torch.float32 and resolve_dtype("bfloat16") is torch.bfloat16
    for bad in ("int8", "fp8", torch.int8):
        with pytest.raises(StreamV2VError, match="dtype"):
            resolve_dtype(bad)
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert resolve_device(None) == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(StreamV2VError, match="CUDA is not available"):
            resolve_device("cuda")
    if not torch.backends.mps.is_available():
        with pytest.raises(StreamV2VError, match="MPS is not available"):
            resolve_device("mps")
    for bad in ("tpu", "gpu0", "meta"):
        with pytest.raises(StreamV2VError, match=bad):
            resolve_device(bad)


# --- LoRA -------------------------------------------------------------------------------------

LINEAR = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "mid_block.attentions.0.proj_in"
FEED_FORWARD = "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj"
TEXT = "encoder.layers.1.self_attn.out_proj"
KOHYA_SCALE = tinymodels.LORA_ALPHA / tinymodels.LORA_RANK  # diffusers-format files: scale 1


def expected_weight(source, target: str, applied: list[tuple[int, float, float]]) -> torch.Tensor:
    """``W + sum(weight * scale * up @ down)`` for (seed, weight, scale) of each LoRA."""
    weight = tinymodels.lora_target(source, target).weight.detach().clone()
    for seed, strength, scale in applied:
        down, up = tinymodels.lora_deltas(source, seed)[target]
        weight += strength * scale * tinymodels.lora_delta(down, up)
    return weight


def assert_fused(model, source, applied, text_applied) -> None:
    for module in (LINEAR, CONV, FEED_FORWARD):
        got = model.pipe.unet.get_submodule(module).weight
        want = expected_weight(source, f"unet.{module}", applied)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        assert not torch.equal(got, source.unet.get_submodule(module).weight)
    got = tinymodels.lora_target(model.pipe, f"text_encoder.{TEXT}").weight
    want = expected_weight(source, f"text_encoder.{TEXT}", text_applied)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert_no_lora_layers(model)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "kohya_pt"])
def test_one_lora_is_fused_with_its_weight(fmt, request, tmp_path, tiny_source, tiny_diffusers_dir):
    path = request.getfixturevalue(f"tiny_lora_{fmt.removesuffix('_pt')}")
    if fmt.endswith("_pt"):  # pickled LoRAs are read tensors-only
        torch.save(load_file(str(path)), tmp_path / "style.pt")
        path = tmp_path / "style.pt"
    seed, scale = (
        (LORA_DIFFUSERS_SEED, 1.0) if fmt == "diffusers" else (LORA_KOHYA_SEED, KOHYA_SCALE)
    )
    model = load_model(tiny_diffusers_dir, loras=[parse_lora_arg(f"{path}:0.8")], **CPU32)
    assert_fused(model, tiny_source, [(seed, 0.8, scale)], [(seed, 0.8, scale)])
    assert f"LoRA {path.name} x0.8" in model.description


def test_lcm_lora_and_style_loras_stack(
    tiny_source,
    tiny_single_file,
    tiny_diffusers_dir,
    tiny_lcm_lora,
    tiny_lora_kohya,
    tiny_lora_diffusers,
):
    model = load_model(
        tiny_single_file,
        config_dir=tiny_diffusers_dir,
        lcm_lora=tiny_lcm_lora,
        lcm_lora_weight=1.0,
        loras=[LoraSpec(tiny_lora_kohya, 0.5), LoraSpec(tiny_lora_diffusers, -0.7)],
        **CPU32,
    )
    styles = [(LORA_KOHYA_SEED, 0.5, KOHYA_SCALE), (LORA_DIFFUSERS_SEED, -0.7, 1.0)]
    assert_fused(model, tiny_source, [(LCM_LORA_SEED, 1.0, KOHYA_SCALE), *styles], styles)
    assert f"LCM-LoRA {tiny_lcm_lora.name} x1" in model.description


@pytest.mark.parametrize(
    "text,path,weight",
    [
        ("style.safetensors", "style.safetensors", 1.0),
        ("style.safetensors:0.6", "style.safetensors", 0.6),
        ("/loras/style.safetensors:-1.5", "/loras/style.safetensors", -1.5),
        (r"C:\loras\style.safetensors", r"C:\loras\style.safetensors", 1.0),
        (r"C:\loras\style.safetensors:0.25", r"C:\loras\style.safetensors", 0.25),
        ("D:style.safetensors", "D:style.safetensors", 1.0),
        ("  style.safetensors:1e-1 ", "style.safetensors", 0.1),
    ],
)
def test_parse_lora_arg(text, path, weight):
    assert parse_lora_arg(text) == LoraSpec(path, weight)


def test_parse_lora_arg_rejects_bad_weights(tiny_lora_kohya):
    with pytest.raises(StreamV2VError, match="not a number"):
        parse_lora_arg(f"{tiny_lora_kohya}:strong")
    with pytest.raises(StreamV2VError, match="finite"):
        parse_lora_arg("style.safetensors:nan")
    with pytest.raises(StreamV2VError, match="empty"):
        parse_lora_arg("  ")


# --- VAEs -------------------------------------------------------------------------------------


def run_vae(vae, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        encoded = vae.encode(image)
        latent = encoded.latents if hasattr(encoded, "latents") else encoded.latent_dist.mean
        return latent, vae.decode(latent).sample


@pytest.mark.parametrize("which", ["folder", "decoder_file", "pth", "diffusers"])
def test_taesd_formats_agree(
    which, tmp_path, tiny_taesd_source, tiny_taesd_dir, tiny_diffusers_dir
):
    vae = {
        "folder": tiny_taesd_dir,
        "decoder_file": tiny_taesd_dir / "taesd_decoder.safetensors",
        "pth": tinymodels.write_taesd_vae_approx(tiny_taesd_source, tmp_path / "pth", fmt="pth"),
        "diffusers": None,
    }[which]
    if which == "diffusers":
        vae = tinymodels.write_taesd_diffusers(tiny_taesd_source, tmp_path / "taesd")
    model = load_model(tiny_diffusers_dir, vae=vae, **CPU32)
    assert model.vae_kind == "taesd" and isinstance(model.pipe.vae, AutoencoderTiny)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    got, want = run_vae(model.pipe.vae, image), run_vae(tiny_taesd_source, image)
    assert got[0].shape == (1, 4, 8, 8)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_taesd_original_layout_matches_madebyollin(tmp_path):
    """Key names of the real TAESD files: the decoder's Clamp sits at index 0."""
    full = tinymodels.tiny_taesd(full_size=True)
    encoder, decoder = tinymodels.taesd_original_state_dicts(full)
    assert {"0.weight", "1.conv.0.weight", "2.weight", "14.weight", "14.bias"} <= encoder.keys()
    assert "2.bias" not in encoder  # the stride-2 convs have no bias
    assert {"1.weight", "3.conv.0.weight", "7.weight", "18.conv.4.weight", "19.bias"} <= (
        decoder.keys()
    )
    assert not any(k.startswith("0.") for k in decoder)
    folder = tinymodels.write_taesd_vae_approx(full, tmp_path / "vae_approx")
    from streamv2v.loading import _load_taesd_original

    loaded = _load_taesd_original(
        folder / "taesd_encoder.safetensors", folder / "taesd_decoder.safetensors", torch.float32
    )
    assert loaded.config.num_encoder_blocks == (1, 3, 3, 3)
    assert loaded.config.num_decoder_blocks == (3, 3, 3, 1)
    assert_same_weights(loaded, full)


@pytest.mark.parametrize("which", ["diffusers_kl", "single_file_kl", "pt_kl", "pipeline_folder"])
def test_kl_vae_formats(which, tmp_path, tiny_source, tiny_diffusers_dir, tiny_vae_dir):
    single = tinymodels.write_vae_single_file(tiny_source, tmp_path / "vae.safetensors")
    torch.save(load_file(str(single)), tmp_path / "vae.pt")
    vae = {
        "diffusers_kl": tiny_vae_dir,
        "single_file_kl": single,
        "pt_kl": tmp_path / "vae.pt",
        "pipeline_folder": tiny_diffusers_dir,
    }[which]
    model = load_model(tiny_diffusers_dir, vae=vae, config_dir=tiny_diffusers_dir, **CPU32)
    assert model.vae_kind == "kl"
    assert_same_weights(model.pipe.vae, tiny_source.vae)


# --- refusals ---------------------------------------------------------------------------------


def bad_model_cases(
    root: Path, tiny_diffusers_dir: Path, tiny_single_file: Path, tiny_ckpt: Path, lora: Path
):
    cases = {
        "missing": (root / "missing.safetensors", "does not exist"),
        "truncated": (
            tinymodels.write_truncated(tiny_single_file, root / "trunc.safetensors"),
            "damaged or incomplete",
        ),
        "garbage": (root / "garbage.safetensors", "damaged or incomplete"),
        "truncated_ckpt": (
            tinymodels.write_truncated(tiny_ckpt, root / "trunc.ckpt"),
            "could not be read as tensors only",
        ),
        "video": (root / "clip.mp4", "not a checkpoint"),
        "not_diffusers": (root / "some_folder", "no model_index.json"),
        "lora_as_model": (lora, "is a LoRA, not a model"),
        "inpainting_dir": (
            tinymodels.write_inpainting_dir(tiny_diffusers_dir, root / "inpaint"),
            "not supported yet: SD1.5 inpainting",
        ),
        "inpainting_file": (
            tinymodels.write_single_file(
                tinymodels.tiny_pipeline(in_channels=9), root / "inpainting.safetensors"
            ),
            "not supported yet: SD1.5 inpainting",
        ),
    }
    for family, name in (("sdxl", "SDXL"), ("sd2", "SD2"), ("sd3", "SD3"), ("flux", "Flux")):
        path = tinymodels.write_fake_checkpoint(family, root / f"{family}.safetensors")
        cases[family] = (path, f"is an? {name} model; StreamV2V supports SD1.5.*not supported yet")
    sdxl_dir = root / "sdxl_dir"
    shutil.copytree(tiny_diffusers_dir, sdxl_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    index = json.loads((sdxl_dir / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    (sdxl_dir / "model_index.json").write_text(json.dumps(index))
    cases["sdxl_dir"] = (sdxl_dir, "SDXL")
    partial = root / "no_unet_dir"  # a download that stopped before the UNet
    shutil.copytree(tiny_diffusers_dir, partial, ignore=shutil.ignore_patterns("unet"))
    cases["no_unet_dir"] = (partial, "lacks its 'unet' subfolder .* download is incomplete")
    (root / "garbage.safetensors").write_bytes(b"\x07" * 64)
    (root / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" * 4)
    (root / "some_folder").mkdir()
    return cases


def test_bad_models_are_refused_naming_the_path(
    tmp_path, tiny_diffusers_dir, tiny_single_file, tiny_ckpt, tiny_lora_kohya
):
    cases = bad_model_cases(
        tmp_path, tiny_diffusers_dir, tiny_single_file, tiny_ckpt, tiny_lora_kohya
    )
    for name, (path, message) in cases.items():
        with pytest.raises(StreamV2VError, match=message) as info:
            load_model(path, config_dir=tiny_diffusers_dir, **CPU32)
        text = str(info.value)
        assert str(path) in text, name
        assert "\n" not in text, name


def test_family_detection_keeps_sd15(tiny_source):
    shapes = {k: tuple(v.shape) for k, v in tinymodels.ldm_state_dict(tiny_source).items()}
    assert detect_checkpoint_family(shapes) == "SD1.5"
    unet_only = {k: v for k, v in shapes.items() if k.startswith("model.diffusion_model.")}
    assert detect_checkpoint_family(unet_only) == "UNet-only"


def test_bad_loras_and_vaes_are_refused(
    tmp_path, tiny_diffusers_dir, tiny_single_file, tiny_taesd_dir, tiny_taesd_source
):
    no_match = tmp_path / "other_model_lora.safetensors"
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    wide_down, wide_up = torch.zeros(4, 320), torch.zeros(320, 4)  # SD1.5-sized, not tiny
    save_file(
        {f"{name}.lora_down.weight": wide_down, f"{name}.lora_up.weight": wide_up}, str(no_match)
    )
    flux_lora = tmp_path / "flux_lora.safetensors"
    name = "transformer.single_transformer_blocks.0.attn.to_q"
    save_file(
        {f"{name}.lora_A.weight": torch.zeros(4, 32), f"{name}.lora_B.weight": torch.zeros(32, 4)},
        str(flux_lora),
    )
    only_encoder = tmp_path / "half"
    only_encoder.mkdir()
    shutil.copy(tiny_taesd_dir / "taesd_encoder.safetensors", only_encoder)
    wide = tinymodels.write_taesd_vae_approx(
        AutoencoderTiny(
            encoder_block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8),
            num_encoder_blocks=(1, 1, 1, 1),
            num_decoder_blocks=(1, 1, 1, 1),
            latent_channels=16,
        ),
        tmp_path / "taesd16",
    )
    flux_vae_dir = tmp_path / "flux_vae"
    AutoencoderKL(latent_channels=16, block_out_channels=(8,), norm_num_groups=4).save_pretrained(
        flux_vae_dir
    )
    flux_vae_file = tmp_path / "flux_vae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(8, 16, 3, 3)}, str(flux_vae_file))
    xl_taesd = tmp_path / "xl" / "taesdxl_decoder.safetensors"
    xl_taesd.parent.mkdir()
    shutil.copy(tiny_taesd_dir / "taesd_decoder.safetensors", xl_taesd)
    sdxl_lora = tmp_path / "sdxl_lora.safetensors"
    name = "lora_te2_text_model_encoder_layers_0_mlp_fc1"
    save_file({f"{name}.lora_down.weight": torch.zeros(4, 1280)}, str(sdxl_lora))
    cases = [
        ({"loras": [LoraSpec(tmp_path / "nope.safetensors")]}, "nope.safetensors", "not exist"),
        ({"loras": [LoraSpec(sdxl_lora)]}, sdxl_lora, "is an SDXL LoRA"),
        ({"loras": [LoraSpec(tiny_single_file)]}, tiny_single_file, "full checkpoint"),
        ({"loras": [LoraSpec(no_match)]}, no_match, "does not fit this model"),
        ({"loras": [LoraSpec(flux_lora)]}, flux_lora, "matched no layer"),
        ({"lcm_lora": tiny_taesd_dir / "taesd_encoder.safetensors"}, "taesd_encoder", "no LoRA"),
        ({"loras": [LoraSpec(tiny_taesd_dir)]}, tiny_taesd_dir, "is a folder"),
        ({"vae": tmp_path / "nope"}, "nope", "not exist"),
        ({"vae": only_encoder}, only_encoder, "lacks taesd_decoder"),
        ({"vae": wide}, wide, "16 latent channels"),
        ({"vae": xl_taesd}, xl_taesd, "another model family"),
        ({"vae": flux_vae_dir}, flux_vae_dir, "16 latent channels"),
        ({"vae": flux_vae_file}, flux_vae_file, "16 latent channels"),
        ({"vae": tiny_single_file}, tiny_single_file, "could not be loaded as an SD1.5 VAE"),
        ({"vae": tiny_diffusers_dir / "unet"}, tiny_diffusers_dir / "unet", "holds a"),
        ({"config_dir": tmp_path}, tmp_path, "no model_index.json"),
    ]
    loads = []
    real_load = loading._load_diffusers_folder

    def counted_load(*args, **kwargs):
        loads.append(args)
        return real_load(*args, **kwargs)

    for kwargs, named, message in cases:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(loading, "_load_diffusers_folder", counted_load)
            with pytest.raises(StreamV2VError, match=message) as info:
                load_model(tiny_diffusers_dir, **{**CPU32, **kwargs})
        assert str(named) in str(info.value), kwargs
        if "vae" in kwargs or "sdxl" in str(named):  # named before the model loads
            assert not loads, kwargs
        loads.clear()
    assert tiny_taesd_source.config.latent_channels == 4


def test_nothing_reaches_the_network(
    monkeypatch, tiny_single_file, tiny_diffusers_dir, tiny_lora_kohya, tiny_taesd_dir
):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    model = load_model(
        tiny_single_file,
        config_dir=tiny_diffusers_dir,
        loras=[LoraSpec(tiny_lora_kohya)],
        vae=tiny_taesd_dir,
        **CPU32,
    )
    assert model.vae_kind == "taesd"


def test_single_file_loading_collects_garbage_a_few_times_at_most(
    monkeypatch, tiny_single_file, tiny_diffusers_dir
):
    # accelerate 0.32 ran gc.collect() for every tensor it placed: this tiny checkpoint took
    # 3.5 minutes to load (requirements.txt keeps it out; this catches a release that does so).
    collect = mock.Mock(wraps=gc.collect)
    monkeypatch.setattr(gc, "collect", collect)
    load_model(tiny_single_file, config_dir=tiny_diffusers_dir, **CPU32)
    calls = collect.call_count
    assert calls <= 4, f"{calls} full garbage collections while loading one single-file model"


def test_a_wrong_pick_is_named_before_the_loaded_model_is_let_go(
    tiny_diffusers_dir, tiny_lora_kohya, tiny_taesd_dir, tmp_path
):
    """A host keeps one model: a wrong file picked next (a LoRA as the model, a truncated
    download, a missing VAE) is named from its header, and the loaded model stays."""
    from streamv2v.session import ModelCache, ModelSpec

    let_go = []
    cache = ModelCache(let_go=lambda: let_go.append(True))
    good = ModelSpec(str(tiny_diffusers_dir), vae=str(tiny_taesd_dir), dtype="fp32", device="cpu")
    model = cache.get(good)
    truncated = tmp_path / "half.safetensors"
    truncated.write_bytes(tiny_lora_kohya.read_bytes()[:200])
    wrong = {
        "is a LoRA, not a model": ModelSpec(str(tiny_lora_kohya)),
        "damaged or incomplete": ModelSpec(str(truncated)),
        "does not exist": replace(good, vae=str(tmp_path / "nowhere")),
        "is a folder": good.with_lora(str(tmp_path), 1.0),
    }
    for message, spec in wrong.items():
        with pytest.raises(StreamV2VError, match=message):
            cache.get(spec)
        assert cache.loaded == good and not let_go
    assert cache.get(good) is model
