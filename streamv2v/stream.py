"""The stream batch: StreamDiffusion's pipelined denoising with StreamV2V's feature bank.

Each UNet call denoises S latents at once, one per denoising step: the newest frame at slot 0
and S-1 frames from earlier calls at slots 1..S-1. A frame therefore leaves the batch S-1 calls
after it entered. ``StreamV2V`` hides that lag where it must not show (``process``: output i is
the translation of input i, for every i) and states it where it must (``push``: live frames,
``lag`` frames behind).

Numerics follow the authors' code (StreamV2V on StreamDiffusion): the LCM scheduler at 50
steps, one fixed noise tensor per slot drawn once from the seed on the CPU, the batch primed by
feeding the first frame S times into a zero buffer, and the bank counting UNet calls from the
first priming call.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .accel import StaticStep, resolve_accel, time_embeddings_in_use
from .attention import bank_processors, pick_attention_kernel
from .bank import BankConfig, FeatureBank, read_bank_file, self_attention_layers
from .cudastreams import side_stream
from .errors import StreamV2VError
from .frames import MAX_SIDE, output_size, processing_size, resize, to_rgb
from .loading import StreamModel, quiet_libraries
from .modes import DEFAULT_ACCEL
from .similar import SimilarFrameFilter

with quiet_libraries():  # the pipeline's module pulls in transformers' image processors, which
    # warn on import where torchvision is missing (the command line without ComfyUI)
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (
        retrieve_latents,
    )

CFG_TYPES = ("none", "self", "initialize", "full")
SCHEDULER_STEPS = 50  # the LCM schedule t_index_list indexes into
MAX_STEPS = 4
STREAM_FILE_FORMAT = "streamv2v-stream"

log = logging.getLogger(__name__)


def t_index_list_from_strength(strength: float, steps: int) -> list[int]:
    """SDEdit's start point and even spacing over the 50-step LCM schedule (DESIGN.md)."""
    start = int(SCHEDULER_STEPS * (1 - strength))
    gap = int(SCHEDULER_STEPS * strength) // steps
    return [start + i * gap for i in range(steps)]


