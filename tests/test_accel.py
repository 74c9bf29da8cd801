"""The fast path gives the plain path's frames: static buffers on any device, CUDA graphs and
torch.compile on a GPU (those cases skip without one)."""

import copy
import gc
import os
import shutil
import sys
import time
import types
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.runtime.runtime_utils import cache_dir, default_cache_dir  # Inductor's

import streamv2v.accel as accel
import streamv2v.attention as attention
import streamv2v.session as session_module
from streamv2v.accel import (
    fused_projections,
    resolve_accel,
    taesd_functions,
    time_embeddings,
    time_embeddings_in_use,
)
from streamv2v.attention import (
    BankSelfAttnProcessor,
    CachedCrossAttnProcessor,
    PlainAttnProcessor,
    bank_processors,
    flash_attention,
    flash_is_faster,
    flash_where_faster,
    load_flash_attention,
    pick_attention_kernel,
    pick_self_attention_kernel,
    sdpa_attention,
)
from streamv2v.bank import BankConfig, FeatureBank
from streamv2v.cachedir import cache_root
from streamv2v.errors import StreamV2VError
from streamv2v.kernels import best_match, triton_usable
from streamv2v.stream import StreamConfig, StreamV2V
from tests.test_stream import video

CUDA = torch.cuda.is_available()
BANKS = {
    "dyme": BankConfig(interval=2),
    "queue2": BankConfig(kind="queue", size=2, interval=2),
    "none": BankConfig(kind="none"),
}


def run(model, accel, bank, frames, config=None, prompt="a watercolor painting"):
    stream = StreamV2V(model, config or StreamConfig(), bank, prompt=prompt, accel=accel)
    return list(stream.process(frames)), stream


def assert_frames_close(got, want, accel):
    assert len(got) == len(want)
    if accel == "static":  # same kernels in the same order: the very same numbers
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    else:  # fp16 on the GPU, other kernels: within fp16 tolerance of the plain path
        diff = torch.stack([(a - b).abs() for a, b in zip(got, want)])
        assert diff.mean() < 2e-3 and diff.max() < 5e-2, (diff.mean(), diff.max())


GPU = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
MARKS = {"static": (), "graphs": GPU, "compile": GPU}
ACCELS = [pytest.param(mode, marks=marks) for mode, marks in MARKS.items()]


def on_device(model, accel):
    """The model where ``accel`` runs: as it is (CPU, fp32) for static, else on the GPU in fp16."""
    if accel == "static":
        return model
    gpu = copy.deepcopy(model)
    gpu.pipe.to("cuda", torch.float16)
    gpu.device, gpu.dtype = torch.device("cuda"), torch.float16
    return gpu


CONFIGS = {
    "4-steps": StreamConfig(),
    "1-step": StreamConfig(steps=1, strength=0.5),
    "cfg-self": StreamConfig(cfg_type="self", guidance=1.4),
    "cfg-full-2-steps": StreamConfig(cfg_type="full", guidance=1.4, t_index_list=(20, 40)),
}


def fast_cases():
    """Every bank and configuration for the fixed-buffer and graph paths; compiling takes over
    a minute per case on a GPU, so ``compile`` is checked on the default steps with each bank
    kind (it compiles the very step that ``graphs`` replays)."""
    for mode, marks in MARKS.items():
        for bank in BANKS:
            for name, config in CONFIGS.items():
                if mode != "compile" or name == "4-steps":
                    yield pytest.param(mode, bank, config, marks=marks, id=f"{name}-{bank}-{mode}")


@pytest.mark.parametrize("accel,bank,config", list(fast_cases()))
def test_fast_path_equals_plain_path(tiny_model, tiny_model_taesd, bank, config, accel):
    frames = video(14)
    for model in (on_device(tiny_model_taesd, accel), on_device(tiny_model, accel)):
        want, _ = run(model, "off", BANKS[bank], frames, config)
        got, stream = run(model, accel, BANKS[bank], frames, config)
        assert stream.accel == accel and stream.accel_note is None
        assert stream.bank.static and stream._fast.image is not None  # the fast path took over
        processors = model.pipe.unet.attn_processors.values()
        cached = [p for p in processors if isinstance(p, CachedCrossAttnProcessor)]
        assert len(cached) == len(stream._fast.context) > 0  # prompt projected once, ahead
        resnets = [m for m in model.pipe.unet.modules() if type(m).__name__ == "ResnetBlock2D"]
        assert len(stream._fast.time_embeddings) == len(resnets)  # computed ahead too
        fused = [
            p.qkv is not None for p in processors if not isinstance(p, CachedCrossAttnProcessor)
        ]
        assert len(fused) == len(stream.bank_layers) and all(fused) == (accel != "static")
        kernel = accel != "static" and bank == "dyme" and triton_usable(stream.device)
        assert (stream.bank._matcher is best_match) == kernel
        assert_frames_close(got, want, accel)


