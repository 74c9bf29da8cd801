"""The bank's math against the paper's equations, computed independently by hand."""

import math
import re

import pytest
import torch

from streamv2v.attention import BankSelfAttnProcessor, sdpa_attention
from streamv2v.bank import BankConfig, FeatureBank, dyme_merge, extend, fuse
from streamv2v.errors import StreamV2VError


def softmax_attention(q, k, v, heads):
    """Eq. 1 written out: softmax(Q K^T / sqrt(d)) V per head, with explicit loops."""
    b, n, inner = q.shape
    d = inner // heads
    out = torch.zeros(b, n, inner, dtype=q.dtype)
    for row in range(b):
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            scores = q[row, :, sl] @ k[row, :, sl].T / math.sqrt(d)
            out[row, :, sl] = torch.softmax(scores, dim=-1) @ v[row, :, sl]
    return out


def test_extended_attention_is_eq1():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 6, 8, generator=g, dtype=torch.float64) for _ in range(3))
    kb, vb = (torch.randn(2, 5, 8, generator=g, dtype=torch.float64) for _ in range(2))
    got = sdpa_attention(q, extend(k, kb), extend(v, vb), heads=2)
    want = softmax_attention(q, torch.cat([k, kb], 1), torch.cat([v, vb], 1), heads=2)
    torch.testing.assert_close(got, want)
    # The bank changes the result (it is really attended to) ...
    assert not torch.allclose(got, softmax_attention(q, k, v, heads=2))
    # ... and a bank holding the frame's own K, V is the identity (DESIGN.md's equivalence).
    torch.testing.assert_close(
        sdpa_attention(q, extend(k, k), extend(v, v), heads=2), softmax_attention(q, k, v, 2)
    )


def test_fusion_is_eq2_with_threshold_mask():
    g = torch.Generator().manual_seed(1)
    bank = torch.randn(1, 4, 16, generator=g, dtype=torch.float64)
    out = torch.randn(1, 3, 16, generator=g, dtype=torch.float64)
    out[0, 0] = bank[0, 2] * 3 + 1e-4 * torch.randn(16, generator=g, dtype=torch.float64)
    out[0, 1] = bank[0, 1] + 0.7 * torch.randn(16, generator=g, dtype=torch.float64)
    got = fuse(out, bank, strength=0.8, threshold=0.98)
    for p in range(3):
        cos = torch.nn.functional.cosine_similarity(out[0, p : p + 1], bank[0], dim=-1)
        best, q = cos.max(0)
        want = 0.2 * out[0, p] + 0.8 * bank[0, q] if best >= 0.98 else out[0, p]
        torch.testing.assert_close(got[0, p], want)
    assert not torch.equal(got[0, 0], out[0, 0])  # token 0 was close enough to fuse
    torch.testing.assert_close(got[0, 2], out[0, 2])  # an unrelated token is kept
    torch.testing.assert_close(fuse(out, out, 0.8, 0.98), out)  # fusing with itself: identity


def test_dyme_merge_keeps_n_and_means_matched_tokens():
    g = torch.Generator().manual_seed(2)
    keys, values, outputs = (torch.randn(3, 10, 4, generator=g, dtype=torch.float64) for _ in "kvo")
    merge_gen = torch.Generator().manual_seed(7)
    k2, v2, o2 = dyme_merge(keys, values, outputs, merge_gen)
    assert k2.shape == (3, 5, 4) and v2.shape == (3, 5, 4) and o2.shape == (3, 5, 4)

    # Recompute the same random partition and check every kept token by hand.
    order = torch.rand(3, 10, 1, generator=torch.Generator().manual_seed(7)).argsort(1)[..., 0]
    for row in range(3):
        src, dst = order[row, :5], order[row, 5:]
        kn = keys[row] / keys[row].norm(dim=-1, keepdim=True)
        match = (kn[src] @ kn[dst].T).argmax(-1)
        for j in range(5):
            members = [dst[j].item()] + [src[i].item() for i in range(5) if match[i] == j]
            for merged, source in ((k2, keys), (v2, values), (o2, outputs)):
                torch.testing.assert_close(merged[row, j], source[row, members].mean(0))