@dataclass(frozen=True)
class StreamConfig:
    """Denoising and stream settings; ``None`` means the paper's default, and for ``width`` and
    ``height`` the input's size (one of them alone keeps the input's aspect ratio).

    ``t_index_list`` replaces ``steps``/``strength``: giving both would leave one of them
    without effect, so it is refused.
    """

    steps: int | None = None
    strength: float | None = None
    t_index_list: tuple[int, ...] | None = None
    guidance: float = 1.0
    cfg_type: str = "none"
    delta: float = 1.0
    seed: int = 2
    width: int | None = None
    height: int | None = None
    similar_filter: float | None = None
    max_skip: int = 10

    def __post_init__(self) -> None:
        if self.t_index_list is not None:
            if self.steps is not None or self.strength is not None:
                raise StreamV2VError(
                    "t_index_list replaces steps and strength: give either t_index_list or "
                    "steps/strength, not both"
                )
            ts = tuple(self.t_index_list)
            object.__setattr__(self, "t_index_list", ts)  # lists from JSON/CLI compare equal
            if not 1 <= len(ts) <= MAX_STEPS:
                raise StreamV2VError(
                    f"t_index_list {list(ts)} has {len(ts)} entries: give 1 to {MAX_STEPS}"
                )
            if any(not isinstance(t, int) or not 0 <= t < SCHEDULER_STEPS for t in ts):
                raise StreamV2VError(
                    f"t_index_list {list(ts)} must hold whole numbers within 0..49 "
                    "(indices into the 50-step LCM schedule)"
                )
            if any(b <= a for a, b in zip(ts, ts[1:])):
                raise StreamV2VError(
                    f"t_index_list {list(ts)} must be strictly ascending (from noisy to clean)"
                )
        else:
            steps = 4 if self.steps is None else self.steps
            strength = 0.4 if self.strength is None else self.strength
            if not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
                raise StreamV2VError(f"steps must be 1 to {MAX_STEPS}, got {steps!r}")
            if not 0.0 < strength <= 1.0:
                raise StreamV2VError(f"strength must be within (0, 1], got {strength}")
            if int(SCHEDULER_STEPS * strength) // steps == 0:
                raise StreamV2VError(
                    f"strength {strength} is too low for {steps} steps (they would all be the "
                    f"same timestep): raise strength to at least {steps / SCHEDULER_STEPS:.2f} "
                    "or use fewer steps"
                )
        if self.cfg_type not in CFG_TYPES:
            raise StreamV2VError(
                f"cfg type {self.cfg_type!r} is unknown: use one of {', '.join(CFG_TYPES)}"
            )
        if not math.isfinite(self.guidance):
            raise StreamV2VError(
                f"guidance must be a finite number, got {self.guidance}: use 1.0 with cfg type "
                "none, or a value above 1.0 (e.g. 1.2) with self, initialize or full"
            )
        if self.cfg_type == "none" and self.guidance != 1.0:
            raise StreamV2VError(
                f"guidance {self.guidance} has no effect with cfg type 'none': set cfg type to "
                "self, initialize or full, or leave guidance at 1.0"
            )
        if self.cfg_type != "none" and not self.guidance > 1.0:
            raise StreamV2VError(
                f"cfg type {self.cfg_type!r} has no effect at guidance {self.guidance}: raise "
                "guidance above 1.0 (e.g. 1.2) or set cfg type to none"
            )
        if self.delta != 1.0 and self.cfg_type not in ("self", "initialize"):
            raise StreamV2VError(
                f"delta {self.delta} only acts with cfg type self or initialize: leave it at 1.0"
            )
        if not math.isfinite(self.delta) or self.delta < 0:
            raise StreamV2VError(f"delta must be a finite number >= 0, got {self.delta}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise StreamV2VError(f"seed must be a whole number within 0..2^63-1, got {self.seed!r}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 8 <= value <= MAX_SIDE):
                raise StreamV2VError(
                    f"{name} must be a whole number of pixels within 8..{MAX_SIDE}, got {value!r}"
                )
        if self.similar_filter is not None and not 0.0 < self.similar_filter < 1.0:
            raise StreamV2VError(
                f"similar-frame threshold must be a cosine similarity within (0, 1), got "
                f"{self.similar_filter} (StreamDiffusion uses 0.98)"
            )
        if not isinstance(self.max_skip, int) or self.max_skip < 1:
            raise StreamV2VError(
                f"max_skip must be a whole number of frames >= 1, got {self.max_skip!r} "
                "(default 10)"
            )
        if self.similar_filter is None and self.max_skip != 10:
            raise StreamV2VError(
                "max_skip only acts with the similar-frame filter: set a similar_filter threshold"
            )

    def check_negative_prompt(self, negative: str) -> None:
        """A negative prompt acts only through the unconditional rows of CFG initialize/full."""
        if negative.strip() and self.cfg_type not in ("initialize", "full"):
            raise StreamV2VError(
                f"a negative prompt has no effect with cfg type {self.cfg_type!r}: use cfg "
                "type initialize or full (with guidance > 1), or clear the negative prompt"
            )

    @property
    def unet_rows(self) -> int:
        """The UNet call's batch: a row per step, and CFG's unconditional rows."""
        steps = len(self.timestep_indices)
        return {"full": 2 * steps, "initialize": steps + 1}.get(self.cfg_type, steps)

    @property
    def timestep_indices(self) -> tuple[int, ...]:
        """The denoising steps as indices into the 50-step LCM schedule."""
        if self.t_index_list is not None:
            return self.t_index_list
        steps = 4 if self.steps is None else self.steps
        strength = 0.4 if self.strength is None else self.strength
        return tuple(t_index_list_from_strength(strength, steps))

    @property
    def cfg_active(self) -> bool:
        return self.cfg_type != "none"


# What changes as frames flow (everything ``_reset_stream`` sets), for checkpoints.
_STREAM_STATE = (
    "_tags",
    "_buffer",
    "_stock_noise",
    "_init_noise",
    "_input_size",
    "_next_index",
    "_last_input",
    "_last_processed",
    "_last_output",
    "_aliases",
)


