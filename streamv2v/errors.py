"""The one exception type users see.

Every check at an entry point (CLI argument, node widget, engine call) raises
``StreamV2VError`` with a message that names the offending input and says how to fix
it. Front ends (the CLI, the ComfyUI nodes) print its message as-is instead of a trace.
"""


class StreamV2VError(ValueError):
    """A mistake in what the user gave us, explained in one line with its fix."""