def test_dyme_ties_in_the_draws_are_split_by_position():
    """``torch.rand`` repeats values (on a GPU, about one row of 512 draws in 200 has a tie),
    and an unstable sort may order equal draws either way: the CPU's sort does, and so does
    Inductor's sort in the compiled merge, where CUDA's eager sort keeps positions. Ties go
    to the lower position everywhere, so every path makes the same split."""
    keys, values, outputs = (
        torch.randn(2, 128, 4, generator=torch.Generator().manual_seed(s)) for s in range(3)
    )
    tied = torch.zeros(2, 128, 1)  # every draw equal
    ordered = torch.arange(128.0).view(1, 128, 1).expand(2, -1, -1).contiguous()
    got = dyme_merge(keys, values, outputs, None, draws=tied)
    want = dyme_merge(keys, values, outputs, None, draws=ordered)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Inductor's sort)")
def test_the_compiled_merge_splits_tied_draws_as_the_eager_merge():
    from streamv2v.bank import _compiled_merge, _merge_in_place

    g = torch.Generator(device="cuda").manual_seed(0)
    for n in (64, 256):  # joint token counts of 128 and 512: Inductor sorts these itself
        joint = [torch.randn(4, 2 * n, 32, device="cuda", generator=g) for _ in "kvo"]
        draws = torch.rand(4, 2 * n, 1, device="cuda", generator=g)
        draws[:, 1::2] = draws[:, 0::2]  # pairs of equal draws
        eager, compiled = [t.clone() for t in joint], [t.clone() for t in joint]
        _merge_in_place(*eager, draws.clone(), 0.5, n, False)
        _compiled_merge()(*compiled, draws.clone(), 0.5, n, False)
        for a, b in zip(eager, compiled):
            torch.testing.assert_close(a, b)


def test_dyme_partitions_follow_the_generator():
    keys = torch.randn(1, 8, 4, generator=torch.Generator().manual_seed(3))
    a = dyme_merge(keys, keys, keys, torch.Generator().manual_seed(1))[0]
    b = dyme_merge(keys, keys, keys, torch.Generator().manual_seed(1))[0]
    c = dyme_merge(keys, keys, keys, torch.Generator().manual_seed(2))[0]
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)


def drive(bank, frames, layer="up_blocks.1.attentions.0.transformer_blocks.0.attn1"):
    """Feed one layer's (K, V, O) per frame through the bank the way the stream does."""
    for kvo in frames:
        bank.begin_step()
        bank.record(layer, *kvo)
        bank.end_step()
    return bank.layers.get(layer)


def frames_of(count, tokens=6, dim=4):
    g = torch.Generator().manual_seed(4)
    return [tuple(torch.randn(2, tokens, dim, generator=g) for _ in range(3)) for _ in range(count)]


def test_interval_counts_from_the_first_frame():
    bank = FeatureBank(BankConfig(kind="queue", size=10, interval=4))
    frames = frames_of(9)
    entries = drive(bank, frames)
    assert bank.frames_absorbed == 3  # frames 0, 4, 8
    assert entries.frames == 3
    for stored, source in zip(entries.keys.chunk(3, dim=1), (frames[0], frames[4], frames[8])):
        assert torch.equal(stored, source[0])


def test_queue_is_fifo_of_last_n_updates():
    bank = FeatureBank(BankConfig(kind="queue", size=2, interval=1))
    frames = frames_of(5)
    entries = drive(bank, frames)
    assert entries.frames == 2
    assert torch.equal(entries.outputs, torch.cat([frames[3][2], frames[4][2]], 1))
    k, v, o = bank.read("up_blocks.1.attentions.0.transformer_blocks.0.attn1", frames[0][0])
    assert k.shape == (2, 12, 4)
    assert torch.equal(o, torch.cat([frames[3][2], frames[4][2]], 1))


def test_dyme_first_update_takes_frame_then_merges_to_constant_size():
    bank = FeatureBank(BankConfig(kind="dyme", interval=1))
    bank.bind(torch.device("cpu"), seed=5)
    frames = frames_of(50)
    entries = drive(bank, frames[:1])
    assert torch.equal(entries.keys, frames[0][0])  # empty bank: taken as it is
    entries = drive(bank, frames[1:])
    assert entries.frames == 1 and entries.keys.shape == (2, 6, 4)
    assert bank.frames_absorbed == 50


