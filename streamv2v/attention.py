"""Attention processors that connect a diffusers UNet to the feature bank.

One small class per behaviour, as diffusers does it: ``BankSelfAttnProcessor`` runs a
self-attention layer with extended attention, feature fusion and the bank update; every other
layer keeps a plain processor. The attention kernel itself is chosen once (PyTorch SDPA, or
xformers when it is installed and works on the device) and shared by both; the fast path may
give self-attention FlashAttention-4's kernel instead (``pick_self_attention_kernel``).
"""

from __future__ import annotations

import functools
import logging
import os
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .bank import FeatureBank, fuse, self_attention_layers

if TYPE_CHECKING:
    from diffusers.models.attention_processor import Attention
from .cachedir import kept_folder
from .capture import capture_graph
from .cudastreams import side_stream
from .errors import describe_failure

log = logging.getLogger(__name__)

# (query, key, value, heads) -> output; q/k/v are [batch, tokens, heads * head_dim].
AttentionKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def sdpa_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int
) -> torch.Tensor:
    batch, _, inner = query.shape
    head_dim = inner // heads
    q, k, v = (x.view(batch, -1, heads, head_dim).transpose(1, 2) for x in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(batch, -1, inner).to(query.dtype)


def xformers_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int
) -> torch.Tensor:
    import xformers.ops

    batch, _, inner = query.shape
    head_dim = inner // heads
    q, k, v = (x.view(batch, -1, heads, head_dim) for x in (query, key, value))
    out = xformers.ops.memory_efficient_attention(q, k, v)
    return out.reshape(batch, -1, inner).to(query.dtype)


def pick_attention_kernel(
    device: torch.device, dtype: torch.dtype, compiled: bool = False
) -> tuple[str, AttentionKernel]:
    """xformers when installed and working on this device, PyTorch SDPA otherwise.

    xformers is tried on a tiny input first: a build that imports but lacks kernels for this
    GPU or dtype would otherwise fail in the middle of the first frame. A UNet that will be
    compiled always gets SDPA: torch.compile traces it into the graph (and picks cuDNN's
    attention on Hopper), where an xformers call would split the graph at every layer.
    """
    if compiled:
        return "sdpa", sdpa_attention
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        return "sdpa", sdpa_attention
    try:
        probe = torch.zeros(1, 8, 64, device=device, dtype=dtype)
        xformers_attention(probe, probe, probe, 1)
    except Exception as exc:  # any failure means "not usable here", never a crash
        log.info("xformers is installed but unusable on %s (%s); using PyTorch SDPA", device, exc)
        return "sdpa", sdpa_attention
    return "xformers", xformers_attention


