"""The feature bank: the paper's contribution, as plain tensor functions plus a state object.

The math (``extend``, ``fuse``, ``dyme_merge``) is kept free of any model or processor so a
second backend (for example ComfyUI's own attention hooks) can reuse it unchanged. The state
(``FeatureBank``) belongs to whoever runs the stream: it can be reset, inspected, saved and
restored, and it never grows past its configured size however long the video is.

Tensors in the bank are ``[rows, tokens, dim]`` where rows are the UNet batch rows (one per
stream-batch slot, plus the unconditional rows when CFG adds them), exactly as the authors'
attention processors keep them.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from .cudastreams import side_stream
from .errors import StreamV2VError
from .kernels import best_match, best_match_reference, triton_usable

BANK_KINDS = ("dyme", "queue", "none")
# Low-resolution decoder layers (DESIGN.md): SD1.5 has no attention in up_blocks.0, the name is
# kept so the rule reads as the paper states it and covers UNets that do have one there.
FUSION_LAYERS = ("mid_block", "up_blocks.0", "up_blocks.1")
BANK_FILE_FORMAT = "streamv2v-feature-bank"
BANK_FILE_VERSION = 1


# --------------------------------------------------------------------------------------------
# The math
# --------------------------------------------------------------------------------------------


def extend(current: torch.Tensor, bank: torch.Tensor | None) -> torch.Tensor:
    """Extended attention's token set: the current frame's tokens, then the bank's (Eq. 1)."""
    if bank is None:
        return current
    return torch.cat([current, bank], dim=1)


def fuse(
    output: torch.Tensor, bank_output: torch.Tensor, strength: float, threshold: float
) -> torch.Tensor:
    """Feature fusion (Eq. 2): blend each token with its most similar bank token.

    A token moves towards its nearest bank token only where that cosine similarity reaches
    ``threshold``; elsewhere the token is kept, so new content is never smeared by old frames.
    """
    out_n = F.normalize(output, p=2, dim=-1)
    bank_n = F.normalize(bank_output, p=2, dim=-1)
    similarity = torch.matmul(out_n, bank_n.transpose(1, 2))
    best, index = similarity.max(dim=-1)
    nearest = torch.gather(bank_output, 1, index.unsqueeze(-1).expand(-1, -1, output.shape[-1]))
    keep = (best < threshold).unsqueeze(-1)
    target = torch.where(keep, output, nearest)
    return output * (1 - strength) + strength * target