@GPU
def test_a_session_previews_frames_before_their_chunk_is_back(tiny_model_taesd, monkeypatch):
    monkeypatch.setattr(session_module, "PREVIEW_EVERY_S", 0.0)
    model = on_device(tiny_model_taesd, "graphs")
    frames = video(40)
    previews = []

    def on_frame(done, total, image):
        previews.append((done, image))
        torch.cuda.synchronize()  # tiny frames: let the GPU keep up, as it does with real ones

    session = session_module.Session("previews")
    outputs = session.run(
        model,
        StreamConfig(),
        BankConfig(),
        "a cat",
        "",
        frames,
        on_frame=on_frame,
        accel="graphs",
    )
    assert outputs.shape == (40, *frames[0].shape)
    shown = [(done, image) for done, image in previews if image is not None]
    assert shown and shown[0][0] < session_module.TRANSFER_CHUNK  # before the first chunk
    for _, image in shown:  # each preview is one of the outputs, copied whole
        assert any(torch.equal(image, output) for output in outputs)


@GPU
def test_a_compile_that_fails_falls_back_to_graphs_and_says_why(tiny_model_taesd):
    """What a machine without a C compiler meets: Inductor's kernels cannot be built. The stream
    goes on with CUDA graphs of the uncompiled model, says why, and later streams of the model
    skip the attempt."""
    model = on_device(tiny_model_taesd, "compile")
    cause = RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    def cannot_compile(*args, **kwargs):
        raise RuntimeError("backend='inductor' raised:\n(pages)") from cause

    for name in ("unet", "taesd_encoder", "taesd_decoder"):  # what _compiled hands out
        model.accelerated[name] = cannot_compile
    frames = video(14)
    want, _ = run(model, "off", BANKS["dyme"], frames)
    said = []
    stream = StreamV2V(
        model,
        StreamConfig(),
        BANKS["dyme"],
        "a watercolor painting",
        accel="compile",
        on_status=said.append,
    )
    got = list(stream.process(frames))
    assert stream.accel == "graphs" and stream.accel_note in said
    assert "(RuntimeError: Failed to find C compiler." in stream.accel_note
    assert set(stream._fast.graphs) == {False, True} and not stream.bank.aside
    assert_frames_close(got, want, "graphs")
    again = StreamV2V(model, StreamConfig(), BANKS["dyme"], accel="compile")
    assert again.accel == "graphs" and again.accel_note == stream.accel_note


@pytest.mark.parametrize("accel", ACCELS)
def test_fast_path_survives_rollback_reset_and_prompt_change(tiny_model, tiny_model_taesd, accel):
    frames = video(16)
    for model in (on_device(tiny_model_taesd, accel), on_device(tiny_model, accel)):

        def drive(mode, model=model):
            stream = StreamV2V(model, StreamConfig(), BANKS["dyme"], prompt="ink", accel=mode)
            out = [stream.push(f) for f in frames[:6]]
            out.append(stream.flush(keep_state=True))  # rolled back: bank restored in place
            out += [stream.push(f) for f in frames[6:10]]
            stream.set_prompt("oil painting")
            out += [stream.push(f) for f in frames[10:13]]
            stream.bank.reset()  # fast path steps aside until the bank is full again
            out += [stream.push(f) for f in frames[13:]]
            out.append(stream.flush())
            return [image for batch in out for image in batch], stream

        want, _ = drive("off")
        got, stream = drive(accel)
        assert stream.bank.static
        assert_frames_close(got, want, accel)


@pytest.mark.parametrize("bank", ["dyme", "queue2"])
def test_compiled_update_frames_update_the_banks_own_tensors(
    tiny_model_taesd, bank, tmp_path, monkeypatch
):
    """The compiled UNet of an update frame hands every layer's update the bank's own tensors.

    Were it a copy (torch.compile copies a tensor that an operator declares it writes and the
    graph also reads, as feature fusion reads the bank's outputs), the merge running beside the
    frame would race the copy being written back, and a queue would be copied whole in every
    frame; an operator that returns nothing and declares no write must not be dropped either.
    Inductor compiles on the CPU too, so its code for the real (tiny) UNet is read here; on a
    GPU the frames are compared (fast path tests).
    """
    import re

    from torch._inductor.utils import run_and_get_code

    # Compiled afresh: a cached graph would be read back whatever the operators now declare
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    model = tiny_model_taesd
    stream = StreamV2V(model, StreamConfig(), BANKS[bank], prompt="ink", accel="static")
    for frame in video(6):
        stream.push(frame)
    step = stream._fast
    step.unet = torch.compile(model.pipe.unet, dynamic=False)  # as the compile mode does
    stream.bank.make_static(aside=True)
    with torch.inference_mode(), stream.bank.step_as(True):
        _, code = run_and_get_code(step._body)
    lines = [line for c in code for line in c.splitlines()]
    update = "dyme_update" if bank == "dyme" else "queue_update"
    calls = [line for line in lines if f"streamv2v.{update}.default(" in line]
    assert len(calls) == len(stream.bank_layers)
    for call in calls:
        joint = call.split("(", 1)[1].split(", ")[:3]
        assert all(re.fullmatch(r"arg\d+_1", name) for name in joint), call
    torch._dynamo.reset()


