"""A fused GPU kernel for the bank's dynamic merging, equal to the PyTorch it replaces.

DyMe matches each src token to the dst token whose key is most similar: as a matrix product
and an argmax, the ``[rows, n_src, n_dst]`` similarity matrix is written to memory and read
back (at 64x64 latents, 134 MB per layer), which made the matching 0.18 ms of every such layer
of an update frame on an H200. ``best_match`` keeps each similarity tile on chip and only the
running best per src token, so the matrix never exists. Triton on CUDA; elsewhere, and in the
plain path, the matrix product and argmax themselves.

Each similarity is rounded to the input dtype before comparing, as the matrix product's output
is, and ties go to the lowest index, as ``argmax``'s do: the result differs from the reference
only where two similarities round differently because the products were summed in another
order.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from .errors import describe_failure

log = logging.getLogger(__name__)


def best_match_reference(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """For every src row, the index of the dst row with the largest dot product."""
    return (src @ dst.transpose(-1, -2)).argmax(dim=-1)


def triton_usable(device: torch.device | str) -> bool:
    """Whether ``best_match`` runs fused on ``device``: CUDA, Triton installed, and a kernel
    builds and runs there.

    Triton builds its launcher with the system's C compiler, which slim images lack: there the
    matching must stay the reference rather than fail in the first frame that updates the bank.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return False
    from torch.utils._triton import has_triton

    if not has_triton():
        return False
    if device.index is None:  # one answer per GPU, however it is named
        device = torch.device("cuda", torch.cuda.current_device())
    return _triton_runs(device)


@functools.cache
def _triton_runs(device: torch.device) -> bool:
    """Build and run the kernel once on a tiny input (one configuration, no tuning)."""
    try:
        src = torch.ones(1, 8, 16, device=device)  # not randn: the global RNG is not ours
        best_match_triton(src, src, {"BLOCK_M": 32, "BLOCK_N": 32}).cpu()  # waits for it
    except Exception as exc:  # Triton and its compiler raise many types; any means unusable
        log.warning(
            "Triton is installed but cannot run kernels on %s (%s): DyMe's matching uses the "
            "matrix product and argmax instead",
            device,
            describe_failure(exc),
        )
        return False
    return True


# Similarity matrices smaller than this are matched by cuBLAS and ATen's argmax, which were
# faster there (H200, fp16: 23 us against the kernel's 30 us at 1024 x 1024 tokens; 110 us
# against 156 us at 4096 x 4096, the 64x64 latents of a 512x512 frame).
FUSED_FROM = 2048 * 2048


@torch.library.custom_op("streamv2v::best_match", mutates_args=())
def best_match(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """``best_match_reference`` without the similarity matrix, on CUDA (an opaque operator to
    torch.compile, which would otherwise split it back into a product and an argmax)."""
    if not triton_usable(src.device) or src.shape[1] * dst.shape[1] < FUSED_FROM:
        return best_match_reference(src, dst)
    return best_match_triton(src, dst)


@best_match.register_fake
def _(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    return src.new_empty(src.shape[:-1], dtype=torch.long)


def best_match_triton(
    src: torch.Tensor, dst: torch.Tensor, config: dict[str, int] | None = None
) -> torch.Tensor:
    """The Triton kernel's launch, tuned per shape unless ``config`` fixes its tiles; also
    runs under ``TRITON_INTERPRET=1`` on CPU tensors (the interpreter cannot time tiles)."""
    import triton

    rows, n_src, dim = src.shape
    n_dst = dst.shape[1]
    src, dst = src.contiguous(), dst.contiguous()
    out = torch.empty(rows, n_src, device=src.device, dtype=torch.long)
    block_k = max(16, min(64, triton.next_power_of_2(dim)))

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(n_src, meta["BLOCK_M"]), rows

    args = (src, dst, out, n_src, n_dst, dim, src.stride(0), dst.stride(0))
    if config is None and os.environ.get("TRITON_INTERPRET") == "1":
        config = {"BLOCK_M": 32, "BLOCK_N": 32}
    if config is not None:
        _kernel().fn[grid](*args, **config, BLOCK_K=block_k)
    else:
        _kernel()[grid](*args, BLOCK_K=block_k)
    return out


@functools.cache
def _kernel():
    """The kernel, built on first use (importing the pack must not need Triton) and tuned on
    its first call per shape, before any CUDA graph captures it."""
    import triton
    import triton.language as tl

    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n, w, s in ((128, 128, 8, 3), (64, 128, 4, 3), (128, 64, 4, 4), (64, 64, 4, 4))
    ]

    @triton.autotune(configs=configs, key=["n_src", "n_dst", "dim"])
    @triton.jit
    def best_match_kernel(
        src_ptr,
        dst_ptr,
        out_ptr,
        n_src: tl.constexpr,  # constant per layer: fixed loop bounds, one build per layer shape
        n_dst: tl.constexpr,
        dim: tl.constexpr,
        src_row_stride,
        dst_row_stride,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        row = tl.program_id(1)
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        k = tl.arange(0, BLOCK_K)
        src_ptr += row * src_row_stride
        dst_ptr += row * dst_row_stride
        best = tl.full([BLOCK_M], float("-inf"), tl.float32)
        best_index = tl.zeros([BLOCK_M], tl.int64)
        for n0 in range(0, n_dst, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for k0 in range(0, dim, BLOCK_K):
                kk = k0 + k
                a = tl.load(
                    src_ptr + m[:, None] * dim + kk[None, :],
                    mask=(m[:, None] < n_src) & (kk[None, :] < dim),
                    other=0.0,
                )
                b = tl.load(
                    dst_ptr + n[None, :] * dim + kk[:, None],
                    mask=(n[None, :] < n_dst) & (kk[:, None] < dim),
                    other=0.0,
                )
                acc = tl.dot(a, b, acc, input_precision="ieee")
            # Rounded as the matrix product's output is, then compared; lowest index on ties.
            similarity = acc.to(src_ptr.dtype.element_ty).to(tl.float32)
            similarity = tl.where(n[None, :] < n_dst, similarity, float("-inf"))
            tile_best = tl.max(similarity, axis=1)
            is_best = similarity == tile_best[:, None]
            tile_index = tl.min(tl.where(is_best, n[None, :], n_dst), axis=1).to(tl.int64)
            better = tile_best > best  # strictly: an earlier tile keeps a tie
            best_index = tl.where(better, tile_index, best_index)
            best = tl.where(better, tile_best, best)
        tl.store(out_ptr + row * n_src + m, best_index, mask=m < n_src)

    return best_match_kernel