# One frame at a time on each UNet. Streams of one model, each on a thread of its own (a live
# camera's and a queued run's, on two banks), install their own attention processors on it for
# each call, and on a GPU share its time-embedding slot, its compiled functions and the CUDA
# streams graphs are captured on.
_FRAME_LOCKS: weakref.WeakKeyDictionary[torch.nn.Module, threading.Lock] = (
    weakref.WeakKeyDictionary()
)
_FRAME_LOCKS_GUARD = threading.Lock()


def _frame_lock(unet: torch.nn.Module) -> threading.Lock:
    with _FRAME_LOCKS_GUARD:
        return _FRAME_LOCKS.setdefault(unet, threading.Lock())


class StreamV2V:
    """A video stream through an SD1.5/LCM model with a feature bank.

    The model is shared and never changed beyond its attention processors, which each stream
    installs for the duration of its own UNet calls; the bank is the caller's object, so it
    can be kept, reset, inspected and saved across streams.

    ``accel`` picks how frames run once the stream is primed (``accel.ACCEL_MODES``): by
    default compiled and captured as CUDA graphs on an NVIDIA GPU, plain PyTorch elsewhere
    (``accel_note`` then says why). ``on_status`` receives messages worth showing a user
    while they wait, such as compiling.
    """

    def __init__(
        self,
        model: StreamModel,
        config: StreamConfig | None = None,
        bank: FeatureBank | BankConfig | None = None,
        prompt: str = "",
        negative_prompt: str = "",
        accel: str = DEFAULT_ACCEL,
        on_status: Callable[[str], None] | None = None,
    ) -> None:
        self.model = model
        self.config = config or StreamConfig()
        if bank is None or isinstance(bank, BankConfig):
            bank = FeatureBank(bank)
        self.bank = bank
        self.pipe = model.pipe
        self.device = torch.device(model.device)
        self.dtype = model.dtype
        unet = self.pipe.unet
        if unet.config.in_channels != 4:
            raise StreamV2VError(
                f"this UNet takes {unet.config.in_channels} input channels; StreamV2V needs a "
                "plain SD1.5 text-to-image UNet (4 channels), not an inpainting or depth model"
            )
        self.bank_layers = self_attention_layers(unet.attn_processors.keys())
        self._check_bank_layers(self.bank_layers)
        self.on_status = on_status
        self.accel, self.accel_note = resolve_accel(accel, self.device)
        if self.accel == "compile" and "compile_failed" in model.accelerated:  # StaticStep's
            self.accel, self.accel_note = "graphs", model.accelerated["compile_failed"]
        if self.accel_note:
            log.info(self.accel_note)  # callers show it: accel_note

        c = self.config
        self.steps = len(c.timestep_indices)
        self.lag = self.steps - 1
        self.attention_backend, self._kernel = pick_attention_kernel(
            self.device, self.dtype, compiled=self.accel == "compile"
        )
        self._processors = bank_processors(list(unet.attn_processors.keys()), bank, self._kernel)

        self._setup_schedule()
        self.generator = torch.Generator().manual_seed(c.seed)
        self._filter = (
            SimilarFrameFilter(
                c.similar_filter, c.max_skip, torch.Generator().manual_seed(c.seed + 1)
            )
            if c.similar_filter is not None
            else None
        )
        self.bank.bind(self.device, c.seed)
        self.prompt = ""
        self.negative_prompt = ""
        self.set_prompt(prompt, negative_prompt)
        self._reset_stream()
        self._new_fast_step()

    def _new_fast_step(self) -> None:
        """A fresh fast step for a new video: its buffers take the shapes of its first frames."""
        self._fast = StaticStep(self, self.accel) if self.accel != "off" else None

    def status(self, text: str) -> None:
        """Tell the user what a long wait is (the log, and ``on_status`` when given)."""
        log.info(text)
        if self.on_status is not None:
            self.on_status(text)

    # -- setup ---------------------------------------------------------------------------------

    def _check_bank_layers(self, layers: list[str]) -> None:
        if self.bank.layers and set(self.bank.layers) != set(layers):
            raise StreamV2VError(
                "the feature bank was filled by a model with other attention layers: reset the "
                "bank or use a new one with this model"
            )

    def _setup_schedule(self) -> None:
        from diffusers import LCMScheduler

        # Only LCM's own keys: a PNDM/DDIM config's extras would each log a warning.
        known = inspect.signature(LCMScheduler.__init__).parameters
        config = {k: v for k, v in self.pipe.scheduler.config.items() if k in known}
        scheduler = LCMScheduler.from_config(config)
        scheduler.set_timesteps(SCHEDULER_STEPS, self.device)
        timesteps = [scheduler.timesteps[i] for i in self.config.timestep_indices]
        self.timesteps = torch.tensor(timesteps, dtype=torch.long, device=self.device)
        self.unet_timesteps = self._cfg_rows(self.timesteps)  # the UNet call's, fixed

        def column(values: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack(values).view(-1, 1, 1, 1).to(device=self.device, dtype=self.dtype)

        alphas = scheduler.alphas_cumprod
        self._a = column([alphas[t].sqrt() for t in timesteps])
        self._b = column([(1 - alphas[t]).sqrt() for t in timesteps])
        scalings = [scheduler.get_scalings_for_boundary_condition_discrete(t) for t in timesteps]
        self._c_skip = column([torch.as_tensor(s[0]) for s in scalings])
        self._c_out = column([torch.as_tensor(s[1]) for s in scalings])

    def set_prompt(self, prompt: str, negative_prompt: str | None = None) -> None:
        """Change what the stream is steered to, mid-stream, without touching the bank."""
        if not isinstance(prompt, str):
            raise StreamV2VError(f"prompt must be text, got {type(prompt).__name__}")
        negative = self.negative_prompt if negative_prompt is None else negative_prompt
        if not isinstance(negative, str):
            raise StreamV2VError(f"negative prompt must be text, got {type(negative).__name__}")
        self.config.check_negative_prompt(negative)
        with torch.inference_mode():
            cond, uncond = self.pipe.encode_prompt(
                prompt=prompt,
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=True,
                negative_prompt=negative,
            )
        embeds = cond.repeat(self.steps, 1, 1)
        if self.config.cfg_type == "full":
            embeds = torch.cat([uncond.repeat(self.steps, 1, 1), embeds])
        elif self.config.cfg_type == "initialize":
            embeds = torch.cat([uncond, embeds])
        self._embeds = embeds.to(self.dtype)
        self.prompt, self.negative_prompt = prompt, negative

    def _reset_stream(self) -> None:
        self._tags: list[int | None] = [None] * self.steps
        self._buffer: torch.Tensor | None = None
        self._stock_noise: torch.Tensor | None = None
        self._init_noise: torch.Tensor | None = None
        self._input_size: tuple[int, int] | None = None  # (height, width) of frames pushed
        self._next_index = 0
        self._last_input: torch.Tensor | None = None
        self._last_processed: int | None = None
        self._last_output: torch.Tensor | None = None
        self._aliases: dict[int, list[int]] = {}

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(width, height) of the frames this stream returns, once the first frame set it."""
        if self._input_size is None:
            return None
        h, w = self._input_size
        return output_size(self.config.width, self.config.height, w, h)

    # -- frames in and out ---------------------------------------------------------------------

    def _prepare(self, frame: np.ndarray | torch.Tensor, index: int) -> torch.Tensor:
        rgb = to_rgb(frame, f"frame {index}")
        size = (rgb.shape[0], rgb.shape[1])
        if self._input_size is None:
            self._input_size = size
        elif size != self._input_size:
            h, w = self._input_size
            raise StreamV2VError(
                f"frame {index} is {size[1]}x{size[0]} but this stream's frames are {w}x{h}: "
                "resize all frames to one size, or start a new stream"
            )
        pw, ph = processing_size(*self.output_size)
        x = self.upload(rgb).permute(2, 0, 1).unsqueeze(0)
        x = resize(x, pw, ph)
        return (x * 2 - 1).to(self.dtype)

    def upload(self, frames: torch.Tensor) -> torch.Tensor:
        """``frames`` on the model's device; from the CPU to a GPU through pinned memory on a
        copy stream of its own.

        From pageable memory the copy would wait for the GPU to finish every frame queued so
        far; on the compute stream it would queue behind them and hold up the frames after it.
        On its own stream it overlaps the frames being computed.
        """
        if self.device.type != "cuda" or frames.device.type != "cpu":
            return frames.to(self.device)
        copies = side_stream(self.device, "copies")
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(copies):
            moved = frames.pin_memory().to(self.device, non_blocking=True)
        compute.wait_stream(copies)
        moved.record_stream(compute)  # its memory is reused only once computing is done with it
        return moved

    def _to_image(self, decoded: torch.Tensor) -> torch.Tensor:
        """``[H, W, 3]`` float32 in 0..1 at the output size, still on the model's device."""
        width, height = self.output_size
        image = (decoded.float() / 2 + 0.5).clamp(0, 1)
        image = resize(image, width, height).clamp(0, 1)
        return image[0].permute(1, 2, 0)

    # -- the denoising step --------------------------------------------------------------------

    def _start(self, x: torch.Tensor) -> None:
        """Draw the per-slot noise and prime the batch with the first frame, as the authors do."""
        _, _, h, w = x.shape
        shape = (self.steps, 4, h // 8, w // 8)
        self._init_noise = torch.randn(shape, generator=self.generator).to(self.device, self.dtype)
        if self.device.type == "cpu" and self.bank.steps == 0:
            # The authors' CPU DyMe draws continue torch's global generator after their
            # prepare() drew this noise from it; VAE sampling keeps drawing from our own.
            self.bank.generator.set_state(self.generator.get_state())
        self._stock_noise = torch.zeros_like(self._init_noise)
        if self.steps > 1:
            self._buffer = torch.zeros_like(self._init_noise[1:])
        for _ in range(self.steps):
            self._step(x, None)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        return retrieve_latents(vae.encode(x), self.generator) * vae.config.scaling_factor

    def _decode(self, latent: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        return vae.decode(latent / vae.config.scaling_factor, return_dict=False)[0]

    def _install_processors(self, processors: dict[str, object]) -> None:
        """Put ``processors`` (this stream's map, or its fast path's) on the shared UNet,
        unless that very map is there already."""
        unet = self.pipe.unet
        if getattr(unet, "_streamv2v_processors", None) is not processors:
            unet.set_attn_processor(dict(processors))
            unet._streamv2v_processors = processors

    def _cfg_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (one row per stream-batch slot) as the UNet call's batch, with the
        unconditional rows CFG adds in front."""
        cfg = self.config.cfg_type
        if cfg == "initialize":
            return torch.cat([x[0:1], x])
        if cfg == "full":
            return torch.cat([x, x])
        return x

    def _denoise(
        self,
        x_t: torch.Tensor,
        unet: Callable,
        processors: dict[str, object] | None = None,
        time_embeddings: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """One UNet call over the stream batch; returns (finished x0, next buffer, stock noise).

        Nothing of the stream's own state changes here, so a failure leaves it as it was. The
        bank's step is begun and ended by the caller (the fast path captures both kinds).
        """
        c, a, b = self.config, self._a, self._b
        noise = self._init_noise
        if self.steps > 1:
            x = torch.cat([x_t, self._buffer])
            stock = torch.cat([noise[0:1], self._stock_noise[:-1]])
        else:
            x, stock = x_t, self._stock_noise
        x_in, t_in = self._cfg_rows(x), self.unet_timesteps

        self._install_processors(processors or self._processors)
        with time_embeddings_in_use(self.pipe.unet, time_embeddings):
            eps = unet(x_in, t_in, encoder_hidden_states=self._embeds, return_dict=False)[0]

        if c.cfg_type == "initialize":
            eps_text = eps[1:]
            stock = torch.cat([eps[0:1], stock[1:]])
        elif c.cfg_type == "full":
            eps_uncond, eps_text = eps.chunk(2)
        else:
            eps_text = eps
        if c.cfg_type in ("self", "initialize"):
            eps_uncond = stock * c.delta
        eps = eps_uncond + c.guidance * (eps_text - eps_uncond) if c.cfg_active else eps_text

        x0 = self._c_out * ((x - b * eps) / a) + self._c_skip * x
        if c.cfg_type in ("self", "initialize"):
            # Residual CFG: the next call's virtual negative noise (StreamDiffusion).
            scaled = b * stock
            delta_x = self._c_out * ((scaled - b * eps) / a) + self._c_skip * scaled
            one = torch.ones_like(a[0:1])
            delta_x = torch.cat([a[1:], one]) * delta_x / torch.cat([b[1:], one])
            stock = torch.cat([noise[1:], noise[0:1]]) + delta_x
        buffer = a[1:] * x0[:-1] + b[1:] * noise[1:] if self.steps > 1 else None
        return x0[-1:], buffer, stock

    def _step(self, x: torch.Tensor, tag: int | None) -> list[tuple[int, torch.Tensor]]:
        """Run one frame (``tag`` None for priming/flush frames that are never shown).

        Images come back on the model's device; the fast path once every shape is final.
        """
        with _frame_lock(self.pipe.unet):
            return self._step_alone(x, tag)

    def _step_alone(self, x: torch.Tensor, tag: int | None) -> list[tuple[int, torch.Tensor]]:
        if self._fast is not None and self._fast.ready():
            fast_image = self._fast(x)

            def finish() -> torch.Tensor:  # the fast path rewrites its image next frame
                return fast_image.clone()
        else:
            latent = self._encode(x)
            x_t = self._a[0] * latent + self._b[0] * self._init_noise[0]
            self.bank.begin_step()
            try:
                finished, buffer, stock = self._denoise(x_t, self.pipe.unet)
            finally:
                self.bank.end_step()
            self._buffer, self._stock_noise = buffer, stock

            def finish() -> torch.Tensor:  # decoded only for frames that are shown
                return self._to_image(self._decode(finished))

        self._tags = [tag, *self._tags[:-1]]
        done = self._tags[-1]
        if done is None:
            return []
        image = finish()
        self._last_output = image
        return [(done, image)] + [(i, image) for i in self._aliases.pop(done, [])]

    # -- public API ----------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Frames pushed whose outputs have not come out yet: the next outputs are theirs."""
        in_batch = sum(tag is not None for tag in self._tags[:-1])
        return in_batch + sum(len(skipped) for skipped in self._aliases.values())

    def push(self, frame: np.ndarray | torch.Tensor, to_cpu: bool = True) -> list[torch.Tensor]:
        """Live mode: feed one frame, get the outputs that became ready (``lag`` frames behind).

        Returns ``[]`` while the stream fills, then usually one frame per push. A frame the
        similar-frame filter skips costs no UNet call and repeats its predecessor's output.
        ``to_cpu=False`` leaves images on the model's device, so a caller collecting many
        frames can move them in one transfer instead of waiting for the GPU every frame.
        """
        return [image.cpu() if to_cpu else image for _, image in self._push(frame)]

    def _push(self, frame: np.ndarray | torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        with torch.inference_mode():
            index = self._next_index
            x = self._prepare(frame, index)
            if self._init_noise is None:
                self._start(x)
            self._next_index += 1
            self._last_input = x
            if self._filter is not None and self._filter.should_skip(x):
                source = self._last_processed
                if source in self._tags[:-1]:  # still in the batch (the last slot is done)
                    self._aliases.setdefault(source, []).append(index)
                    return []
                return [(index, self._last_output)]
            self._last_processed = index
            return self._step(x, index)

    def flush(self, keep_state: bool = False, to_cpu: bool = True) -> list[torch.Tensor]:
        """Finish every frame still in the batch by repeating the last input.

        With ``keep_state`` the stream (bank included) is put back as it was afterwards, so the
        next frames continue the real video rather than the repeated last frame: this is how a
        video split into chunks, or a live source, gets outputs now and continues later.
        """
        saved = self.checkpoint() if keep_state else None
        outputs: list[torch.Tensor] = []
        try:
            with torch.inference_mode():
                while any(tag is not None for tag in self._tags[:-1]):
                    outputs += [
                        image.cpu() if to_cpu else image
                        for _, image in self._step(self._last_input, None)
                    ]
        finally:
            if saved is not None:
                self.rollback(saved)
        return outputs

    def checkpoint(self) -> tuple:
        """The stream's state (bank included), to ``rollback`` to after a failed run.

        Cheap: most tensors are replaced between frames, never modified, so references
        suffice; the few the fast path rewrites in place are cloned.
        """
        filter_state = None
        if self._filter is not None:
            f = self._filter
            filter_state = (f.previous, f.skipped_in_a_row, f.generator.get_state())
        fields = {k: v for k, v in vars(self).items() if k in _STREAM_STATE}
        for name in ("_buffer", "_stock_noise"):  # the fast path rewrites these in place
            if fields[name] is not None:
                fields[name] = fields[name].clone()
        fields["_tags"] = list(self._tags)
        fields["_aliases"] = {k: list(v) for k, v in self._aliases.items()}
        return self.bank.snapshot(), fields, self.generator.get_state(), filter_state

    def rollback(self, checkpoint: tuple) -> None:
        bank, fields, generator, filter_state = checkpoint
        self.bank.restore(bank)
        for name, value in fields.items():
            setattr(self, name, value)
        self._tags = list(self._tags)
        self._aliases = {k: list(v) for k, v in self._aliases.items()}
        self.generator.set_state(generator)
        if filter_state is not None:
            f = self._filter
            f.previous, f.skipped_in_a_row = filter_state[0], filter_state[1]
            f.generator.set_state(filter_state[2])

    def process(self, frames: Iterable[np.ndarray | torch.Tensor]) -> Iterator[torch.Tensor]:
        """Aligned mode: exactly one output per input, output i translating input i."""
        count = 0
        for frame in frames:
            count += 1
            yield from self.push(frame)
        if count == 0:
            raise StreamV2VError("the video has no frames: give at least one frame")
        yield from self.flush()

    def reset(self) -> None:
        """Start a new video: empty the batch and the bank, redraw the seed's noise."""
        self.bank.reset()
        self.generator.manual_seed(self.config.seed)
        if self._filter is not None:
            self._filter = SimilarFrameFilter(
                self.config.similar_filter,
                self.config.max_skip,
                torch.Generator().manual_seed(self.config.seed + 1),
            )
        self._reset_stream()
        self._new_fast_step()

    # -- persistence ---------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Save bank and in-flight batch, so ``load`` continues exactly where this stream is."""
        from safetensors.torch import save_file

        if self._init_noise is None:
            raise StreamV2VError("nothing to save yet: push at least one frame first")
        if self._filter is not None:
            raise StreamV2VError(
                "streams with the similar-frame filter cannot be saved: turn the filter off"
            )
        bank_tensors, bank_meta = self.bank.state_dict()
        tensors = {f"bank/{k}": v for k, v in bank_tensors.items()}
        tensors["stream/init_noise"] = self._init_noise
        tensors["stream/stock_noise"] = self._stock_noise
        tensors["stream/last_input"] = self._last_input
        tensors["stream/generator_state"] = self.generator.get_state()
        if self._buffer is not None:
            tensors["stream/buffer"] = self._buffer
        stream_meta = {
            "config": asdict(self.config),
            "tags": self._tags,
            "input_size": list(self._input_size),
            "next_index": self._next_index,
            "last_processed": self._last_processed,
        }
        meta = dict(bank_meta, stream=json.dumps(stream_meta))
        meta["format"] = STREAM_FILE_FORMAT
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), meta)

    def load(self, path: str | Path) -> None:
        """Continue a stream saved by ``save`` (same model, settings and frame size)."""
        tensors, meta = read_bank_file(path, expect=STREAM_FILE_FORMAT)
        state = json.loads(meta["stream"])
        if StreamConfig(**state["config"]) != self.config:
            raise StreamV2VError(
                f"{path} was saved by a stream with settings {state['config']}, which differ "
                "from this stream's: create the stream with the same settings"
            )
        bank_tensors = {k[5:]: v for k, v in tensors.items() if k.startswith("bank/")}
        self.bank.load_state_dict(bank_tensors, meta)
        self.bank.to(self.device, self.dtype)
        self._check_bank_layers(self.bank_layers)
        self._reset_stream()
        self._new_fast_step()

        def get(name: str) -> torch.Tensor:
            return tensors[f"stream/{name}"].to(self.device, self.dtype)

        self._init_noise = get("init_noise")
        self._stock_noise = get("stock_noise")
        self._last_input = get("last_input")
        self._buffer = get("buffer") if "stream/buffer" in tensors else None
        self.generator.set_state(tensors["stream/generator_state"])
        self._tags = state["tags"]
        self._input_size = tuple(state["input_size"])
        self._next_index = state["next_index"]
        self._last_processed = state["last_processed"]