@torch.library.custom_op("streamv2v::flash_attention", mutates_args=())
def flash_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int
) -> torch.Tensor:
    """FlashAttention-4's kernel (the optional ``flash-attn-4`` package).

    An operator, so that torch.compile calls it as it is instead of tracing into its
    just-in-time compiler. It reads q, k, v in their ``[batch, tokens, heads, head_dim]``
    layout (as strided views, no transposes) and writes the output in the layer's own layout.
    """
    from flash_attn.cute import flash_attn_func

    batch, tokens, _ = query.shape
    q, k, v = (x.view(batch, -1, heads, x.shape[-1] // heads) for x in (query, key, value))
    with warnings.catch_warnings():  # its compiler's note on an argument it keeps as is
        warnings.filterwarnings("ignore", "Argument aux_data", UserWarning)
        out = flash_attn_func(q, k, v)
    if isinstance(out, tuple):  # (output, log-sum-exp)
        out = out[0]
    return out.reshape(batch, tokens, -1)


@flash_attention.register_fake
def _(query, key, value, heads):
    return query.new_empty(*query.shape[:-1], value.shape[-1])


def flash_where_faster(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int
) -> torch.Tensor:
    """flash-attn-4 where it has a kernel for the head size (fp16: a multiple of 8 up to 256;
    SD1.5's are 40, 80 and 160) and runs faster than SDPA at these shapes on this GPU (timed
    once per shape, ``flash_is_faster``); SDPA elsewhere."""
    head_dim = query.shape[-1] // heads
    if head_dim % 8 or head_dim > 256:
        return sdpa_attention(query, key, value, heads)
    shapes = (tuple(query.shape), tuple(key.shape), tuple(value.shape))
    if flash_is_faster(query.device, query.dtype, shapes, heads):
        return flash_attention(query, key, value, heads)
    return sdpa_attention(query, key, value, heads)


# (device, dtype, (q, k, v shapes), heads) -> (flash-attn-4's time, SDPA's) in seconds, or
# the reason flash-attn-4 failed at these shapes.
KERNEL_TIMES: dict[tuple, tuple[float, float] | str] = {}


@torch.compiler.assume_constant_result
def flash_is_faster(
    device: torch.device,
    dtype: torch.dtype,
    shapes: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]],
    heads: int,
) -> bool:
    """Whether flash-attn-4's kernel beats SDPA's at these shapes, timed on first asking.

    Which kernel wins depends on the GPU, the head size and the batch, not on a rule that
    holds everywhere: on H100 and H200 GPUs at SD1.5's shapes flash-attn-4 is faster at head
    size 40 with a batch of 4, and slower at head size 80 and at batch 1 (docs/performance.md). So
    each shape is measured here, as the graphs that will run it replay it. torch.compile calls
    this while tracing (its result is a constant of the graph), so the choice costs nothing per
    frame. A kernel that fails at these shapes loses, said once in the log.
    """
    signature = (device, dtype, shapes, heads)
    if signature not in KERNEL_TIMES:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return True  # cannot time inside a capture: the fast path's default
        gen = torch.Generator(device=device).manual_seed(0)  # the global RNG is not ours
        q, k, v = (torch.rand(s, generator=gen, device=device).to(dtype) for s in shapes)
        try:
            flash = time_kernel(flash_attention, q, k, v, heads)
        except Exception as exc:  # a kernel it lacks here is no error of the user's
            KERNEL_TIMES[signature] = why = describe_failure(exc)
            log.info("flash-attn-4 fails at shapes %s (%s): SDPA attends", shapes, why)
        else:
            KERNEL_TIMES[signature] = (flash, time_kernel(sdpa_attention, q, k, v, heads))
    times = KERNEL_TIMES[signature]
    return not isinstance(times, str) and times[0] < times[1]


def time_kernel(kernel: AttentionKernel, *args) -> float:
    """Seconds per call of ``kernel(*args)``: on a GPU as a CUDA graph replays it (kernels back
    to back, no launch gaps, which would hide a small kernel's speed behind its launch cost)."""
    kernel(*args)  # a just-in-time compiler compiles it now, outside the timing
    if args[0].device.type != "cuda":
        start = time.perf_counter()
        for _ in range(TIMED_CALLS):
            kernel(*args)
        return (time.perf_counter() - start) / TIMED_CALLS
    side = side_stream(args[0].device, "warm-up")
    side.wait_stream(torch.cuda.current_stream(args[0].device))

    def calls() -> None:
        for _ in range(TIMED_CALLS):
            kernel(*args)

    with torch.cuda.stream(side):
        kernel(*args)
        graph, _ = capture_graph(calls, stream=side)
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        best = float("inf")
        for _ in range(3):
            start.record(side)
            graph.replay()
            end.record(side)
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1000 / TIMED_CALLS)
    return best


TIMED_CALLS = 10
FLASH_SWITCH = "STREAMV2V_FLASH_ATTENTION"


@functools.cache
def pick_self_attention_kernel(device: torch.device, dtype: torch.dtype) -> AttentionKernel | None:
    """FlashAttention-4 for the fast path's self-attention where installed and faster.

    Measured on Hopper GPUs (docs/performance.md): on an H200 flash-attn-4's kernel beats
    cuDNN's (PyTorch SDPA's pick there) at SD1.5's largest layers, so the step with a bank
    gains 3%; cross-attention (77 keys) keeps SDPA, where cuDNN is faster. Each self-attention
    shape gets the faster of the two on this GPU (``flash_where_faster``), so a GPU where it
    loses keeps SDPA. ``STREAMV2V_FLASH_ATTENTION=0`` turns it off.
    """
    if os.environ.get(FLASH_SWITCH, "1") == "0":
        return None
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return None
    if torch.cuda.get_device_capability(device)[0] < 8:  # flash-attn-4 has no older kernels
        return None
    return load_flash_attention(device, dtype)


