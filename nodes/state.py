"""What the pack keeps between runs, at module level so it survives ComfyUI's caches.

ComfyUI drops node instances on ``/free`` and with ``--cache-none``; a module-level object
outlives all of that. Here live the one loaded model and the named banks with their streams.
"""

from __future__ import annotations

import logging
import threading

from ..streamv2v.session import ModelCache, SessionRegistry

log = logging.getLogger("ComfyUI-StreamV2V")

SESSIONS = SessionRegistry()
MODELS = ModelCache(let_go=SESSIONS.drop_streams)
# The sampler that last ran each bank, and in which queued run: (prompt id, node id) by name
BANK_USERS: dict[str, tuple[str, str]] = {}
# Held by a run from taking the model to its last frame, and by a release: a release (Free
# Memory's route, on a thread of its own) that came between would leave the run's stream holding
# a model the cache no longer knows, which the next run would then load a second time.
MODEL_IN_USE = threading.RLock()


def release_models() -> bool:
    """Free the pack's model (and the streams using it); banks are kept. True if any."""
    with MODEL_IN_USE:
        SESSIONS.drop_streams()
        return MODELS.clear()