@pytest.mark.parametrize("bank", ["dyme", "queue2"])
def test_one_compiled_graph_serves_frames_that_update_the_bank_and_frames_that_do_not(
    tiny_model_taesd, bank
):
    """A static bank's update operator decides whether to act when it runs, not when it is
    traced: the UNet compiles once for both kinds of frame (one wait instead of two on a first
    run), and only frames that update the bank change it."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):  # counts what torch.compile traces, runs it as traced
        graphs.append(gm)
        return gm.forward

    model = tiny_model_taesd
    stream = StreamV2V(model, StreamConfig(), BANKS[bank], prompt="ink", accel="static")
    for frame in video(6):
        stream.push(frame)
    step, bank = stream._fast, stream.bank
    step.unet = torch.compile(model.pipe.unet, backend=backend, dynamic=False)
    bank.make_static(aside=True)

    def stored() -> list[torch.Tensor]:  # the bank's tokens, after the room for the frame's
        return [t[:, e.lead :].clone() for e in bank.layers.values() for t in e.joint]

    with torch.inference_mode():
        before = stored()
        with bank.step_as(False):
            step._body()
        traced = len(graphs)
        assert traced and all(torch.equal(a, b) for a, b in zip(before, stored()))
        with bank.step_as(True):
            step._body()
        assert len(graphs) == traced  # not traced again
        assert not any(torch.equal(a, b) for a, b in zip(before, stored()))
    torch._dynamo.reset()


def test_a_model_let_go_is_freed_at_once(tiny_model_taesd, monkeypatch):
    """A stream and its fast step refer to each other: without a collection the model they
    hold would stay in memory after a release, and while the next model loads."""
    sessions = session_module.SessionRegistry()
    cache = session_module.ModelCache(let_go=sessions.drop_streams)
    spec = session_module.ModelSpec("tiny")

    def streaming() -> weakref.ref:
        cache.adopt(spec, copy.deepcopy(tiny_model_taesd))
        frames = video(6)
        sessions.get("kept").run(
            cache.get(spec), StreamConfig(), BANKS["dyme"], "a cat", "", frames, accel="static"
        )
        assert sessions.find("kept").stream._fast is not None
        return weakref.ref(cache.get(spec).pipe.unet)

    unet = streaming()
    sessions.drop_streams()  # Free Memory, Unload Models
    cache.clear()
    assert unet() is None

    unet = streaming()
    freed = []
    monkeypatch.setattr(session_module.ModelSpec, "check", lambda _: None)  # no files here
    monkeypatch.setattr(session_module.ModelSpec, "load", lambda _: freed.append(unet() is None))
    cache.get(session_module.ModelSpec("other"))  # another model: a LoRA added, another VAE
    assert freed == [True]


@GPU
@pytest.mark.parametrize("accel", ["graphs", "compile"])
def test_releasing_the_model_frees_its_gpu_memory(tiny_model_taesd, accel):
    """What Free Memory, Unload Models and ComfyUI's memory manager count on: once the cache
    and the streams let go of the model, nothing (CUDA graphs, compiled code) keeps it, and a
    new stream after a release holds no more than the one before (cuBLAS keeps a workspace for
    every CUDA stream that ran a matrix product, for the life of the process)."""
    cache, sessions = session_module.ModelCache(), session_module.SessionRegistry()
    spec = session_module.ModelSpec("tiny", device="cuda")
    left = []
    for _ in range(3):
        cache.adopt(spec, on_device(tiny_model_taesd, accel))
        unet = weakref.ref(cache.get(spec).pipe.unet)
        frames = video(10)
        out = sessions.get("kept").run(
            cache.get(spec), StreamConfig(), BANKS["dyme"], "a cat", "", frames, accel=accel
        )
        assert len(out) == 10 and sessions.find("kept").stream.accel == accel
        sessions.drop_streams()
        assert cache.clear()
        gc.collect()
        assert unet() is None
        left.append(torch.cuda.memory_allocated())
    assert sessions.find("kept").bank.frames_absorbed > 0  # the bank stays
    assert max(left[1:]) <= left[0] + 2**20, [f"{b / 2**20:.1f} MiB" for b in left]


@GPU
def test_a_reset_bank_takes_the_new_seed_on_a_gpu(tiny_model_taesd):
    """Reset bank, then another seed: the same frames as a new stream of that seed (on a GPU
    nothing but the bank seeds the bank's generator: the CPU's path copies the stream's)."""
    model = on_device(tiny_model_taesd, "graphs")
    frames = video(10)
    bank = FeatureBank(BANKS["dyme"])
    list(StreamV2V(model, StreamConfig(seed=3), bank, "ink", accel="off").process(frames))
    bank.reset()
    got = list(StreamV2V(model, StreamConfig(seed=5), bank, "ink", accel="off").process(frames))
    want, _ = run(model, "off", BANKS["dyme"], frames, StreamConfig(seed=5), prompt="ink")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("accel", ACCELS)
def test_a_reset_fast_stream_takes_frames_of_another_size(tiny_model_taesd, accel):
    model = on_device(tiny_model_taesd, accel)
    stream = StreamV2V(model, StreamConfig(), BANKS["dyme"], prompt="ink", accel=accel)
    list(stream.process(video(10)))
    stream.reset()
    other = video(10, width=48, height=40)
    got = list(stream.process(other))
    want, _ = run(model, "off", BANKS["dyme"], other, prompt="ink")
    assert got[0].shape == (40, 48, 3)
    assert_frames_close(got, want, accel)


def test_a_saved_fast_stream_continues_exactly(tiny_model_taesd, tmp_path):
    frames = video(14)
    a = StreamV2V(tiny_model_taesd, StreamConfig(), BANKS["dyme"], prompt="ink", accel="static")
    for frame in frames[:7]:
        a.push(frame)
    assert a.bank.static
    a.save(tmp_path / "stream.safetensors")
    b = StreamV2V(tiny_model_taesd, StreamConfig(), BANKS["dyme"], prompt="ink", accel="static")
    b.load(tmp_path / "stream.safetensors")
    for x, y in zip(list(a.process(frames[7:])), list(b.process(frames[7:]))):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


@pytest.fixture
def cudnn_fusion_on_cpu(monkeypatch) -> list[str]:
    """cuDNN's fused convolution + ReLU ops stood in for by their definitions (CPU), so the
    fused TAESD plan runs here; records which op each fused step used."""
    fused = []

    def conv_relu(x, w, b, *args):
        fused.append("relu")
        return F.relu(F.conv2d(x, w, b, *args))

    def conv_add_relu(x, w, z, alpha, b, *args):
        fused.append("add_relu")
        return F.relu(F.conv2d(x, w, b, *args) + alpha * z)

    monkeypatch.setattr(torch, "cudnn_convolution_relu", conv_relu)
    monkeypatch.setattr(torch, "cudnn_convolution_add_relu", conv_add_relu)
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    return fused


def test_fused_taesd_computes_what_the_modules_do(tiny_model_taesd, cudnn_fusion_on_cpu):
    """On a GPU, TAESD's convolutions run with their ReLU (and residual add) fused by cuDNN;
    here those cuDNN ops are stood in for by their definitions, to check the plan around them
    (which layers fuse, the scaling diffusers' forward does) against diffusers' own modules."""
    fused = cudnn_fusion_on_cpu
    vae = copy.deepcopy(tiny_model_taesd.pipe.vae).half()  # fused in fp16 only
    encode, decode = taesd_functions(vae, fused=True)
    x, z = (torch.rand(1, 3, 48, 64) * 2 - 1).half(), torch.randn(1, 4, 6, 8).half()
    with torch.no_grad():
        torch.testing.assert_close(encode(x), vae.encoder(x))
        torch.testing.assert_close(decode(z), vae.decoder(z))
    blocks = sum(type(m).__name__ == "AutoencoderTinyBlock" for m in vae.modules())
    assert fused.count("add_relu") == blocks and fused.count("relu") == 2 * blocks + 1
    assert taesd_functions(vae, fused=False) == (vae.encoder, vae.decoder)
    assert taesd_functions(vae.float(), fused=True) == (vae.encoder, vae.decoder)


def test_compiled_taesd_is_not_guarded_through_default_arguments(
    tiny_model_taesd, cudnn_fusion_on_cpu
):
    """PyTorch 2.11's Inductor cache cannot unpickle a guard on a default argument (its
    ``DefaultsSource``), so a graph with one compiles again in every new process: the fused
    TAESD steps hold their modules in closures."""
    vae = copy.deepcopy(tiny_model_taesd.pipe.vae).half()
    encode, decode = taesd_functions(vae, fused=True)
    x, z = (torch.rand(1, 3, 48, 64) * 2 - 1).half(), torch.randn(1, 4, 6, 8).half()
    for function, value in ((encode, x), (decode, z)):
        guards = torch._dynamo.explain(function)(value).out_guards
        assert guards and not [g.name for g in guards if "__defaults__" in g.name]


def unet_output(unet, t, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(len(t), 4, 8, 8, generator=generator)
    context = torch.randn(len(t), 77, unet.config.cross_attention_dim, generator=generator)
    with torch.inference_mode():
        return unet(x, t, encoder_hidden_states=context, return_dict=False)[0]


def test_time_embeddings_computed_ahead_are_the_unets_own(tiny_model):
    """The fast path hands every ResNet its time embedding, computed once per stream: the
    UNet's output must be the very same, and any call outside the block computes its own."""
    unet = tiny_model.pipe.unet
    t, other = torch.tensor([999, 759, 499, 259]), torch.tensor([1, 2, 3, 4])
    want = unet_output(unet, t)
    with torch.inference_mode():
        cache = time_embeddings(unet, t)
    assert len(cache) == sum(type(m).__name__ == "ResnetBlock2D" for m in unet.modules())
    with time_embeddings_in_use(unet, cache):
        torch.testing.assert_close(unet_output(unet, t), want, atol=0, rtol=0)
        assert torch.equal(unet_output(unet, other), want)  # the cache is what counts
        copied = copy.deepcopy(unet)  # its hooks read its own slot
        with time_embeddings_in_use(copied, cache):
            assert torch.equal(unet_output(copied, other), want)
    torch.testing.assert_close(unet_output(unet, t), want, atol=0, rtol=0)
    assert not torch.equal(unet_output(unet, other), want)  # no longer
    assert not torch.equal(unet_output(copied, other), want)
    unet.class_embedding = torch.nn.Embedding(2, 8)  # embeddings that depend on more inputs
    assert time_embeddings(unet, t) is None


def test_streams_of_one_model_each_use_their_own_time_embeddings(tiny_model_taesd):
    """A stream whose fast path starts at once (no bank) computes its embeddings on a UNet
    that an earlier stream's fast path ran: it must get its own timesteps' embeddings."""
    frames = video(8)
    configs = (
        StreamConfig(t_index_list=(30, 35, 40, 45)),
        StreamConfig(t_index_list=(10, 20, 30, 40)),
        StreamConfig(t_index_list=(25,)),
    )
    for config in configs:
        fresh = copy.deepcopy(tiny_model_taesd)
        got, stream = run(tiny_model_taesd, "static", BANKS["none"], frames, config)
        want, _ = run(fresh, "static", BANKS["none"], frames, config)
        assert stream._fast.image is not None
        assert_frames_close(got, want, "static")


def test_fused_qkv_projections_compute_the_three_products(tiny_model):
    """On a GPU the fast path's self-attention layers take q, k, v from one matrix product."""
    unet = tiny_model.pipe.unet
    names = list(unet.attn_processors)
    _, kernel = pick_attention_kernel(torch.device("cpu"), torch.float32)
    projections = fused_projections(tiny_model)
    assert projections is fused_projections(tiny_model)  # made once per model
    t = torch.tensor([999, 759, 499, 259])
    for bank in (None, FeatureBank(BankConfig())):
        unet.set_attn_processor(bank_processors(names, bank, kernel))
        want = unet_output(unet, t)
        processors = bank_processors(names, bank, kernel, projections)
        kind = PlainAttnProcessor if bank is None else BankSelfAttnProcessor
        fused = [p for p in processors.values() if getattr(p, "qkv", None) is not None]
        assert len(fused) == len(projections) and all(type(p) is kind for p in fused)
        unet.set_attn_processor(processors)
        torch.testing.assert_close(unet_output(unet, t), want, atol=1e-5, rtol=1e-5)


def fake_flash_attn(monkeypatch) -> list[torch.Size]:
    """``flash_attn.cute`` as flash-attn-4 shapes it, computed exactly; records each call's q."""
    calls = []

    def flash_attn_func(q, k, v):  # [batch, tokens, heads, head_dim] in, (output, lse) out
        calls.append(q.shape)
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2), None

    cute = types.ModuleType("flash_attn.cute")
    cute.flash_attn_func = flash_attn_func
    package = types.ModuleType("flash_attn")
    package.cute = cute
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    return calls


def timings(monkeypatch, flash_wins=lambda q: True) -> list[str]:
    """Kernel timing made up: flash-attn-4 wins where ``flash_wins(query)``; records what was
    timed, by kernel name."""
    timed = []

    def time_kernel(kernel, q, k, v, heads):
        kernel(q, k, v, heads)  # runs, as the real timing does
        flash = kernel is flash_attention
        timed.append("flash" if flash else "sdpa")
        return 1.0 if flash == flash_wins(q) else 2.0

    monkeypatch.setattr(attention, "time_kernel", time_kernel)
    monkeypatch.setattr(attention, "KERNEL_TIMES", {})
    return timed


def test_flash_attention_serves_the_self_attention_layers(tiny_model, monkeypatch):
    """The fast path's self-attention kernel (flash-attn-4 where it is faster) reads the
    layers' tokens in its own layout and gives SDPA's result, with and without a bank;
    cross-attention keeps SDPA. torch.compile takes it as one operator."""
    calls = fake_flash_attn(monkeypatch)
    timed = timings(monkeypatch)
    unet = tiny_model.pipe.unet
    names = list(unet.attn_processors)
    _, kernel = pick_attention_kernel(torch.device("cpu"), torch.float32)
    projections = fused_projections(tiny_model)
    t = torch.tensor([999, 759, 499, 259])
    for bank in (None, FeatureBank(BankConfig())):
        unet.set_attn_processor(bank_processors(names, bank, kernel, projections))
        want = unet_output(unet, t)
        calls.clear()
        timed.clear()
        processors = bank_processors(names, bank, kernel, projections, flash_where_faster)
        unet.set_attn_processor(processors)
        torch.testing.assert_close(unet_output(unet, t), want, atol=1e-5, rtol=1e-5)
        # every self-attention layer, nothing else (and each new shape once, timing it)
        assert len(calls) == len(projections) + timed.count("flash")

    qkv = torch.randn(2, 6, 3 * 16)
    q, k, v = qkv.chunk(3, dim=-1)  # strided, as the fused projection gives them
    compiled = torch.compile(lambda q, k, v: flash_attention(q, k, v, 2) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), sdpa_attention(q, k, v, 2) * 2)

    calls.clear()  # head size 4 has no flash-attn-4 kernel: SDPA attends, untimed
    timed.clear()
    torch.testing.assert_close(flash_where_faster(q, k, v, 4), sdpa_attention(q, k, v, 4))
    assert not calls and not timed
    flash_where_faster(q, k, v, 2)
    assert len(calls) == 1 + 1  # timed, then attended