@pytest.mark.parametrize("aside", [False, True])
@pytest.mark.parametrize("extended", [True, False])
def test_a_static_bank_stores_what_a_growing_bank_stores(extended, aside):
    """A static bank keeps the frame in the room in front of its tokens (extended attention
    writes K, V there, the update the rest) and draws ahead: the stored tokens are the same,
    also when it is updated by the operators that run beside the frame on a GPU."""
    config = BankConfig(interval=1, extended_attention=extended, fusion=not extended)
    layer = "up_blocks.1.attentions.0.transformer_blocks.0.attn1"
    frames = frames_of(6)
    banks = [FeatureBank(config), FeatureBank(config)]
    for bank in banks:
        bank.bind(torch.device("cpu"), seed=3)
        drive(bank, frames[:1])
    banks[1].make_static(aside=aside)
    assert banks[1].aside == aside
    for k, v, o in frames[1:]:
        for bank in banks:  # as the processor calls it
            bank.begin_step()
            bank.draw()
            bank.read(layer, k)
            if extended:
                bank.extended(layer, k, v)
            bank.record(layer, k, v, o)
            bank.end_step()
    growing, static = (bank.layers[layer] for bank in banks)
    assert static.lead == frames[0][0].shape[1]
    for a, b in zip(growing.tensors(), static.tensors()):
        assert torch.equal(a, b)


def test_none_bank_records_nothing():
    bank = FeatureBank(BankConfig(kind="none"))
    assert drive(bank, frames_of(3)) is None
    assert bank.frames_absorbed == 0


def test_bank_config_rejects_controls_without_effect():
    with pytest.raises(StreamV2VError, match="dyme"):
        BankConfig(kind="dyme", size=3)
    with pytest.raises(StreamV2VError, match="no effect"):
        BankConfig(extended_attention=False, fusion=False)
    with pytest.raises(StreamV2VError, match="kind"):
        BankConfig(kind="fifo")
    with pytest.raises(StreamV2VError, match="interval"):
        BankConfig(interval=0)
    with pytest.raises(StreamV2VError, match="strength"):
        BankConfig(fusion_strength=1.5)
    with pytest.raises(StreamV2VError, match="'none'"):
        BankConfig(kind="none", size=4)
    with pytest.raises(StreamV2VError, match="extended attention .* 'none'"):
        BankConfig(kind="none", extended_attention=False)
    with pytest.raises(StreamV2VError, match="fusion strength .* fusion off"):
        BankConfig(fusion=False, fusion_strength=0.5)
    with pytest.raises(StreamV2VError, match="merge ratio .* 'queue'"):
        BankConfig(kind="queue", merge_ratio=0.25)
    with pytest.raises(StreamV2VError, match="fusion layers is empty"):
        BankConfig(fusion_layers=())


def test_fusion_layers_are_the_low_resolution_decoder():
    config = BankConfig()
    assert config.fuses("mid_block.attentions.0.transformer_blocks.0.attn1")
    assert config.fuses("up_blocks.1.attentions.2.transformer_blocks.0.attn1")
    assert not config.fuses("up_blocks.2.attentions.0.transformer_blocks.0.attn1")
    assert not config.fuses("down_blocks.2.attentions.0.transformer_blocks.0.attn1")
    assert not config.fuses("up_blocks.10.attentions.0.transformer_blocks.0.attn1")
    assert not BankConfig(fusion=False).fuses("mid_block.attentions.0.transformer_blocks.0.attn1")