def load_flash_attention(device: torch.device, dtype: torch.dtype) -> AttentionKernel | None:
    """flash-attn-4's kernel when it is installed and runs here; None, said, when it does not.

    A probe call compiles and runs the kernel of the largest layers' head size once and checks
    its result against SDPA's, so an install that imports but cannot run on this GPU (say, its
    compiler's libraries built for another CUDA) or computes wrongly falls back before the
    first frame instead of failing in it. Not installed is no fault and goes unsaid; installed
    but unusable is said, since whoever installed it expects it to run.
    """
    keep_flash_kernels()
    try:
        import flash_attn.cute  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name in ("flash_attn", "flash_attn.cute"):
            return None  # not installed (or another package's flash_attn, without .cute)
        return _unusable(device, exc)
    except Exception as exc:  # installed, but it or a library it needs does not load
        return _unusable(device, exc)
    # SD1.5's head size 40; varied values (no RNG: the global one is not ours)
    q, k, v = (
        torch.linspace(-1, 1, 128 * 40, device=device).reshape(1, 128, 40).roll(shift).to(dtype)
        for shift in (0, 1000, 2000)
    )
    try:
        got = flash_attention(q, k, v, 1)
    except Exception as exc:  # any failure means "not usable here", never a crash
        return _unusable(device, exc)
    error = (got.float() - sdpa_attention(q, k, v, 1).float()).abs().max().item()
    if not error < PROBE_TOLERANCE:  # NaN too
        return _unusable(device, f"its result differs from PyTorch's attention by {error:.3g}")
    return flash_where_faster


def keep_flash_kernels() -> None:
    """flash-attn-4's kernels kept on disk, in this pack's folder that outlives a reboot (as
    Inductor's are), so a restart or a reboot loads them instead of compiling them again.

    flash-attn-4 reads both settings when it is imported; one the user set is kept.
    """
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    if "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR" not in os.environ:
        folder = kept_folder("flash_attention", "flash-attn-4")
        if folder is not None:
            os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"] = str(folder)


PROBE_TOLERANCE = 1e-2  # fp16 rounding of values in [-1, 1] is under 1e-3


def _unusable(device: torch.device, why: BaseException | str) -> None:
    log.warning(
        "flash-attn-4 is installed but unusable on %s (%s); self-attention uses PyTorch's SDPA "
        "instead. Reinstall it as the README's Install section says, or set %s=0 to stop trying",
        device,
        why if isinstance(why, str) else describe_failure(why),
        FLASH_SWITCH,
    )


def _project(attn: Attention, hidden_states: torch.Tensor, context: torch.Tensor | None):
    """q/k/v projections as diffusers' ``Attention`` defines them (SD1.5: no norms, no mask)."""
    if attn.spatial_norm is not None or attn.group_norm is not None:
        raise NotImplementedError("attention layers with spatial/group norm are not SD1.5 layers")
    query = attn.to_q(hidden_states)
    if context is None:
        return query, attn.to_k(hidden_states), attn.to_v(hidden_states)
    return (query, *project_context(attn, context))