def test_self_attention_takes_the_faster_kernel_for_each_shape(monkeypatch, caplog):
    """Each shape is timed once, eagerly or while torch.compile traces (the choice is a
    constant of the graph); flash-attn-4 attends where it was faster, SDPA elsewhere and where
    flash-attn-4 fails."""
    calls = fake_flash_attn(monkeypatch)
    timed = timings(monkeypatch, flash_wins=lambda q: q.shape[1] == 6)  # 6 tokens: flash
    q6, q9 = torch.randn(2, 6, 16), torch.randn(2, 9, 16)
    kv = torch.randn(2, 12, 16)
    torch.testing.assert_close(flash_where_faster(q6, kv, kv, 2), sdpa_attention(q6, kv, kv, 2))
    assert timed == ["flash", "sdpa"] and len(calls) == 1 + 1  # timed, then attended
    calls.clear()
    flash_where_faster(q9, kv, kv, 2)  # SDPA's faster here: flash-attn-4 only timed
    assert len(timed) == 4 and len(calls) == 1

    calls.clear()
    compiled = torch.compile(flash_where_faster, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(q6, kv, kv, 2), sdpa_attention(q6, kv, kv, 2))
    torch.testing.assert_close(compiled(q9, kv, kv, 2), sdpa_attention(q9, kv, kv, 2))
    assert len(timed) == 4 and len(calls) == 1  # the same choices, not timed again
    calls.clear()
    q7 = torch.randn(2, 7, 16)
    compiled(q7, kv, kv, 2)  # a new shape is timed while tracing, once
    compiled(q7, kv, kv, 2)
    assert len(timed) == 6 and len(calls) == 1

    def broken(q, k, v):
        raise RuntimeError("no kernel for these shapes\n(pages of compiler output)")

    sys.modules["flash_attn.cute"].flash_attn_func = broken
    q5 = torch.randn(2, 5, 16)
    with caplog.at_level("INFO", logger="streamv2v.attention"):
        torch.testing.assert_close(flash_where_faster(q5, kv, kv, 2), sdpa_attention(q5, kv, kv, 2))
    assert "RuntimeError: no kernel for these shapes" in caplog.text and "pages" not in caplog.text
    assert not flash_is_faster(q5.device, q5.dtype, ((2, 5, 16), (2, 12, 16), (2, 12, 16)), 2)