class FakeAttn(torch.nn.Module):
    """The parts of diffusers' Attention a self-attention processor uses."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        g = torch.Generator().manual_seed(9)
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(dim, dim, bias=False) for _ in "qkv")
        self.to_out = torch.nn.ModuleList([torch.nn.Linear(dim, dim), torch.nn.Dropout(0.0)])
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g, dtype=torch.float64)
        self.spatial_norm = self.group_norm = None
        self.residual_connection, self.rescale_output_factor, self.norm_cross = False, 1.0, False


@pytest.mark.parametrize(
    "layer,fuses", [("mid_block.a.attn1", True), ("down_blocks.0.attn1", False)]
)
def test_processor_reads_then_records_pre_fusion_output(layer, fuses):
    attn = FakeAttn()
    bank = FeatureBank(BankConfig(kind="queue", size=1, interval=1, fusion_threshold=-1.0))
    proc = BankSelfAttnProcessor(bank, layer, sdpa_attention)
    g = torch.Generator().manual_seed(10)
    h0, h1 = (torch.randn(1, 5, 8, generator=g, dtype=torch.float64) for _ in range(2))

    def plain(h, kb=None, vb=None):
        k, v = attn.to_k(h), attn.to_v(h)
        out = softmax_attention(attn.to_q(h), extend(k, kb), extend(v, vb), 2)
        return attn.to_out[0](out), k, v

    with torch.no_grad():
        bank.begin_step()
        first = proc(attn, h0)
        bank.end_step()
        o0, k0, v0 = plain(h0)
        torch.testing.assert_close(first, o0)  # empty bank: plain attention, no fusion

        bank.begin_step()
        second = proc(attn, h1)
        bank.end_step()
        o1, k1, v1 = plain(h1, k0, v0)
        want = fuse(o1, o0, 0.8, -1.0) if fuses else o1
        torch.testing.assert_close(second, want)
        entries = bank.layers[layer]
        torch.testing.assert_close(entries.outputs, o1)  # stored before fusion
        torch.testing.assert_close(entries.keys, k1)


def test_compiled_update_beside_the_frame_merges_the_banks_own_tensors():
    """torch.compile hands an operator a copy of a tensor that the graph mutated before it, and
    copies it back after the operator returns: an update still running beside the frame would
    then merge into the copy, or be overwritten by it. The room is filled by operators so the
    update gets the bank's own tensors (Inductor's code is read), and the result is the eager
    one."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    attn = FakeAttn().float()
    layer = "up_blocks.1.a.attn1"
    g = torch.Generator().manual_seed(4)
    frames = [torch.randn(2, 6, 8, generator=g) for _ in range(3)]
    banks, outputs = [], []
    for compiled in (False, True):
        bank = FeatureBank(BankConfig(interval=1))
        bank.bind(torch.device("cpu"), seed=1)
        proc = BankSelfAttnProcessor(bank, layer, sdpa_attention)
        with torch.no_grad():
            bank.begin_step()
            proc(attn, frames[0])
            bank.end_step()
            bank.make_static(aside=True)
            step = torch.compile(proc) if compiled else proc
            got = []
            for h in frames[1:]:
                bank.begin_step()
                bank.draw()
                if compiled:
                    out, code = run_and_get_code(step, attn, h)
                else:
                    out = step(attn, h)
                got.append(out)
                bank.end_step()
        banks.append(bank)
        outputs.append(got)
    update = [line for line in code[-1].splitlines() if "streamv2v.dyme_update.default(" in line]
    assert len(update) == 1, update
    joint = update[0].split("(", 1)[1].split(", ")[:3]
    assert all(re.fullmatch(r"arg\d+_1", name) for name in joint), update
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b)
    for a, b in zip(*(bank.layers[layer].joint for bank in banks)):
        torch.testing.assert_close(a, b)


def test_bank_save_load_round_trip(tmp_path):
    bank = FeatureBank(BankConfig(kind="dyme", interval=1))
    bank.bind(torch.device("cpu"), seed=3)
    drive(bank, frames_of(3))
    bank.save(tmp_path / "bank.safetensors")
    restored = FeatureBank.load(tmp_path / "bank.safetensors")
    assert restored.stats() == bank.stats()
    more = frames_of(4)[1:]
    a, b = drive(bank, more), drive(restored, more)
    for x, y in zip(a.tensors(), b.tensors()):
        assert torch.equal(x, y)  # identical continuation, DyMe partitions included
    with pytest.raises(StreamV2VError, match="differs"):
        FeatureBank(BankConfig(kind="queue")).load_state_dict(*bank.state_dict())
    (tmp_path / "junk.safetensors").write_bytes(b"not a bank")
    with pytest.raises(StreamV2VError, match="cannot be read"):
        FeatureBank.load(tmp_path / "junk.safetensors")
    with pytest.raises(StreamV2VError, match="does not exist"):
        FeatureBank.load(tmp_path / "missing.safetensors")


