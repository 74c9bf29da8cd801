"""The one exception type users see.

Every check at an entry point (CLI argument, node widget, engine call) raises
``StreamV2VError`` with a message that names the offending input and says how to fix
it. Front ends (the CLI, the ComfyUI nodes) print its message as-is instead of a trace.
A failure of the machine rather than of the input (a compiler that cannot run) is worked
around where possible, and ``describe_failure`` puts its cause in the message that says so.
"""


class StreamV2VError(ValueError):
    """A mistake in what the user gave us, explained in one line with its fix."""

    # ComfyUI imports the pack under a name made of its folder's path and shows an error's
    # type by its module: without this, the error panel opens with that path.
    __module__ = "streamv2v.errors"


def one_line(exc: BaseException, text: str | None = None) -> str:
    """A library's error as ``Type: message`` on one line, for a message of ours that quotes
    it; ``text`` replaces the message when only part of it says anything."""
    text = " ".join((str(exc) if text is None else text).split())
    return f"{type(exc).__name__}: {text[:200]}"


def describe_failure(exc: BaseException) -> str:
    """The root of a compiler's failure in one line (torch.compile wraps it in pages)."""
    root = getattr(exc, "inner_exception", None) or exc.__cause__ or exc
    lines = str(root).strip().splitlines()
    return one_line(root, lines[0] if lines else "no message")