def test_kernel_timing_counts_the_calls():
    """Seconds per call: calls that sleep 2 ms each take about 2 ms per call, not ten times that
    (the bound is loose for a busy machine's late wake-ups)."""

    def kernel(*args):
        time.sleep(0.002)
        return args[0]

    assert 0.002 <= attention.time_kernel(kernel, torch.zeros(1)) < 0.01


def test_flash_attention_is_picked_only_on_a_gpu(monkeypatch):
    fake_flash_attn(monkeypatch)
    assert pick_self_attention_kernel(torch.device("cpu"), torch.float16) is None
    if CUDA:  # the switch turns it off on any GPU
        pick_self_attention_kernel.cache_clear()
        monkeypatch.setenv("STREAMV2V_FLASH_ATTENTION", "0")
        assert pick_self_attention_kernel(torch.device("cuda"), torch.float16) is None
        pick_self_attention_kernel.cache_clear()


def test_flash_attention_loads_when_it_runs_and_says_why_when_it_does_not(
    flash_settings, monkeypatch, caplog
):
    """Not installed: SDPA, unsaid. Installed and working: its kernel. Installed but failing
    to import, to run its probe or to compute SDPA's result: SDPA, with a warning that names
    the cause and the switch."""
    cpu = torch.device("cpu")
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # an import of it raises
    with caplog.at_level("WARNING"):
        assert load_flash_attention(cpu, torch.float32) is None
    assert not caplog.records

    calls = fake_flash_attn(monkeypatch)
    assert load_flash_attention(cpu, torch.float32) is flash_where_faster
    assert calls == [torch.Size([1, 128, 1, 40])]  # the probe, at SD1.5's largest layers' size

    def broken(q, k, v):
        raise RuntimeError("no kernel for sm_70\n(pages of compiler output)")

    sys.modules["flash_attn.cute"].flash_attn_func = broken
    with caplog.at_level("WARNING"):
        assert load_flash_attention(cpu, torch.float32) is None
    assert "RuntimeError: no kernel for sm_70" in caplog.text
    assert "STREAMV2V_FLASH_ATTENTION=0" in caplog.text and "pages" not in caplog.text

    caplog.clear()
    sys.modules["flash_attn.cute"].flash_attn_func = lambda q, k, v: (v.clone(), None)  # wrong
    with caplog.at_level("WARNING"):
        assert load_flash_attention(cpu, torch.float32) is None
    assert "its result differs from PyTorch's attention by" in caplog.text

    caplog.clear()
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)
    monkeypatch.delitem(sys.modules, "flash_attn")
    monkeypatch.setattr("builtins.__import__", _import_failing("flash_attn", OSError("libcute")))
    with caplog.at_level("WARNING"):
        assert load_flash_attention(cpu, torch.float32) is None
    assert "OSError: libcute" in caplog.text