def test_a_bank_saved_on_a_gpu_loads_and_continues_on_a_cpu(tmp_path):
    """A GPU's random state (16 bytes of Philox seed and offset) cannot drive a CPU's draws:
    loaded where there is no GPU, or moved to the CPU, the bank draws afresh from its seed."""
    from safetensors.torch import save_file

    bank = FeatureBank(BankConfig(kind="dyme", interval=1))
    bank.bind(torch.device("cpu"), seed=3)
    drive(bank, frames_of(3))
    tensors, meta = bank.state_dict()
    tensors["generator_state"] = torch.zeros(16, dtype=torch.uint8)
    save_file(tensors, str(tmp_path / "gpu.safetensors"), {**meta, "generator_device": "cuda"})
    restored = FeatureBank.load(tmp_path / "gpu.safetensors").to("cpu")
    assert restored.stats() == bank.stats()
    fresh = torch.Generator().manual_seed(3)
    assert restored.generator.device.type == "cpu"
    assert torch.equal(restored.generator.get_state(), fresh.get_state())
    drive(restored, frames_of(4)[1:])  # continues, drawing on the CPU


def test_bank_rejects_tokens_of_another_shape():
    bank = FeatureBank(BankConfig(kind="queue", interval=1))
    layer = "mid_block.attn1"
    drive(bank, frames_of(1), layer)
    with pytest.raises(StreamV2VError, match="resolution"):
        bank.read(layer, torch.zeros(2, 7, 4))
    with pytest.raises(StreamV2VError, match="another model"):
        bank.read(layer, torch.zeros(3, 6, 4))


def test_reset_empties_and_reseeds():
    bank = FeatureBank(BankConfig(kind="dyme", interval=1))
    bank.bind(torch.device("cpu"), seed=3)
    first = drive(bank, frames_of(3)).keys.clone()
    bank.reset()
    assert bank.stats()["layers"] == 0 and bank.frames_absorbed == 0 and bank.nbytes() == 0
    assert torch.equal(drive(bank, frames_of(3)).keys, first)


def test_an_empty_bank_takes_the_new_seed_a_filled_one_keeps_its_draws():
    """Reset bank, then another seed: the partitions come from the new seed, as in a new
    session (on a GPU nothing else re-seeds the bank's generator)."""
    cpu = torch.device("cpu")
    fresh = FeatureBank(BankConfig(kind="dyme", interval=1))
    fresh.bind(cpu, seed=5)
    want = drive(fresh, frames_of(3)).keys.clone()

    bank = FeatureBank(BankConfig(kind="dyme", interval=1))
    bank.bind(cpu, seed=3)
    drive(bank, frames_of(3))
    state = bank.generator.get_state()
    bank.bind(cpu, seed=5)  # a continued stream keeps drawing where it was
    assert bank.seed == 3 and torch.equal(bank.generator.get_state(), state)
    bank.reset()
    bank.bind(cpu, seed=5)
    assert bank.seed == 5
    assert torch.equal(drive(bank, frames_of(3)).keys, want)


def test_attention_kernel_prefers_working_xformers(monkeypatch):
    """SDPA without xformers, xformers when it imports and runs, SDPA when it breaks."""
    import sys
    import types

    from streamv2v.attention import pick_attention_kernel

    monkeypatch.setitem(sys.modules, "xformers", None)
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    assert pick_attention_kernel(torch.device("cpu"), torch.float32)[0] == "sdpa"

    def exact(q, k, v):  # xformers' layout: [batch, tokens, heads, head_dim]
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        return out.transpose(1, 2)

    ops = types.SimpleNamespace(memory_efficient_attention=exact)
    package = types.ModuleType("xformers")
    package.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    name, kernel = pick_attention_kernel(torch.device("cpu"), torch.float32)
    assert name == "xformers"
    assert pick_attention_kernel(torch.device("cpu"), torch.float32, compiled=True)[0] == "sdpa"
    q, k, v = (torch.randn(2, 5, 8, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(kernel(q, k, v, 2), softmax_attention(q, k, v, 2))

    def broken(q, k, v):
        raise RuntimeError("no kernel for this GPU")

    ops.memory_efficient_attention = broken
    assert pick_attention_kernel(torch.device("cpu"), torch.float32)[0] == "sdpa"