def project_context(attn: Attention, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A cross-attention layer's keys and values for ``context`` (the prompt embeddings)."""
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    return attn.to_k(context), attn.to_v(context)


def _finish(attn: Attention, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


class FusedProjection:
    """A self-attention layer's q, k and v from one matrix product of the joined weights.

    Three narrow products cost three launches and three reads of the input; one product three
    times as wide costs one of each. The fast path uses it on the GPU: the sums are equal to
    three products only within rounding, so the bit-exact reference keeps three.
    """

    def __init__(self, attn: Attention) -> None:
        linears = (attn.to_q, attn.to_k, attn.to_v)
        with torch.no_grad():
            self.weight = torch.cat([x.weight for x in linears])
            self.bias = None
            if any(x.bias is not None for x in linears):
                zero = [x.weight.new_zeros(x.out_features) for x in linears]
                biases = [z if x.bias is None else x.bias for x, z in zip(linears, zero)]
                self.bias = torch.cat(biases)

    def __call__(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return F.linear(hidden_states, self.weight, self.bias).chunk(3, dim=-1)


class PlainAttnProcessor:
    """Ordinary attention (cross-attention, and every layer when there is no bank)."""

    def __init__(self, kernel: AttentionKernel, qkv: FusedProjection | None = None) -> None:
        self.kernel = kernel
        self.qkv = qkv

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if attention_mask is not None:
            raise NotImplementedError("attention masks are not used by SD1.5 UNets")
        query, key, value = self.project(attn, hidden_states, encoder_hidden_states)
        out = self.kernel(query, key, value, attn.heads)
        return _finish(attn, out, hidden_states)

    def project(
        self, attn: Attention, hidden_states: torch.Tensor, context: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if context is None and self.qkv is not None:
            return self.qkv(hidden_states)
        return _project(attn, hidden_states, context)


class BankSelfAttnProcessor:
    """Self-attention that reads the bank (EA, FF) and then offers this frame to it.

    Order within a layer follows the authors: attend over ``[K_t, K_fb]``, project, fuse the
    output with the bank's outputs (fusion layers only), and record the *pre-fusion* K, V, O.
    The bank is read before it is updated, so a frame never attends to itself twice.
    """

    def __init__(
        self,
        bank: FeatureBank,
        layer: str,
        kernel: AttentionKernel,
        qkv: FusedProjection | None = None,
    ) -> None:
        self.bank = bank
        self.layer = layer
        self.kernel = kernel
        self.qkv = qkv
        config = bank.config
        self.extended = config.extended_attention
        self.fusing = config.fuses(layer)
        self.strength = config.fusion_strength
        self.threshold = config.fusion_threshold

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise NotImplementedError(f"{self.layer} is not a plain self-attention layer")
        if self.qkv is not None:
            query, key, value = self.qkv(hidden_states)
        else:
            query, key, value = _project(attn, hidden_states, None)
        _, _, bank_o = self.bank.read(self.layer, key)  # checks the bank fits this frame
        if self.extended:
            out = self.kernel(query, *self.bank.extended(self.layer, key, value), attn.heads)
        else:
            out = self.kernel(query, key, value, attn.heads)
        out = _finish(attn, out, hidden_states)
        fused = out
        if self.fusing and bank_o is not None:  # before recording: a static bank updates in place
            fused = fuse(out, bank_o, self.strength, self.threshold)
        self.bank.record(self.layer, key, value, out, after=fused)
        return fused


class CachedCrossAttnProcessor(PlainAttnProcessor):
    """Cross-attention over keys and values projected from the prompt ahead of time.

    The prompt is the same for every frame, so its keys and values are too: projecting it
    again in every layer of every frame cost the fast path 32 small matrix products per frame.
    ``cache`` maps this layer to its (keys, values); its owner refills it when the prompt
    changes (``project_context``).
    """

    def __init__(
        self,
        kernel: AttentionKernel,
        cache: dict[str, tuple[torch.Tensor, torch.Tensor]],
        layer: str,
    ) -> None:
        super().__init__(kernel)
        self.cache = cache
        self.layer = layer

    def project(
        self, attn: Attention, hidden_states: torch.Tensor, context: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (attn.to_q(hidden_states), *self.cache[self.layer])


def bank_processors(
    processor_names: list[str],
    bank: FeatureBank | None,
    kernel: AttentionKernel,
    projections: dict[str, FusedProjection] | None = None,
    self_kernel: AttentionKernel | None = None,
) -> dict[str, object]:
    """A full processor map for ``UNet2DConditionModel.set_attn_processor``.

    ``projections`` gives self-attention layers their fused q/k/v product, and ``self_kernel``
    their attention kernel where it differs from the others' (both the fast path's).
    """
    self_layers = set(self_attention_layers(processor_names))
    projections = projections or {}
    banked = bank is not None and bank.config.enabled
    processors: dict[str, object] = {}
    plain = PlainAttnProcessor(kernel)
    for name in processor_names:
        layer = name.removesuffix(".processor")
        if layer not in self_layers:
            processors[name] = plain
            continue
        qkv = projections.get(layer)
        own = self_kernel or kernel
        if banked:
            processors[name] = BankSelfAttnProcessor(bank, layer, own, qkv)
        elif qkv is not None or self_kernel is not None:
            processors[name] = PlainAttnProcessor(own, qkv)
        else:
            processors[name] = plain
    return processors