@pytest.fixture
def flash_settings(kernel_cache, monkeypatch):
    """flash-attn-4's cache settings unset, as they are until the pack loads it; the folder
    where its kernels should go."""
    for name in ("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"):
        monkeypatch.setenv(name, "")  # remembered unset, so what loading it sets is undone
        monkeypatch.delenv(name)
    return kernel_cache.parent / "flash_attention"


def test_flash_attn_4_kernels_go_to_the_folder_that_outlives_a_reboot(
    flash_settings, tmp_path, monkeypatch
):
    fake_flash_attn(monkeypatch)
    assert load_flash_attention(torch.device("cpu"), torch.float32) is flash_where_faster
    assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"] == "1"
    assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"] == str(flash_settings)
    assert flash_settings.is_dir()

    mine = str(tmp_path / "mine")  # a folder the user chose is kept, and so is "off"
    monkeypatch.setenv("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", mine)
    monkeypatch.setenv("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "0")
    load_flash_attention(torch.device("cpu"), torch.float32)
    assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"] == mine
    assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"] == "0"

    blocker = tmp_path / "a-file"  # no folder can be made: flash-attn-4's default stays
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    monkeypatch.delenv("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR")
    load_flash_attention(torch.device("cpu"), torch.float32)
    assert "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR" not in os.environ


def _import_failing(name: str, exc: Exception):
    """``__import__`` with ``name`` failing as a broken install fails (a library not loading)."""
    real = __import__

    def fake(module, *args, **kwargs):
        if module == name or module.startswith(f"{name}."):
            raise exc
        return real(module, *args, **kwargs)

    return fake


def flash_attn_installed() -> bool:
    try:
        import flash_attn.cute  # noqa: F401
    except Exception:
        return False
    return True


FLASH_GPU = pytest.mark.skipif(
    not (CUDA and flash_attn_installed()), reason="needs a CUDA GPU and flash-attn-4"
)


@FLASH_GPU
@pytest.mark.parametrize("accel", ["graphs", "compile"])
def test_with_flash_attn_4_the_fast_path_gives_the_plain_paths_frames(
    tiny_model_taesd, accel, monkeypatch
):
    import flash_attn.cute

    calls = []
    real = flash_attn.cute.flash_attn_func
    monkeypatch.setattr(flash_attn.cute, "flash_attn_func", lambda *a: calls.append(1) or real(*a))
    timings(monkeypatch)  # its kernel wherever it has one, whatever the tiny shapes' timings
    model = on_device(tiny_model_taesd, accel)
    frames = video(8)
    got, stream = run(model, accel, BANKS["dyme"], frames)
    assert stream._fast.attention == "fa4+sdpa" and calls
    want, plain = run(model, "off", BANKS["dyme"], frames)
    assert plain.attention_backend == "sdpa"  # the reference keeps PyTorch's attention
    assert_frames_close(got, want, accel)


@FLASH_GPU
def test_kernels_are_timed_on_the_gpu(monkeypatch):
    """Both kernels timed at SD1.5's largest extended attention, as CUDA graphs replay them."""
    monkeypatch.setattr(attention, "KERNEL_TIMES", {})
    cuda, shapes = torch.device("cuda"), ((4, 4096, 320), (4, 8192, 320), (4, 8192, 320))
    faster = flash_is_faster(cuda, torch.float16, shapes, 8)
    flash, sdpa = attention.KERNEL_TIMES[(cuda, torch.float16, shapes, 8)]
    assert 1e-5 < flash < 1e-2 and 1e-5 < sdpa < 1e-2 and faster == (flash < sdpa)


def test_accel_falls_back_with_a_message():
    cpu = torch.device("cpu")
    assert resolve_accel("off", cpu) == ("off", None)
    assert resolve_accel("static", cpu) == ("static", None)
    mode, note = resolve_accel("compile", cpu)
    assert mode == "off" and "needs an NVIDIA GPU" in note
    mode, note = resolve_accel("graphs", torch.device("mps"))
    assert mode == "off" and "mps" in note
    with pytest.raises(StreamV2VError, match="acceleration 'fast' is unknown"):
        resolve_accel("fast", cpu)


def test_default_on_cpu_is_the_plain_path_with_a_note(tiny_model):
    stream = StreamV2V(tiny_model, StreamConfig(), BANKS["dyme"])
    assert stream.accel == "off" and "needs an NVIDIA GPU" in stream.accel_note


@pytest.fixture
def kernel_cache(tmp_path, monkeypatch):
    """A user cache folder of the test's own, no folder chosen by the user: where this pack's
    compiled kernels should go."""
    # What Inductor sets itself once it has looked for its folder: not the user's choice
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    monkeypatch.setattr(sys, "platform", "linux")
    return tmp_path / "home-cache" / "streamv2v" / "torchinductor"


def test_compiled_kernels_go_to_a_folder_that_outlives_a_reboot(kernel_cache):
    with accel.compile_cache():
        assert cache_dir() == str(kernel_cache)
        if shutil.which("g++") or shutil.which("clang++"):  # Inductor's CPU code needs one
            add = torch.compile(lambda x: x.sin() + 1, backend="inductor", dynamic=False)
            torch.testing.assert_close(add(torch.ones(7)), torch.ones(7).sin() + 1)
            assert list(kernel_cache.rglob("*.py"))  # the generated kernels are there
    assert cache_dir() == default_cache_dir()  # other compiles keep their folder
    os.environ.pop("TORCHINDUCTOR_CACHE_DIR")  # as before Inductor first looks for it
    with accel.compile_cache():
        assert cache_dir() == str(kernel_cache)
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ


@pytest.mark.parametrize(
    "platform,env,where",
    [
        ("win32", {"LOCALAPPDATA": "/users/me/AppData/Local"}, "/users/me/AppData/Local"),
        ("darwin", {}, "~/Library/Caches"),
        ("linux", {}, "~/.cache"),
    ],
)
def test_the_kernel_folder_is_the_systems_cache_folder(
    kernel_cache, monkeypatch, platform, env, where
):
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setattr(sys, "platform", platform)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cache_root() == Path(where).expanduser() / "streamv2v"


def test_a_kernel_folder_the_user_chose_is_kept(kernel_cache, tmp_path, monkeypatch):
    mine = str(tmp_path / "mine")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", mine)
    with accel.compile_cache():
        assert cache_dir() == mine
    assert not kernel_cache.exists()


def test_a_kernel_folder_that_cannot_be_made_leaves_inductors_default(
    kernel_cache, tmp_path, monkeypatch, caplog
):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # no folder can be made inside a file
    with caplog.at_level("INFO", logger="streamv2v"), accel.compile_cache():
        assert cache_dir() == default_cache_dir()
    assert "stay in Inductor's default folder" in caplog.text


def test_the_compiling_message_allows_longer_where_inductor_compiles_on_one_thread(monkeypatch):
    from torch._inductor import config

    with config.patch(compile_threads=16):  # its own way: monkeypatch's undo hides the entry
        assert accel.first_compile_time() == "one to two minutes"
    with config.patch(compile_threads=1):
        assert accel.first_compile_time().startswith("two to three minutes")
    # Windows is such a place (the README and the node's tooltip say so)
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    monkeypatch.setattr(sys, "platform", "win32")
    assert config.decide_compile_threads() == 1


@GPU
@pytest.mark.parametrize("bank", ["dyme", "queue2"])
def test_compiling_is_announced(tiny_model_taesd, kernel_cache, bank):
    torch._dynamo.reset()  # a model of the same shapes compiled before would be reused
    model = on_device(tiny_model_taesd, "compile")
    said = []
    stream = StreamV2V(model, StreamConfig(), BANKS[bank], accel="compile", on_status=said.append)
    list(stream.process(video(8)))
    assert stream.accel == "compile" and len(stream._fast.graphs) == 2  # both kinds of frame
    assert len(said) == 1  # compiled once for both
    assert said[0].startswith("compiling the model for 32x24 frames at 4 steps")
    said.clear()
    again = StreamV2V(model, StreamConfig(), BANKS[bank], accel="compile", on_status=said.append)
    list(again.process(video(8)))
    assert said == []  # compiled once per model, size, steps and bank
    assert list(kernel_cache.rglob("*.py"))  # and kept where a reboot leaves them
