"""The fused DyMe matching kernel finds what the matrix product and argmax find.

Its logic (tiles, masks, ties) is checked on the CPU with Triton's interpreter; its speed and
rounding on a GPU (skipped without one).
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from streamv2v.bank import BankConfig, FeatureBank
from streamv2v.kernels import best_match, best_match_reference, triton_usable

ROOT = Path(__file__).resolve().parents[1]


def exact_inputs(rows, n_src, n_dst, dim, dtype, seed=0):
    """Multiples of 1/8 in a small range, so every dot product is exact in any summing order,
    with a dst token repeated so that ties are certain."""
    g = torch.Generator().manual_seed(seed)
    src = (torch.randint(-4, 5, (rows, n_src, dim), generator=g) / 8).to(dtype)
    dst = (torch.randint(-4, 5, (rows, n_dst, dim), generator=g) / 8).to(dtype)
    dst[:, -1] = dst[:, 1]
    return src, dst


def test_the_kernel_finds_the_first_best_match_in_the_interpreter():
    pytest.importorskip("triton")
    script = textwrap.dedent(
        """
        import torch
        from streamv2v.kernels import _triton_runs, best_match_triton, best_match_reference
        from tests.test_kernels import exact_inputs
        shapes = [(2, 100, 77, 32), (1, 130, 200, 48), (3, 64, 64, 64), (2, 33, 129, 80)]
        for dtype in (torch.float16, torch.float32):
            for seed, shape in enumerate(shapes):
                src, dst = exact_inputs(*shape, dtype, seed)
                got, want = best_match_triton(src, dst), best_match_reference(src, dst)
                assert got.dtype == torch.long and torch.equal(got, want), (dtype, shape)
        assert _triton_runs.__wrapped__(torch.device("cpu"))  # the probe, with its fixed tiles
        print("ok")
        """
    )
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_the_operator_is_the_reference_off_the_gpu_and_compiles():
    src, dst = exact_inputs(2, 40, 30, 16, torch.float32)
    want = best_match_reference(src, dst)
    assert not triton_usable(torch.device("cpu"))
    assert torch.equal(best_match(src, dst), want)
    compiled = torch.compile(lambda a, b: best_match(a, b) + 1, backend="aot_eager")
    assert torch.equal(compiled(src, dst), want + 1)


def test_a_triton_that_cannot_build_kernels_leaves_the_reference_matching(monkeypatch, caplog):
    """Triton builds its launcher with the system's C compiler: without one (slim images), the
    probe's failure, not the first frame that updates the bank, is where it shows."""
    import streamv2v.kernels as kernels

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    monkeypatch.setattr(kernels, "best_match_triton", no_compiler)
    with caplog.at_level("WARNING", logger="streamv2v.kernels"):
        assert not kernels._triton_runs.__wrapped__(torch.device("cpu"))
    assert "cannot run kernels on cpu (RuntimeError: Failed to find C compiler." in caplog.text
    assert "matrix product and argmax instead" in caplog.text


def test_describe_failure_gives_the_root_in_one_line():
    from streamv2v.errors import describe_failure

    root = RuntimeError("Failed to find C compiler.\nmore lines")
    wrapped = RuntimeError("backend='inductor' raised:\n...")
    wrapped.__cause__ = root
    assert describe_failure(wrapped) == "RuntimeError: Failed to find C compiler."
    inner = type("BackendCompilerFailed", (Exception,), {})("pages of context")
    inner.inner_exception = ImportError("no module named triton.backends")
    assert describe_failure(inner) == "ImportError: no module named triton.backends"
    assert describe_failure(ValueError()) == "ValueError: no message"


def test_a_static_bank_off_the_gpu_keeps_the_reference_matching():
    """(On a GPU with Triton, the fast path's bank takes the kernel: tests/test_accel.py.)"""
    bank = FeatureBank(BankConfig())
    tokens = torch.zeros(2, 8, 4)
    bank.begin_step()
    for layer in ("a.attn1", "b.attn1"):
        bank.record(layer, tokens, tokens, tokens)
    bank.end_step()
    bank.make_static()
    assert bank._matcher is best_match_reference  # CPU: the reference
    assert bank.static


@pytest.mark.skipif(not (torch.cuda.is_available() and triton_usable("cuda")), reason="GPU")
def test_on_the_gpu_the_kernel_agrees_with_the_product_and_argmax():
    """Real keys (normalised, fp16, at the shapes of SD1.5's 64x64 layers): the kernel sums the
    products in another order, so an index may differ only where two similarities tie within
    rounding."""
    g = torch.Generator(device="cuda").manual_seed(0)
    for dim, n in ((320, 4096), (640, 1024), (1280, 256)):
        keys = torch.randn(4, 2 * n, dim, device="cuda", generator=g, dtype=torch.float16)
        keys = keys / keys.norm(dim=-1, keepdim=True)
        src, dst = keys[:, :n].contiguous(), keys[:, n:].contiguous()
        got, want = best_match(src, dst), best_match_reference(src, dst)
        similarity = (src @ dst.transpose(-1, -2)).float()
        chosen = similarity.gather(-1, got.unsqueeze(-1))
        best = similarity.gather(-1, want.unsqueeze(-1))
        assert (got == want).float().mean() > 0.999
        torch.testing.assert_close(chosen, best, atol=2e-3, rtol=0)
