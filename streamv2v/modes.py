"""Names of the acceleration modes, importable without torch so ``--help`` stays instant.

compile: torch.compile + CUDA graphs (fastest; the first run at a size compiles, ~1 min)
graphs:  CUDA graphs only (starts in seconds)
static:  fixed buffers without graphs (any device; what the graphs replay, and what the
         tests compare with the plain step)
off:     the plain step
"""

ACCEL_MODES = ("compile", "graphs", "static", "off")
# What a user picks from: "static" is the graphs' building block, not a speed-up of its own.
USER_ACCEL_MODES = ("compile", "graphs", "off")
# The default everywhere (engine, CLI, node): the fastest, falling back where it cannot run.
DEFAULT_ACCEL = "compile"
