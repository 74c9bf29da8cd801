"""Where this pack keeps what it compiles: the user's cache folder, which outlives a reboot.

Inductor and flash-attn-4 keep their compiled kernels under the system's temp folder by
default, which most Linux systems empty at boot (a tmpfs, or systemd's tmpfiles), so the first
run after every reboot compiled again: one to two minutes for Inductor, a few seconds per
flash-attn-4 kernel.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """This pack's folder in the system's cache folder (``$XDG_CACHE_HOME`` where set)."""
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local"
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "streamv2v"


def kept_folder(name: str, whose: str) -> Path | None:
    """``cache_root() / name``, made; None where it cannot be made, so ``whose`` compiler keeps
    its default folder (said in the log: compiling still works, it is only kept less long)."""
    folder = cache_root() / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.info("compiled kernels stay in %s's default folder: %s", whose, exc)
        return None
    return folder
