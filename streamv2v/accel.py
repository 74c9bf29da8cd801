"""The fast path: the per-frame step on static buffers, captured as CUDA graphs, compiled.

The plain step (``StreamV2V._step``) allocates its results anew every frame and lets the bank
grow; that keeps it easy to check against the authors' code, and makes it launch-bound on a
GPU (thousands of small kernels per frame, each queued by Python). Once a stream is primed
and its bank full, every tensor of a frame's step keeps its shape for the rest of the stream,
so the step can run on fixed buffers instead (``StaticStep``):

- the stream's state (latent buffer, residual noise, prompt embeddings) and the bank's
  tokens live in tensors that are updated in place (``FeatureBank.make_static``);
- the whole step, TAESD encode to decoded image, is captured once as a CUDA graph per kind
  of frame (one that updates the bank, one that only reads it) and replayed per frame, so a
  frame costs one launch and no host sync (a KL VAE samples its latent on the CPU, so it
  encodes outside the graph);
- with ``compile`` the UNet (bank reads and updates included, traced in the same graph) and
  TAESD are compiled by ``torch.compile`` (Inductor's fused kernels) before capture, and each
  layer's DyMe merge runs beside the rest of the frame on a stream of its own
  (``bank.dyme_update``; the bank's update operators act only in frames that update the bank,
  so one compiled graph serves both kinds). Inductor caches the compiled kernels on disk, in
  a folder that outlives a reboot (``compile_cache``), so a restart pays only the tracing;
- what is the same for every frame is computed once: the prompt's cross-attention keys and
  values (refilled in place when the prompt changes) and every ResNet's time embedding (the
  timesteps are fixed). On the GPU, self-attention's q, k, v come from one matrix product
  (attended by FlashAttention-4 where flash-attn-4 is installed and faster at the layer's
  shapes), and TAESD runs with cuDNN's fused convolution + ReLU.

Priming and the frames before the bank is full run the plain step, which is also the
reference: the fast path's output equals it within fp16 rounding (tested).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING

import torch

from .attention import (
    CachedCrossAttnProcessor,
    FusedProjection,
    bank_processors,
    pick_self_attention_kernel,
    project_context,
)
from .bank import join_updates, self_attention_layers
from .cachedir import kept_folder
from .capture import capture_graph
from .cudastreams import side_stream
from .errors import StreamV2VError, describe_failure
from .modes import ACCEL_MODES

if TYPE_CHECKING:
    from .loading import StreamModel
    from .stream import StreamV2V

log = logging.getLogger(__name__)

# State the step reads and rewrites; kept in fixed tensors while the fast path runs.
STATE_FIELDS = ("_buffer", "_stock_noise", "_init_noise", "_embeds")
WARMUP_CALLS = 2


def resolve_accel(mode: str, device: torch.device) -> tuple[str, str | None]:
    """The mode that will run on ``device``, and a message when it is not the one asked for.

    Acceleration is asked for by default, so its absence must not be an error: a CPU or Mac
    runs the plain step, a GPU without Triton gets CUDA graphs without compiling, and the
    message says why and what would change it.
    """
    if mode not in ACCEL_MODES:
        raise StreamV2VError(
            f"acceleration {mode!r} is unknown: use one of {', '.join(ACCEL_MODES)}"
        )
    if mode in ("off", "static"):
        return mode, None
    if device.type != "cuda":
        return "off", (
            f"acceleration '{mode}' needs an NVIDIA GPU (CUDA); running plain PyTorch on "
            f"{device.type}"
        )
    if mode == "compile":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "graphs", (
                "torch.compile needs Triton, which this PyTorch install lacks: using CUDA graphs "
                "without compiling (install triton, or triton-windows on Windows, for the "
                "fastest path)"
            )
    return mode, None


# Compiled graphs kept per function: each size, step count and bank kind needs its own (both
# kinds of frame share it). torch's default of 8 would silently fall back to uncompiled code
# after a few changes of settings.
RECOMPILE_LIMIT = 64


def _compiled(model: StreamModel, name: str, module: Callable) -> Callable:
    """One compiled wrapper per model and module, shared by every stream of that model."""
    cache = model.accelerated
    if name not in cache:
        import torch._dynamo

        config = torch._dynamo.config
        # ``cache_size_limit``: PyTorch before 2.7 knows only this name for it
        config.cache_size_limit = max(config.cache_size_limit, RECOMPILE_LIMIT)
        cache[name] = torch.compile(module, dynamic=False)
    return cache[name]


def first_compile_time() -> str:
    """How long the first compile takes, for the message that keeps the node from looking frozen.

    Inductor compiles its kernels on one thread on Windows (and where
    ``TORCHINDUCTOR_COMPILE_THREADS=1``). From empty caches, an H100 machine's first 4-step
    DyMe frame at 512 took 164 s on one thread, against 105 to 118 s on 16 (docs/performance.md).
    """
    from torch._inductor import config

    if config.compile_threads == 1:
        return "two to three minutes (Inductor compiles on one thread here)"
    return "one to two minutes"


def chosen_cache_dir() -> str | None:
    """``TORCHINDUCTOR_CACHE_DIR`` where the user set it (Inductor sets it to its default)."""
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not chosen:
        return None
    try:
        from torch._inductor.runtime.runtime_utils import default_cache_dir
    except ImportError:  # a PyTorch that keeps it elsewhere: its folder is left as it is
        return chosen
    return None if os.path.abspath(chosen) == os.path.abspath(default_cache_dir()) else chosen


@contextmanager
def compile_cache() -> Iterator[None]:
    """Compile into this pack's kept folder (``cachedir``) unless the user chose Inductor's.

    Inductor reads ``TORCHINDUCTOR_CACHE_DIR`` whenever it looks at its cache, so the setting
    is ours only while this pack compiles: other nodes' compiles keep their folder. A folder
    that cannot be made leaves Inductor's default, with a note in the log.
    """
    folder = None if chosen_cache_dir() else kept_folder("torchinductor", "Inductor")
    if folder is None:
        yield
        return
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    try:
        yield
    finally:
        if before is None:
            del os.environ["TORCHINDUCTOR_CACHE_DIR"]
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = before


def prepare_model(model: StreamModel) -> None:
    """Channels-last weights: cuDNN's fast convolutions want NHWC, and converting every
    activation to it per call took a fifth of the GPU time of the plain step."""
    if model.accelerated.get("channels_last"):
        return
    model.pipe.unet.to(memory_format=torch.channels_last)
    model.pipe.vae.to(memory_format=torch.channels_last)
    model.accelerated["channels_last"] = True


class StaticStep:
    """One stream's fast step; ``__call__`` runs a frame and returns its image (on device).

    The image tensor is overwritten by the next frame: callers copy what they keep.
    """

    def __init__(self, stream: StreamV2V, mode: str) -> None:
        self.stream = stream
        self.mode = mode
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        self.generation: int | None = None
        self.state: dict[str, torch.Tensor] = {}
        self._pool = None
        model = stream.model
        if mode != "static":
            prepare_model(model)
        unet = model.pipe.unet
        # TAESD's encode/decode are its encoder/decoder modules (no sampling, no RNG), so
        # they join the graph; a KL VAE samples its latent on the CPU, so it encodes outside.
        self.encode_inside = model.vae_kind == "taesd"
        self._use_functions(mode)
        self.input: torch.Tensor | None = None  # frame (TAESD) or latent (KL VAE)
        self.image: torch.Tensor | None = None
        self.time_embeddings: dict[str, torch.Tensor] | None = None
        # Cross-attention keys/values of the prompt, projected once per prompt (see
        # CachedCrossAttnProcessor); the step installs its own processors for that.
        self.context: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        names = list(stream._processors)
        projections = self_kernel = None
        if mode != "static":
            projections = fused_projections(model)
            self_kernel = pick_self_attention_kernel(stream.device, stream.dtype)
        processors = bank_processors(names, stream.bank, stream._kernel, projections, self_kernel)
        # What attends: the short name the benchmark prints.
        self.attention = stream.attention_backend
        if self_kernel is not None:
            self.attention = f"fa4+{self.attention}"
        layers = [name.removesuffix(".processor") for name in names]
        self._cross_layers = [
            layer
            for layer in layers
            if getattr(unet.get_submodule(layer), "is_cross_attention", False)
        ]
        for layer in self._cross_layers:
            processors[f"{layer}.processor"] = CachedCrossAttnProcessor(
                stream._kernel, self.context, layer
            )
        self.processors = processors

    def _use_functions(self, mode: str) -> None:
        """The UNet and TAESD as ``mode`` runs them: compiled, or as they are."""
        s, model = self.stream, self.stream.model
        compile_ = mode == "compile"
        unet = model.pipe.unet
        self.unet = _compiled(model, "unet", unet) if compile_ else unet
        if not self.encode_inside:
            self._encode, self._decode = s._encode, s._decode
            return
        vae = model.pipe.vae
        scale = vae.config.scaling_factor
        encoder, decoder = taesd_functions(vae, fused=mode != "static")
        if compile_:
            encoder = _compiled(model, "taesd_encoder", encoder)
            decoder = _compiled(model, "taesd_decoder", decoder)
        self._encode = lambda x: encoder(x) * scale
        self._decode = lambda z: decoder(z / scale)

    def ready(self) -> bool:
        """Whether the stream is primed and its bank full, i.e. every shape is final."""
        s = self.stream
        # A static bank is full (it is made static only then); checking the layers is not
        # needed every frame.
        return s._init_noise is not None and (s.bank.static or s.bank.is_full(s.bank_layers))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        s, bank = self.stream, self.stream.bank
        if self.image is None:
            self._allocate(x)
        bank.make_static(aside=self.mode == "compile")
        if "_embeds" in self._adopt_state() or not self.context:
            self._project_context()
        source = x if self.encode_inside else s._encode(x)
        self.input.copy_(source)
        if self.mode != "static":
            self._drop_stale_graphs()
        updating = bank.begin_step()
        try:
            if self.mode == "static":
                self._body()
            else:
                graph = self.graphs.get(updating) or self._capture(updating)
                graph.replay()
        finally:
            bank.end_step()
        return self.image

    # -- buffers -------------------------------------------------------------------------------

    def _allocate(self, x: torch.Tensor) -> None:
        s = self.stream
        self.input = torch.empty_like(x if self.encode_inside else s._init_noise[0:1])
        width, height = s.output_size
        self.image = torch.empty(height, width, 3, device=x.device, dtype=torch.float32)
        self.time_embeddings = time_embeddings(s.pipe.unet, s.unet_timesteps)
        self.state = {
            name: torch.empty_like(getattr(s, name))
            for name in STATE_FIELDS
            if getattr(s, name) is not None
        }

    def _adopt_state(self) -> set[str]:
        """Point the stream's state at the fixed tensors, copying in whatever replaced them
        (a new prompt, a rollback, plain steps in between); returns the names copied."""
        s = self.stream
        copied = set()
        for name, fixed in self.state.items():
            current = getattr(s, name)
            if current is not fixed:
                fixed.copy_(current)
                setattr(s, name, fixed)
                copied.add(name)
        return copied

    def _project_context(self) -> None:
        """Fill the cross-attention cache from the prompt, in place once graphs read it."""
        unet, embeds = self.stream.pipe.unet, self.stream._embeds
        for layer in self._cross_layers:
            projected = project_context(unet.get_submodule(layer), embeds)
            if layer in self.context:
                for old, new in zip(self.context[layer], projected):
                    old.copy_(new)
            else:
                self.context[layer] = projected

    # -- the step ------------------------------------------------------------------------------

    def _body(self) -> None:
        s = self.stream
        s.bank.draw()
        latent = self._encode(self.input) if self.encode_inside else self.input
        x_t = s._a[0] * latent + s._b[0] * s._init_noise[0]
        try:
            finished, buffer, stock = s._denoise(
                x_t, self.unet, self.processors, self.time_embeddings
            )
            if buffer is not None:
                s._buffer.copy_(buffer)
            s._stock_noise.copy_(stock)
            self.image.copy_(s._to_image(self._decode(finished)))
        finally:
            join_updates(self.image.device)

    def _capture(self, updating: bool) -> torch.cuda.CUDAGraph:
        """Warm up (compiling, picking cuDNN algorithms) and capture one kind of frame.

        Warm-up runs the step for real, so the state it changes is put back before capture:
        the graph must start from the stream's true state.
        """
        s, bank = self.stream, self.stream.bank
        # What torch.compile specialises on: frame size, stream batch rows and bank kind; not
        # whether the frame updates the bank, which the bank's update operators decide when
        # they run (``FeatureBank.make_static``), so both kinds of frame share one compile.
        variant = ("compiled", self.input.shape, s._embeds.shape, bank.config.kind)
        if self.mode == "compile" and variant not in s.model.accelerated:
            s.status(
                f"compiling the model for {s.output_size[0]}x{s.output_size[1]} frames at "
                f"{s.steps} steps: {first_compile_time()} the first time, cached on disk for "
                "later runs"
            )
        saved = {name: t.clone() for name, t in self.state.items()}, bank.snapshot()
        try:
            self._warm_up(updating)
        except Exception as exc:
            if self.mode != "compile" or isinstance(
                exc, (torch.cuda.OutOfMemoryError, StreamV2VError)
            ):
                raise
            self._restore(saved)
            self._stop_compiling(exc)
            self._warm_up(updating)  # what fails here too was not the compiler's: raised
            s.model.accelerated["compile_failed"] = s.accel_note  # later streams skip it
        self._restore(saved)
        s.model.accelerated[variant] = True

        generators = []
        if bank.generator is not None and bank.generator.device.type == "cuda":
            generators.append(bank.generator)
        with _cudnn_tuned(), bank.step_as(updating):
            graph, self._pool = capture_graph(self._body, pool=self._pool, generators=generators)
        self.graphs[updating] = graph
        return graph

    def _warm_up(self, updating: bool) -> None:
        """Run the step uncaptured: torch.compile compiles in the first call, cuDNN tunes."""
        side = side_stream(self.input.device, "warm-up")
        side.wait_stream(torch.cuda.current_stream())
        cache = compile_cache() if self.mode == "compile" else nullcontext()
        try:
            bank = self.stream.bank
            with torch.cuda.stream(side), _cudnn_tuned(), cache, bank.step_as(updating):
                for _ in range(WARMUP_CALLS):
                    self._body()
        finally:
            torch.cuda.current_stream().wait_stream(side)

    def _restore(self, saved: tuple[dict[str, torch.Tensor], tuple]) -> None:
        tensors, bank_state = saved
        for name, t in tensors.items():
            self.state[name].copy_(t)
        self.stream.bank.restore(bank_state)

    def _stop_compiling(self, exc: Exception) -> None:
        """Carry on with CUDA graphs of the uncompiled model when compiling fails here.

        What fails is the machine's, not the user's settings: Triton builds its launcher with a
        C compiler that slim images lack, and a Triton that does not match PyTorch fails to
        build kernels. The stream runs uncompiled and says why (and once that works, later
        streams of this model skip the attempt); a failure that is not the compiler's fails
        again uncompiled and is raised then.
        """
        s, bank = self.stream, self.stream.bank
        why = (
            f"compiling the model failed here ({describe_failure(exc)}): running uncompiled with "
            "CUDA graphs, which is slower; fix the cause (Triton needs a C compiler and a "
            "version matching this PyTorch) or set acceleration to 'graphs' to skip the attempt"
        )
        log.warning("%s", why)
        log.debug("what compiling raised", exc_info=exc)
        s.accel, s.accel_note = "graphs", why
        self.mode = "graphs"
        self._use_functions(self.mode)
        bank.make_static(aside=False)  # a DyMe merge beside the frame is compiled on its own
        self._drop_stale_graphs()
        s.status(why)

    def _drop_stale_graphs(self) -> None:
        """Forget graphs captured before the bank's tensors were replaced or its mode changed.

        Their memory pool goes with them: PyTorch frees a pool once no graph uses it, and
        capturing into a freed pool's handle fails its allocator's internal check (seen on an
        H100 when a stream's first graphs were dropped by a bank reset and captured again).
        """
        bank = self.stream.bank
        if bank.generation != self.generation:
            self.graphs.clear()
            self._pool = None
            self.generation = bank.generation


def fused_projections(model: StreamModel) -> dict[str, FusedProjection]:
    """Every self-attention layer's joined q/k/v weights, made once per model."""
    if "qkv" not in model.accelerated:
        unet = model.pipe.unet
        layers = self_attention_layers(unet.attn_processors.keys())
        model.accelerated["qkv"] = {
            layer: FusedProjection(unet.get_submodule(layer)) for layer in layers
        }
    return model.accelerated["qkv"]


# --------------------------------------------------------------------------------------------
# Time embeddings, computed once per stream
# --------------------------------------------------------------------------------------------


def time_embeddings(
    unet: torch.nn.Module, timesteps: torch.Tensor
) -> dict[str, torch.Tensor] | None:
    """Every ResNet's projected time embedding for ``timesteps`` (one per UNet batch row).

    A stream's timesteps never change, so neither do these: the UNet would redo 24 small
    matrix products for them every frame. Computed as ``UNet2DConditionModel.forward`` and
    ``ResnetBlock2D.forward`` do (tested equal); None for a UNet whose embedding also depends
    on other inputs (class labels, added conditions), which keeps computing its own.
    """
    config = unet.config
    if getattr(unet, "class_embedding", None) is not None or config.addition_embed_type:
        return None
    # get_time_embed reads its sample only for the batch size and dtype.
    rows = torch.empty(len(timesteps), 0, device=timesteps.device, dtype=unet.dtype)
    emb = unet.time_embedding(unet.get_time_embed(sample=rows, timestep=timesteps), None)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    return {
        name: block.time_emb_proj(emb if block.skip_time_act else block.nonlinearity(emb))
        for name, block in _timed_resnets(unet)
    }


def _timed_resnets(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, block) of every ResNet that projects the time embedding."""
    from diffusers.models.resnet import ResnetBlock2D

    return [
        (name, block)
        for name, block in unet.named_modules()
        if isinstance(block, ResnetBlock2D) and block.time_emb_proj is not None
    ]


class _TimeEmbeddingSlot:
    """Which precomputed time embeddings the UNet's next call uses (None: its own)."""

    current: dict[str, torch.Tensor] | None = None


def _swap_time_embedding(module: torch.nn.Module, args: tuple, output: torch.Tensor):
    """Forward hook on a ResNet's ``time_emb_proj``: the cached embedding, when there is one.

    The slot and the ResNet's name are the module's own attributes (not a closure), so a
    deep-copied UNet's hooks read the copy's slot.
    """
    cached = module._streamv2v_time_slot.current
    return output if cached is None else cached[module._streamv2v_time_name]


@contextmanager
def time_embeddings_in_use(
    unet: torch.nn.Module, cache: dict[str, torch.Tensor] | None
) -> Iterator[None]:
    """Within this block, the UNet's ResNets take their time embeddings from ``cache``.

    A forward hook on each ``time_emb_proj`` swaps in the cached tensor; torch.compile then
    drops the UNet's own time-embedding products as unused. The hooks are added once per UNet
    and read its slot, which is empty outside the block: any other call of the UNet (a plain
    step, computing another stream's cache) computes its own.
    """
    if cache is None:
        yield
        return
    slot = unet.__dict__.get("_streamv2v_time_slot")
    if slot is None:
        slot = unet._streamv2v_time_slot = _TimeEmbeddingSlot()
        for name, block in _timed_resnets(unet):
            block.time_emb_proj._streamv2v_time_slot = slot
            block.time_emb_proj._streamv2v_time_name = name
            block.time_emb_proj.register_forward_hook(_swap_time_embedding)
    slot.current = cache
    try:
        yield
    finally:
        slot.current = None


def _cudnn_tuned():
    """cuDNN's benchmarked algorithm choice, for warm-up and capture alike (the graph replays
    whatever algorithm capture picked)."""
    if not torch.backends.cudnn.is_available():
        return nullcontext()
    return torch.backends.cudnn.flags(
        enabled=True,
        benchmark=True,
        deterministic=False,
        allow_tf32=torch.backends.cudnn.allow_tf32,
    )


# --------------------------------------------------------------------------------------------
# TAESD with cuDNN's fused convolution + ReLU
# --------------------------------------------------------------------------------------------


def _conv_relu(conv: torch.nn.Conv2d, x: torch.Tensor, add: torch.Tensor | None):
    """``relu(conv(x) [+ add])`` as one cuDNN kernel: torch.compile leaves convolutions to
    cuDNN and cannot fuse the ReLU into them, so each would cost a pass over the activation."""
    args = (conv.stride, conv.padding, conv.dilation, conv.groups)
    if add is None:
        return torch.cudnn_convolution_relu(x, conv.weight, conv.bias, *args)
    return torch.cudnn_convolution_add_relu(x, conv.weight, add, 1.0, conv.bias, *args)


def _is_relu(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.ReLU)


def _fusable_block(module: torch.nn.Module) -> bool:
    """An ``AutoencoderTinyBlock`` with ReLUs: conv, relu, conv, relu, conv; relu(+ skip)."""
    conv, fuse = getattr(module, "conv", None), getattr(module, "fuse", None)
    return (
        isinstance(conv, torch.nn.Sequential)
        and len(conv) == 5
        and all(isinstance(conv[i], torch.nn.Conv2d) for i in (0, 2, 4))
        and _is_relu(conv[1])
        and _is_relu(conv[3])
        and _is_relu(fuse)
    )


# The fused steps hold their modules in closures, and nothing here has default arguments: what
# torch.compile reads through a default argument it tracks by a source (``DefaultsSource``)
# that PyTorch 2.11's Inductor cache cannot unpickle, and with the convolutions bound as
# default arguments the two TAESD graphs (the first and third compiled) were compiled again in
# every new process (H100 and H200, "fx graph cache unable to load compiled graph").


def _fused_conv(conv: torch.nn.Conv2d) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: _conv_relu(conv, x, None)


def _fused_block(block: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        h = _conv_relu(block.conv[2], _conv_relu(block.conv[0], x, None), None)
        return _conv_relu(block.conv[4], h, block.skip(x))

    return run


def fused_taesd_layers(layers: torch.nn.Sequential) -> Callable[[torch.Tensor], torch.Tensor]:
    """TAESD's ``layers`` with every convolution that a ReLU follows run fused, on CUDA.

    TAESD is ReLU after nearly every convolution, at full frame size and batch 1: fused, its
    compiled encode went from 0.68 to 0.58 ms and its decode from 0.75 to 0.64 ms at 512x512
    (H200, fp16). The arithmetic is the same: ReLU commutes with rounding, and a residual add
    is rounded once instead of twice.
    """
    plan: list[Callable[[torch.Tensor], torch.Tensor]] = []
    items = list(layers)
    i = 0
    while i < len(items):
        layer = items[i]
        if isinstance(layer, torch.nn.Conv2d) and i + 1 < len(items) and _is_relu(items[i + 1]):
            plan.append(_fused_conv(layer))
            i += 2
            continue
        plan.append(_fused_block(layer) if _fusable_block(layer) else layer)
        i += 1

    def run(x: torch.Tensor) -> torch.Tensor:
        for step in plan:
            x = step(x)
        return x

    return run


def taesd_functions(vae: torch.nn.Module, fused: bool) -> tuple[Callable, Callable]:
    """TAESD's encoder and decoder (image in [-1, 1] <-> unscaled latent), fused on CUDA.

    The scaling around ``layers`` is diffusers' ``EncoderTiny``/``DecoderTiny.forward``
    (tested against them): the fused path needs the layers themselves. Fused only in fp16,
    the precision it was measured and checked in on the GPU.
    """
    if not (fused and vae.dtype == torch.float16 and torch.backends.cudnn.is_available()):
        return vae.encoder, vae.decoder
    encode_layers = fused_taesd_layers(vae.encoder.layers)
    decode_layers = fused_taesd_layers(vae.decoder.layers)

    def encode(x: torch.Tensor) -> torch.Tensor:
        return encode_layers(x.add(1).div(2))

    def decode(z: torch.Tensor) -> torch.Tensor:
        return decode_layers(torch.tanh(z / 3) * 3).mul(2).sub(1)

    return encode, decode