def dyme_merge(
    keys: torch.Tensor,
    values: torch.Tensor,
    outputs: torch.Tensor,
    generator: torch.Generator | None,
    ratio: float = 0.5,
    draws: torch.Tensor | None = None,
    matcher: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = best_match_reference,
    rolled: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dynamic merging: halve the token count by averaging similar tokens.

    Tokens are split at random (per row) into ``src`` (the first ``ratio`` of a permutation)
    and ``dst``; each src token joins the dst token whose *key* is most similar, and every dst
    token becomes the mean of itself and what joined it. K, V and O share one matching so the
    merged tokens stay consistent with each other. Random splits keep the bank from always
    dropping the same spatial positions. ``draws`` (``[rows, tokens, 1]`` uniform numbers)
    replaces drawing from ``generator`` here, for callers that draw ahead (a static bank);
    ``matcher`` finds each src token's most similar dst token (a fused kernel on the GPU).
    The token sets are the bank's tokens then the frame's, or, with ``rolled`` (the frame's
    token count), the frame's then the bank's, as a static bank holds them.
    Means are taken in float32 whatever the dtype: fp16 atomic adds are slow and lossy.
    """
    rows, tokens, _ = keys.shape
    if draws is None:
        draws = torch.rand(rows, tokens, 1, device=keys.device, generator=generator)
    # Stable: equal draws happen (torch.rand repeats values) and go to the lower position, as
    # CUDA's eager sort puts them; Inductor's sort (compiled merge) and the CPU's would not.
    order = draws.argsort(dim=1, stable=True)
    if rolled:  # the same split of tokens laid out as [frame | bank]
        order = (order + rolled) % tokens
    n_src = int(ratio * tokens)
    src_idx, dst_idx = order[:, :n_src, :], order[:, n_src:, :]

    def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        width = x.shape[-1]
        return (
            x.gather(1, src_idx.expand(rows, n_src, width)),
            x.gather(1, dst_idx.expand(rows, tokens - n_src, width)),
        )

    metric = keys / keys.norm(dim=-1, keepdim=True)
    src_m, dst_m = split(metric)
    match = matcher(src_m, dst_m)

    # The mean is a sum and a count (each dst token counts itself), which torch.compile fuses
    # into the kernels around it; ``scatter_reduce(reduce="mean")`` ran as six library kernels
    # per layer. K, V and O are merged one by one: joined side by side first, they were
    # copied into one wide tensor per layer.
    counts = (
        torch.ones(rows, tokens - n_src, device=keys.device)
        .scatter_add(1, match, torch.ones(rows, n_src, device=keys.device))
        .unsqueeze(-1)
    )

    def merge(x: torch.Tensor) -> torch.Tensor:
        src, dst = split(x)
        index = match.unsqueeze(-1).expand(rows, n_src, x.shape[-1])
        return (dst.float().scatter_add(1, index, src.float()) / counts).to(x.dtype)

    return merge(keys), merge(values), merge(outputs)


# --------------------------------------------------------------------------------------------
# A static bank's update, beside the rest of the frame
# --------------------------------------------------------------------------------------------
# The merged tokens of a layer are read by that layer in the next frame only, so on the GPU the
# update need not hold up the rest of the frame: it runs on a CUDA stream of its own, beside the
# UNet's later layers and the decode, and the frame ends by waiting for it (``join_updates``).
# Measured on an H200 (512x512, 4 steps): frames that update the bank took 15.3 ms in line and
# 14.5 ms beside (docs/performance.md).


def _merge_in_place(
    keys: torch.Tensor,
    values: torch.Tensor,
    outputs: torch.Tensor,
    draws: torch.Tensor,
    ratio: float,
    lead: int,
    fused: bool,
) -> None:
    """Merge the joint ``[frame | bank]`` tokens and write the result over the bank's part."""
    matcher = best_match if fused else best_match_reference
    merged = dyme_merge(keys, values, outputs, None, ratio, draws, matcher, rolled=lead)
    for joint, x in zip((keys, values, outputs), merged):
        joint[:, lead:].copy_(x)


def _update_stream(device: torch.device) -> torch.cuda.Stream:
    return side_stream(device, "bank updates")


@functools.cache
def _compiled_merge() -> Callable[..., None]:
    """Compiled: as PyTorch operations, the ~40 kernels of a layer's merge made the update
    stream slower than the frame it runs beside (update frames 17.6 ms against 15.5 in line)."""
    options = {"emulate_precision_casts": True}  # round the unit keys as the plain path does
    return torch.compile(_merge_in_place, dynamic=False, options=options)


_running: set[torch.device] = set()  # devices whose update stream has work to join


def _fill(joint: torch.Tensor, x: torch.Tensor) -> None:
    joint[:, : x.shape[1]].copy_(x)


@functools.cache
def _compiled_fill() -> Callable[[torch.Tensor, torch.Tensor], None]:
    """Compiled: between these strided slices (the room of the joint tensor; K and V of the q,
    k, v product) ATen copied with its generic kernel, 12 to 16 us per 64x64 tensor against 6
    to 8 for Inductor's copy (H200), on the frame's own stream."""
    return torch.compile(_fill, dynamic=False)


@torch.library.custom_op("streamv2v::fill_room", mutates_args=("joint",))
def fill_room(joint: torch.Tensor, x: torch.Tensor, compiled: bool) -> None:
    """The frame's tokens into the room in front of a static bank's tokens (``compiled``: by
    Inductor's kernel, on the compiled GPU path).

    An operator (on the compiled path) for ``dyme_update``'s sake: a room filled by a plain copy
    may be a copy of the bank's tensor that is written back at the end of the graph, after the
    merge read the room; writes by operators reach the tensor itself.
    """
    (_compiled_fill() if compiled and joint.device.type == "cuda" else _fill)(joint, x)


@fill_room.register_fake
def _(joint, x, compiled) -> None:
    return None


@torch.library.custom_op("streamv2v::dyme_update", mutates_args=("draws",))
def dyme_update(
    keys: torch.Tensor,
    values: torch.Tensor,
    outputs: torch.Tensor,
    frame: list[torch.Tensor],
    after: torch.Tensor,
    draws: torch.Tensor,
    ratio: float,
    fused: bool,
    aside: bool,
    updating: torch.Tensor,
) -> None:
    """A static bank's DyMe update of one layer, in place; with ``aside`` on CUDA, beside
    the frame.

    ``keys``, ``values``, ``outputs`` are the layer's joint ``[room | bank]`` tensors and
    ``frame`` the frame's tokens still to be put in the room (O, or K, V, O without extended
    attention). The operator writes all three, yet declares only ``draws`` (this update's
    alone) as written: torch.compile gives an operator that declares a write to a tensor that
    the graph also reads (feature fusion reads the bank's outputs) a copy of it, and copies
    that back once the operator returns, while the merge may still be running beside the
    frame. ``after`` (the layer's result) orders the call after every read of this layer's
    bank in the frame; within the frame nothing reads it afterwards, and the next frame waits
    for the merge (``join_updates``). Otherwise, and on a CPU, it merges at once.

    ``updating`` (the bank's flag, a CPU boolean) is read when the operator runs, not when it
    is traced: a compiled UNet calls it in every frame, so frames that update the bank and
    frames that only read it are one graph, compiled once, and captured as two CUDA graphs,
    the second holding the merge's kernels.
    """
    if not updating:
        return
    lead = frame[0].shape[1]
    aside = aside and keys.device.type == "cuda"
    for joint, x in zip((keys, values, outputs)[3 - len(frame) :], frame):
        fill_room(joint, x, aside)
    if not aside:
        _merge_in_place(keys, values, outputs, draws, ratio, lead, fused)
        return
    side = _update_stream(keys.device)
    side.wait_stream(torch.cuda.current_stream(keys.device))
    with torch.cuda.stream(side):
        _compiled_merge()(keys, values, outputs, draws, ratio, lead, fused)
    _running.add(keys.device)


@dyme_update.register_fake
def _(keys, values, outputs, frame, after, draws, ratio, fused, aside, updating) -> None:
    return None


@torch.library.custom_op("streamv2v::queue_update", mutates_args=())
def queue_update(
    keys: torch.Tensor,
    values: torch.Tensor,
    outputs: torch.Tensor,
    frame: list[torch.Tensor],
    after: torch.Tensor,
    lead: int,
    updating: torch.Tensor,
) -> None:
    """A full static queue's update of one layer, in place: the oldest frame's tokens out, the
    frame's K, V, O in at the end.

    ``keys``, ``values``, ``outputs`` are the layer's joint tensors (``lead`` tokens of room,
    then the stored frames). Like ``dyme_update`` it reads the bank's flag ``updating`` when it
    runs, so one compiled UNet serves both kinds of frame, and it declares no write: torch.compile
    would otherwise copy the whole queue of every layer in every frame and write the copy back.
    ``after`` (the layer's result) orders the call after this layer's reads of the bank, the only
    ones in the frame; ``has_side_effect`` below keeps a call that returns nothing in the graph.
    """
    if not updating:
        return
    tokens = frame[0].shape[1]
    for joint, x in zip((keys, values, outputs), frame):
        stored = joint[:, lead:]
        stored[:, :-tokens] = stored[:, tokens:].clone()
        stored[:, -tokens:] = x


@queue_update.register_fake
def _(keys, values, outputs, frame, after, lead, updating) -> None:
    return None


torch.fx.node.has_side_effect(torch.ops.streamv2v.queue_update.default)


def join_updates(device: torch.device) -> None:
    """Make the current stream wait for the bank updates started beside it on ``device``."""
    device = torch.device(device)
    if device in _running:
        _running.discard(device)
        torch.cuda.current_stream(device).wait_stream(_update_stream(device))


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BankConfig:
    """How the bank reads and grows; defaults are the paper's."""

    kind: str = "dyme"
    size: int = 1
    interval: int = 4
    extended_attention: bool = True
    fusion: bool = True
    fusion_strength: float = 0.8
    fusion_threshold: float = 0.98
    fusion_layers: tuple[str, ...] = FUSION_LAYERS
    merge_ratio: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in BANK_KINDS:
            raise StreamV2VError(
                f"bank kind {self.kind!r} is unknown: use one of {', '.join(BANK_KINDS)}"
            )
        if self.kind == "none":
            self._refuse_changed(
                [f.name for f in fields(self) if f.name != "kind"],
                "with bank kind 'none' (no bank): pick bank kind 'dyme' or 'queue' to use it",
            )
            return
        if not self.fusion:
            self._refuse_changed(
                ["fusion_strength", "fusion_threshold", "fusion_layers"],
                "with feature fusion off: turn fusion on to use it",
            )
        if not isinstance(self.size, int) or self.size < 1:
            raise StreamV2VError(f"bank size must be a whole number >= 1, got {self.size!r}")
        if self.kind == "dyme" and self.size != 1:
            raise StreamV2VError(
                f"bank size {self.size} has no effect with the 'dyme' bank, which always holds one "
                "frame's worth of merged tokens: use bank size 1, or bank kind 'queue' to keep "
                "several frames"
            )
        if not isinstance(self.interval, int) or self.interval < 1:
            raise StreamV2VError(
                f"bank update interval must be a whole number of frames >= 1, got {self.interval!r}"
            )
        if not (self.extended_attention or self.fusion):
            raise StreamV2VError(
                "with both extended attention and feature fusion off the bank has no effect: "
                "turn one on, or choose bank kind 'none'"
            )
        if not 0.0 <= self.fusion_strength <= 1.0:
            raise StreamV2VError(
                f"fusion strength must be within 0..1, got {self.fusion_strength} (paper: 0.8)"
            )
        if not -1.0 <= self.fusion_threshold <= 1.0:
            raise StreamV2VError(
                f"fusion threshold is a cosine similarity within -1..1, got "
                f"{self.fusion_threshold} (paper: 0.98)"
            )
        if self.kind == "queue":
            self._refuse_changed(
                ["merge_ratio"], "with bank kind 'queue', which never merges: use bank kind 'dyme'"
            )
        if self.fusion and not self.fusion_layers:
            raise StreamV2VError(
                "fusion layers is empty, so feature fusion would act nowhere: name the layers "
                f"(default {', '.join(FUSION_LAYERS)}) or turn fusion off"
            )
        if not 0.0 < self.merge_ratio < 1.0:
            raise StreamV2VError(f"merge ratio must be within (0, 1), got {self.merge_ratio}")

    def _refuse_changed(self, names: list[str], why: str) -> None:
        defaults = BankConfig.__dataclass_fields__
        for name in names:
            if getattr(self, name) != defaults[name].default:
                raise StreamV2VError(
                    f"{name.replace('_', ' ')} {getattr(self, name)!r} has no effect {why}, or "
                    "leave it at its default"
                )

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    def fuses(self, layer: str) -> bool:
        """Whether feature fusion runs in ``layer`` (a diffusers attention module path)."""
        return self.fusion and any(
            layer == prefix or layer.startswith(prefix + ".") for prefix in self.fusion_layers
        )


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------


class LayerEntries:
    """One layer's bank: K, V, O of the stored frames, oldest first along the token axis.

    A queue holds ``frames`` frames of equal token count side by side, so reading it is a
    reference, not a concatenation per frame. A static bank keeps ``lead`` tokens of room in
    front of its K, V and O (``joint``): attending writes the current frame's K, V there, so Eq.
    1's token set is that tensor as it is, and a DyMe update merges the joint tensors as they
    are, where concatenations would copy the bank's tokens again in every layer.
    """

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        outputs: torch.Tensor,
        frames: int = 1,
        lead: int = 0,
    ) -> None:
        self.joint = (keys, values, outputs)  # with the lead room, if any
        self.frames = frames
        self.lead = lead

    @property
    def keys(self) -> torch.Tensor:
        return self.tensors()[0]

    @property
    def values(self) -> torch.Tensor:
        return self.tensors()[1]

    @property
    def outputs(self) -> torch.Tensor:
        return self.tensors()[2]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stored K, V, O (without the room)."""
        if not self.lead:
            return self.joint
        k, v, o = (x[:, self.lead :] for x in self.joint)
        return k, v, o

    def tokens(self) -> int:
        return self.keys.shape[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def copy(self, clone: bool = False) -> LayerEntries:
        """The stored tokens without the lead room, as references or (``clone``) copies."""
        k, v, o = (t.clone() for t in self.tensors()) if clone else self.tensors()
        return LayerEntries(k, v, o, self.frames)

    def with_lead(self, lead: int) -> LayerEntries:
        """An owned copy with ``lead`` tokens of room in front of K, V and O."""

        def room(x: torch.Tensor) -> torch.Tensor:
            joint = x.new_empty(x.shape[0], lead + x.shape[1], x.shape[2])
            joint[:, lead:] = x
            return joint

        k, v, o = (room(x) for x in self.tensors())
        return LayerEntries(k, v, o, self.frames, lead)


class FeatureBank:
    """Per-layer keys, values and outputs of past frames, owned by the caller.

    The stream drives it with ``begin_step``/``end_step`` around each UNet call; attention
    processors ``read`` and ``record`` per layer. The update decision is made once per call so
    every layer agrees on whether this frame is absorbed (every ``interval`` frames, counting
    from the first).

    Once full, a bank can be made *static* (``make_static``): from then on updates write into
    the same tensors, so a captured CUDA graph that reads and updates them stays valid.
    ``generation`` changes whenever the stored tensors are replaced, which tells a graph it
    must be captured again.
    """

    def __init__(self, config: BankConfig | None = None) -> None:
        self.config = config or BankConfig()
        self.layers: dict[str, LayerEntries] = {}
        self.steps = 0
        self.frames_absorbed = 0
        self.generator: torch.Generator | None = None
        self.seed: int | None = None
        self.static = False
        self.generation = 0
        # Whether this UNet call is absorbed: a CPU tensor, which the static bank's update
        # operators read when they run (``dyme_update``, ``queue_update``)
        self._update_flag = torch.zeros((), dtype=torch.bool)
        self._draws: dict[str, torch.Tensor] = {}
        self._matcher = best_match_reference
        self.aside = False  # a static bank for the compiled fast path (``make_static``)
        # ``reset`` against ``stats``, which other threads read (an HTTP route, a live status)
        self._counting = threading.Lock()

    @property
    def _updating(self) -> bool:
        return bool(self._update_flag)

    @_updating.setter
    def _updating(self, value: bool) -> None:
        with torch.inference_mode():  # the flag may be an inference tensor, or not
            self._update_flag.fill_(value)

    # -- lifecycle -----------------------------------------------------------------------------

    def bind(self, device: torch.device, seed: int) -> None:
        """Give the bank its random source on the model's device, seeded by the stream's seed.

        The authors draw DyMe partitions from torch's global generator of the model's device,
        seeded with the seed (their VAE sampling uses a generator of its own). On the CPU their
        init noise came from that same global generator first, so a CPU stream copies its own
        generator's state into the bank after drawing that noise (``StreamV2V._start``). A bank
        that holds frames and has a generator for this device (restored, or continuing a
        stream) keeps it, so a continued stream draws the partitions it would have drawn
        uninterrupted; an empty one (new, or reset) takes the new seed.
        """
        device = torch.device(device)
        if (
            self.steps > 0
            and self.generator is not None
            and self.generator.device.type == device.type
        ):
            return
        self.seed = seed
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def reset(self) -> None:
        """Forget every stored frame; the next frame seeds the bank afresh."""
        with self._counting:
            self._replace_layers({})
            self.steps = 0
            self.frames_absorbed = 0
        self._updating = False
        if self.generator is not None and self.seed is not None:
            self.generator.manual_seed(self.seed)

    def _replace_layers(self, layers: dict[str, LayerEntries]) -> None:
        self.layers = layers
        self.static = False
        self._draws = {}
        self._matcher = best_match_reference
        self.aside = False
        self.generation += 1

    def begin_step(self) -> bool:
        """Decide whether this UNet call is absorbed; True when it is."""
        self._updating = self.config.enabled and self.steps % self.config.interval == 0
        return self._updating

    def end_step(self) -> None:
        if self._updating:
            self.frames_absorbed += 1
        self.steps += 1
        self._updating = False

    @contextmanager
    def step_as(self, updating: bool) -> Iterator[None]:
        """Run a UNet call as an update (or not) without counting it: for capturing graphs."""
        self._updating = updating and self.config.enabled
        try:
            yield
        finally:
            self._updating = False

    def is_full(self, layers: Iterable[str]) -> bool:
        """Whether every one of ``layers`` holds as many frames as it ever will.

        From then on every tensor keeps its shape, which is what a static bank needs.
        """
        if not self.config.enabled:
            return True
        frames = 1 if self.config.kind == "dyme" else self.config.size
        return all(name in self.layers and self.layers[name].frames == frames for name in layers)

    def make_static(self, aside: bool = False) -> None:
        """Own the stored tensors and update them in place from now on (see the class doc).

        Every layer's update is then an operator that the UNet calls in every frame and that
        reads the bank's flag when it runs (``dyme_update``, ``queue_update``), so a traced UNet
        serves frames that update the bank and frames that do not. The compiled fast path asks
        for ``aside``: the frame's tokens go into the room by operator too (``fill_room``), and
        a DyMe merge runs beside the rest of its frame, compiled as well.
        """
        aside = aside and self.config.enabled
        if self.static:
            if aside != self.aside:  # graphs captured the other way must be captured again
                self.aside = aside
                self.generation += 1
            return
        # Room for the frame's tokens (see LayerEntries), where attending or merging uses it
        roomy = self.config.extended_attention or self.config.kind == "dyme"
        layers = {
            n: e.with_lead(e.tokens() // e.frames if roomy else 0) for n, e in self.layers.items()
        }
        self._replace_layers(layers)
        self.static = True
        self.aside = aside
        if self.config.kind == "dyme":  # a merge draws one number per token of bank + frame
            self._draws = {
                name: torch.empty(e.keys.shape[0], 2 * e.tokens(), 1, device=e.keys.device)
                for name, e in self.layers.items()
            }
            devices = {e.keys.device for e in self.layers.values()}
            if all(triton_usable(device) for device in devices):  # the fast path's matching
                self._matcher = best_match

    def draw(self) -> None:
        """A static DyMe bank's random numbers for this update, all layers at once.

        Drawn in the order the layers first recorded (the UNet's order), so the generator
        yields what the plain path draws layer by layer; drawing ahead keeps the random
        source out of the UNet, which can then be compiled as one graph.
        """
        if self._updating:  # only a static DyMe bank has draws
            for draws in self._draws.values():
                torch.rand(draws.shape, generator=self.generator, device=draws.device, out=draws)

    # -- per-layer access (called by the attention processors) ---------------------------------
    # Both are traced by torch.compile with the UNet (no graph breaks): a static bank's shapes
    # are fixed and its random numbers drawn ahead (``draw``), so a compiled UNet has one graph
    # for frames that update the bank and one for frames that only read it.

    def read(
        self, layer: str, like: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """The bank's K, V, O for ``layer`` (None when empty), checked against ``like``.

        ``like`` is the current frame's keys: a bank filled by a stream of another model,
        resolution or batch layout cannot be attended to, and saying so beats a shape error.
        """
        entries = self.layers.get(layer)
        if entries is None:
            return None, None, None
        stored = entries.keys
        if stored.shape[0] != like.shape[0] or stored.shape[2] != like.shape[2]:
            raise StreamV2VError(
                f"the feature bank holds tokens of shape {tuple(stored.shape)} in layer {layer} "
                f"but this stream makes {tuple(like.shape)}: it was filled with another model, "
                "step count or CFG type; reset the bank or use a new one"
            )
        if stored.shape[1] != like.shape[1] * entries.frames:
            raise StreamV2VError(
                f"the feature bank was filled at another resolution "
                f"({stored.shape[1] // entries.frames} tokens per frame in layer {layer}, this "
                f"stream has {like.shape[1]}): reset the bank or use a new one"
            )
        return entries.tensors()

    def extended(
        self, layer: str, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Extended attention's keys and values for ``layer``: this frame's, then the bank's.

        Read after ``read`` has checked the shapes. A static bank writes the frame's tokens
        into the room it keeps for them (``LayerEntries``) instead of concatenating.
        """
        entries = self.layers.get(layer)
        if entries is None:
            return keys, values
        if entries.lead:
            joint_k, joint_v, _ = entries.joint
            if self.aside:  # see fill_room; the same graph serves frames that update
                fill_room(joint_k, keys, True)
                fill_room(joint_v, values, True)
            else:
                _fill(joint_k, keys)
                _fill(joint_v, values)
            return joint_k, joint_v
        return extend(keys, entries.keys), extend(values, entries.values)

    def record(
        self,
        layer: str,
        keys: torch.Tensor,
        values: torch.Tensor,
        outputs: torch.Tensor,
        after: torch.Tensor | None = None,
    ) -> None:
        """Absorb this frame's pre-fusion K, V, O for ``layer`` if this call is an update.

        ``after``: the layer's result (after fusion), which a static bank's update is ordered
        after (``dyme_update``, ``queue_update``); ``outputs`` when not given. A static bank's
        update is called in every frame and decides itself, when it runs, whether the frame
        updates.
        """
        entries = self.layers.get(layer)
        if self.static and entries is not None:  # by an operator that decides when it runs
            after = outputs if after is None else after
            if self.config.kind == "queue":
                frame = [keys, values, outputs]
                queue_update(*entries.joint, frame, after, entries.lead, self._update_flag)
                return
            # DyMe: with extended attention the processor has attended (``extended``) before
            # recording, which put this frame's K, V into the room already: only O is new.
            frame = [keys, values, outputs][2 if self.config.extended_attention else 0 :]
            dyme_update(
                *entries.joint,
                frame,
                after,
                self._draws[layer],
                self.config.merge_ratio,
                self._matcher is best_match,
                self.aside,
                self._update_flag,
            )
            return
        if not self._updating:
            return
        new = (keys, values, outputs)
        if entries is None:
            self.layers[layer] = LayerEntries(keys, values, outputs)
            self.generation += 1
            return
        if self.config.kind == "queue":
            if entries.frames < self.config.size:  # still filling: the bank grows
                merged = tuple(torch.cat([old, x], dim=1) for old, x in zip(entries.tensors(), new))
                self.layers[layer] = LayerEntries(*merged, frames=entries.frames + 1)
                self.generation += 1
                return
            tokens = keys.shape[1]  # full: the oldest frame out, this one in
            merged = tuple(
                torch.cat([old[:, tokens:], x], dim=1) for old, x in zip(entries.tensors(), new)
            )
        else:
            merged = dyme_merge(
                *(torch.cat([old, x], dim=1) for old, x in zip(entries.tensors(), new)),
                self.generator,
                self.config.merge_ratio,
            )
        self.layers[layer] = LayerEntries(*merged, frames=entries.frames)

    # -- checkpoints ---------------------------------------------------------------------------

    def snapshot(self) -> tuple:
        """A copy of the state to come back to after a failed run.

        Cheap outside static mode (tokens are replaced, never changed in place, so references
        suffice); a static bank's tensors are updated in place, so they are cloned.
        """
        layers = {name: e.copy(clone=self.static) for name, e in self.layers.items()}
        generator = self.generator.get_state() if self.generator is not None else None
        return layers, self.steps, self.frames_absorbed, generator

    def restore(self, snapshot: tuple) -> None:
        layers, self.steps, self.frames_absorbed, generator = snapshot
        same_shapes = (
            self.static
            and layers.keys() == self.layers.keys()
            and all(
                a.shape == b.shape
                for name, e in layers.items()
                for a, b in zip(e.tensors(), self.layers[name].tensors())
            )
        )
        if same_shapes:  # keep the static tensors (and any graph reading them) valid
            with torch.inference_mode():  # they were made inside a stream's inference mode
                for name, e in layers.items():
                    for target, saved in zip(self.layers[name].tensors(), e.tensors()):
                        target.copy_(saved)
        else:
            self._replace_layers({name: e.copy() for name, e in layers.items()})
        if generator is not None and self.generator is not None:
            self.generator.set_state(generator)
        self._updating = False

    # -- inspection ----------------------------------------------------------------------------

    def stats(self) -> dict[str, object]:
        """What the bank holds, for logs and the node UI.

        Asked for from other threads (an HTTP route, a live camera's status) while a run may
        be adding layers or resetting the bank: the layers are read from a copy, which Python
        takes in one step, with the counts, and not halfway through a reset.
        """
        with self._counting:
            layers = list(self.layers.items())
            absorbed, steps = self.frames_absorbed, self.steps
        return {
            "kind": self.config.kind,
            "layers": len(layers),
            "tokens_per_layer": {name: e.tokens() for name, e in layers},
            "frames_absorbed": absorbed,
            "steps": steps,
            "bytes": sum(e.nbytes() for _, e in layers),
        }

    def nbytes(self) -> int:
        return sum(e.nbytes() for e in list(self.layers.values()))

    def __repr__(self) -> str:
        return (
            f"FeatureBank(kind={self.config.kind!r}, layers={len(self.layers)}, "
            f"frames_absorbed={self.frames_absorbed}, bytes={self.nbytes()})"
        )

    # -- persistence ---------------------------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Tensors and string metadata, the shape safetensors stores."""
        tensors: dict[str, torch.Tensor] = {}
        for name, entries in self.layers.items():
            for part, stored in zip("kvo", entries.tensors()):
                for i, frame in enumerate(stored.chunk(entries.frames, dim=1)):
                    tensors[f"{name}/{i}/{part}"] = frame.contiguous()
        if self.generator is not None:
            tensors["generator_state"] = self.generator.get_state()
        meta = {
            "format": BANK_FILE_FORMAT,
            "version": str(BANK_FILE_VERSION),
            "config": json.dumps(asdict(self.config)),
            "steps": str(self.steps),
            "frames_absorbed": str(self.frames_absorbed),
            "seed": "" if self.seed is None else str(self.seed),
            "generator_device": "" if self.generator is None else self.generator.device.type,
        }
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        """Restore a saved bank into this one; its configuration must match this bank's."""
        saved = json.loads(meta["config"])
        saved["fusion_layers"] = tuple(saved["fusion_layers"])
        if BankConfig(**saved) != self.config:
            raise StreamV2VError(
                f"the saved bank was made with {saved}, which differs from this bank's "
                f"{asdict(self.config)}: load it into a bank with the same settings"
            )
        frames: dict[str, dict[str, list[tuple[int, torch.Tensor]]]] = {}
        for key, tensor in tensors.items():
            if key == "generator_state":
                continue
            name, index, part = key.rsplit("/", 2)
            frames.setdefault(name, {}).setdefault(part, []).append((int(index), tensor))
        layers = {}
        for name, parts in frames.items():
            k, v, o = (torch.cat([t for _, t in sorted(parts[p])], dim=1) for p in "kvo")
            layers[name] = LayerEntries(k, v, o, frames=len(parts["k"]))
        self._replace_layers(layers)
        self.steps = int(meta["steps"])
        self.frames_absorbed = int(meta["frames_absorbed"])
        self.seed = int(meta["seed"]) if meta.get("seed") else None
        device = meta.get("generator_device") or ""
        if device and "generator_state" in tensors:
            try:
                generator = torch.Generator(device=device)
            except RuntimeError:  # saved on a GPU this machine lacks: ``bind`` seeds one here
                pass
            else:
                generator.set_state(tensors["generator_state"])
                self.generator = generator
        self._updating = False

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> FeatureBank:
        """Move the stored tokens (after loading a file, to the stream's device and dtype).

        A random state cannot move between kinds of device (nor be restored where its GPU is
        missing): on another kind the partitions are drawn afresh from the seed.
        """
        target = torch.device(device)
        if self.generator is None or self.generator.device.type != target.type:
            self.generator = None
            if self.seed is not None:
                self.bind(target, self.seed)
        self._replace_layers(
            {
                name: LayerEntries(
                    *(t.to(device=device, dtype=dtype) for t in e.tensors()), e.frames
                )
                for name, e in self.layers.items()
            }
        )
        return self

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors, meta = self.state_dict()
        save_file({k: v.detach().cpu() for k, v in tensors.items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, config: BankConfig | None = None) -> FeatureBank:
        """Read a bank saved with ``save``; ``config`` defaults to the one stored in the file."""
        tensors, meta = read_bank_file(path)
        if config is None:
            saved = json.loads(meta["config"])
            saved["fusion_layers"] = tuple(saved["fusion_layers"])
            config = BankConfig(**saved)
        bank = cls(config)
        bank.load_state_dict(tensors, meta)
        return bank


def read_bank_file(
    path: str | Path, expect: str = BANK_FILE_FORMAT
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a saved bank (or stream), with a clear error for anything else."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise StreamV2VError(f"{path} does not exist: check the path")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not iterable)
    except (SafetensorError, OSError) as exc:
        raise StreamV2VError(f"{path} cannot be read ({exc}): save it again") from exc
    if meta.get("format") != expect:
        what = "feature bank" if expect == BANK_FILE_FORMAT else "stream state"
        raise StreamV2VError(f"{path} is not a saved StreamV2V {what}: pick a file saved by it")
    if int(meta.get("version", "0")) > BANK_FILE_VERSION:
        raise StreamV2VError(
            f"{path} was written by a newer ComfyUI-StreamV2V (bank format "
            f"{meta.get('version')}): update the pack"
        )
    return tensors, meta


def self_attention_layers(processor_names: Iterable[str]) -> list[str]:
    """Self-attention layer paths from a diffusers UNet's ``attn_processors`` keys."""
    return [
        name.removesuffix(".processor")
        for name in processor_names
        if name.removesuffix(".processor").endswith("attn1")
    ]
