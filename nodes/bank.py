"""The Feature Bank node: names a bank that persists across runs, and says what it holds."""

from __future__ import annotations

from dataclasses import dataclass

from ..streamv2v.bank import BANK_KINDS
from ..streamv2v.session import EACH_RUN, validate_bank_name
from . import comfy
from .state import SESSIONS

BANK = "STREAMV2V_BANK"


@dataclass(frozen=True)
class BankHandle:
    """What flows along a STREAMV2V_BANK link: the bank's name and settings, not its tensors
    (those stay in the module-level registry, so they outlive ComfyUI's caches)."""

    name: str
    kind: str
    size: int
    interval: int
    each_run: str


def describe(name: str, kind: str | None = None) -> str:
    """The bank's status line; ``kind``: the Feature Bank node's, which its next run will use."""
    session = SESSIONS.find(name)
    stats = {} if session is None else session.stats()
    if session is not None and session.reset_pending:
        text = f"bank '{name}': emptied when the current run ends"
    elif (kind or stats.get("kind")) == "none":
        text = f"bank '{name}': kind none, no bank (plain StreamDiffusion)"
    elif not stats.get("frames_absorbed"):
        text = f"bank '{name}': empty (fills on the next run)"
    else:
        updates = _count(stats["frames_absorbed"], "update")
        text = (
            f"bank '{name}' ({stats['kind']}): {updates}, {stats['layers']} layers x "
            f"{stats['tokens_per_layer']} tokens, {stats['bytes'] / 2**20:.1f} MiB"
        )
    if "frames_in" in stats:
        text += f"; stream: {_count(stats['frames_in'], 'frame')} in"
        if stats["lag"]:
            text += f", output {_count(stats['lag'], 'frame')} behind"
    return text


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


class StreamV2VFeatureBank:
    DESCRIPTION = (
        "The feature bank: past frames' attention features that keep the video consistent. It "
        "persists across queued runs under its name (webcam loops, video chunks); press "
        "'Reset bank' to empty it."
    )
    CATEGORY = "StreamV2V"
    FUNCTION = "bank"
    RETURN_TYPES = (BANK,)
    RETURN_NAMES = ("bank",)
    OUTPUT_TOOLTIPS = ("The named bank, for the Stream Batch Sampler.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "kind": (
                    list(BANK_KINDS),
                    {
                        "tooltip": "dyme: one frame's worth of merged tokens (the paper's); queue: "
                        "the last 'size' updates; none: no bank (plain StreamDiffusion)."
                    },
                ),
                "size": (
                    "INT",
                    {
                        "default": 1,
                        "min": 1,
                        "max": 16,
                        "tooltip": "Updates a queue bank keeps (dyme always keeps one frame).",
                    },
                ),
                "interval": (
                    "INT",
                    {
                        "default": 4,
                        "min": 1,
                        "max": 64,
                        "tooltip": "Absorb the current frame every this many frames (paper: 4).",
                    },
                ),
                "name": (
                    "STRING",
                    {
                        "default": "bank",
                        "tooltip": "Workflows with different names never share "
                        "a bank; the same name continues the same stream.",
                    },
                ),
                "each_run": (
                    list(EACH_RUN),
                    {
                        "tooltip": "continue stream: a run carries on from the last one (webcam, "
                        "video chunks); start new stream: every run starts with an empty bank."
                    },
                ),
            }
        }

    @classmethod
    def IS_CHANGED(cls, **kwargs) -> int:
        return comfy.every_run()  # runs every time so its display is current

    def bank(self, kind: str, size: int, interval: int, name: str, each_run: str) -> dict:
        from ..streamv2v.bank import BankConfig

        name = validate_bank_name(name)
        BankConfig(kind=kind, size=size, interval=interval)  # reject settings without effect
        return {
            "ui": {"text": [describe(name, kind)]},
            "result": (BankHandle(name, kind, size, interval, each_run),),
        }
