"""Session-wide tiny models on disk, in every format a user can hand the loader.

Everything is built once per test session into a temporary folder from fixed seeds
(see ``tinymodels``); tests must treat these files and the ``tiny_source`` pipeline as
read-only. ``tiny_model`` and ``tiny_model_taesd`` give each test its own copy, so a test
may patch the UNet (attention processors, feature bank) without affecting others.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["DIFFUSERS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import tinymodels  # noqa: E402
import torch  # noqa: E402

# Tiny models gain nothing from intra-op threads, and on a 2-core machine shared with anything
# else the thread pools oversubscribe the cores: measured here, the suite took 64 s with one
# thread and 23 minutes with the default two while another process ran.
torch.set_num_threads(1)
from diffusers import AutoencoderTiny, StableDiffusionPipeline  # noqa: E402


@pytest.fixture(scope="session")
def tiny_source() -> StableDiffusionPipeline:
    """The in-memory model every artifact below was written from (read-only)."""
    return tinymodels.tiny_pipeline()


@pytest.fixture(scope="session")
def tiny_taesd_source() -> AutoencoderTiny:
    """The in-memory TAESD the TAESD artifacts were written from (read-only)."""
    return tinymodels.tiny_taesd()


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def tiny_diffusers_dir(tiny_root: Path, tiny_source: StableDiffusionPipeline) -> Path:
    """A diffusers pipeline folder (``model_index.json``, PNDM scheduler, no safety checker)."""
    return tinymodels.write_diffusers_dir(tiny_source, tiny_root / "tiny-sd15-diffusers")


@pytest.fixture(scope="session")
def tiny_vae_dir(tiny_diffusers_dir: Path) -> Path:
    """A diffusers AutoencoderKL folder (the tiny model's own VAE)."""
    return tiny_diffusers_dir / "vae"


@pytest.fixture(scope="session")
def tiny_single_file(tiny_root: Path, tiny_source: StableDiffusionPipeline) -> Path:
    """The same model as one ``.safetensors`` in the original SD (LDM) key layout."""
    return tinymodels.write_single_file(tiny_source, tiny_root / "tiny-sd15.safetensors")


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_root: Path, tiny_source: StableDiffusionPipeline) -> Path:
    """The same model as a ``.ckpt`` (``{"state_dict": ...}``, tensors only)."""
    return tinymodels.write_ckpt(tiny_source, tiny_root / "tiny-sd15.ckpt")


@pytest.fixture(scope="session")
def tiny_lora_kohya(tiny_root: Path, tiny_source: StableDiffusionPipeline) -> Path:
    """kohya-style LoRA (UNet + text encoder), seed ``LORA_KOHYA_SEED``."""
    return tinymodels.write_lora_kohya(
        tiny_source, tiny_root / "style-kohya.safetensors", tinymodels.LORA_KOHYA_SEED
    )


@pytest.fixture(scope="session")
def tiny_lora_diffusers(tiny_root: Path, tiny_source: StableDiffusionPipeline) -> Path:
    """diffusers/peft-style LoRA (UNet + text encoder), seed ``LORA_DIFFUSERS_SEED``."""
    return tinymodels.write_lora_diffusers(
        tiny_source, tiny_root / "style-diffusers.safetensors", tinymodels.LORA_DIFFUSERS_SEED
    )


@pytest.fixture(scope="session")
def tiny_lcm_lora(tiny_root: Path, tiny_source: StableDiffusionPipeline) -> Path:
    """Stands in for the LCM-LoRA: a UNet-only kohya-style LoRA, seed ``LCM_LORA_SEED``."""
    return tinymodels.write_lora_kohya(
        tiny_source,
        tiny_root / "lcm-lora-tiny.safetensors",
        tinymodels.LCM_LORA_SEED,
        text_encoder=False,
    )


@pytest.fixture(scope="session")
def tiny_taesd_dir(tiny_root: Path, tiny_taesd_source: AutoencoderTiny) -> Path:
    """A ComfyUI ``models/vae_approx``-style folder with ``taesd_encoder/decoder.safetensors``."""
    return tinymodels.write_taesd_vae_approx(tiny_taesd_source, tiny_root / "vae_approx")


@pytest.fixture(scope="session")
def tiny_taesd_diffusers_dir(tiny_root: Path, tiny_taesd_source: AutoencoderTiny) -> Path:
    """The same TAESD as a diffusers AutoencoderTiny folder."""
    return tinymodels.write_taesd_diffusers(tiny_taesd_source, tiny_root / "taesd-diffusers")


@pytest.fixture(scope="session")
def _tiny_model_shared(tiny_diffusers_dir: Path):
    from streamv2v.loading import load_model

    return load_model(tiny_diffusers_dir, dtype="fp32", device="cpu")


@pytest.fixture(scope="session")
def _tiny_model_taesd_shared(tiny_diffusers_dir: Path, tiny_taesd_dir: Path):
    from streamv2v.loading import load_model

    return load_model(tiny_diffusers_dir, vae=tiny_taesd_dir, dtype="fp32", device="cpu")


@pytest.fixture
def tiny_model(_tiny_model_shared):
    """A loaded ``StreamModel`` (fp32, CPU, the model's own AutoencoderKL), private to the test."""
    return copy.deepcopy(_tiny_model_shared)


@pytest.fixture
def tiny_model_taesd(_tiny_model_taesd_shared):
    """A loaded ``StreamModel`` (fp32, CPU, TAESD from vae_approx files), private to the test."""
    return copy.deepcopy(_tiny_model_taesd_shared)


@pytest.fixture(scope="session")
def comfy_models_dir(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_diffusers_dir: Path,
    tiny_lcm_lora: Path,
    tiny_taesd_dir: Path,
) -> Path:
    """ComfyUI model folders holding the tiny models, for the tests against a real ComfyUI."""
    from comfy_server import place_tiny_models

    root = tmp_path_factory.mktemp("comfy_models")
    return place_tiny_models(root, tiny_diffusers_dir, tiny_lcm_lora, tiny_taesd_dir)
