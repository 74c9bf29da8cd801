"""The stream batch: exact against single-frame denoising, aligned, seeded, and bounded."""

import numpy as np
import pytest
import torch

import streamv2v.session as session_module
from streamv2v.bank import BankConfig, FeatureBank
from streamv2v.errors import StreamV2VError
from streamv2v.session import Session
from streamv2v.stream import StreamConfig, StreamV2V, t_index_list_from_strength

NONE = BankConfig(kind="none")


def video(count, width=32, height=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(height, width, 3, generator=g)
    return [
        (base + 0.05 * i + 0.02 * torch.rand(height, width, 3, generator=g)) % 1
        for i in range(count)
    ]


def lcm_schedule(t_index_list):
    """The LCM schedule computed from first principles, not through diffusers."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    timesteps = [999 - 20 * i for i in t_index_list]  # 50 of 1000 steps, from 999 down
    rows = []
    for t in timesteps:
        scaled = 10.0 * t
        c_skip = 0.25 / (scaled**2 + 0.25)
        c_out = scaled / (scaled**2 + 0.25) ** 0.5
        rows.append((t, alphas_cumprod[t].sqrt(), (1 - alphas_cumprod[t]).sqrt(), c_skip, c_out))
    return rows


def denoise_alone(model, frame, prompt, t_index_list, seed):
    """One frame through all steps by itself: SDEdit + LCM boundary condition, same noise."""
    pipe = model.pipe
    schedule = lcm_schedule(t_index_list)
    h, w = frame.shape[:2]
    noise = torch.randn(
        (len(schedule), 4, h // 8, w // 8), generator=torch.Generator().manual_seed(seed)
    )
    cond = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    x = frame.permute(2, 0, 1).unsqueeze(0) * 2 - 1
    z = pipe.vae.encode(x).latents * pipe.vae.config.scaling_factor
    x_t = schedule[0][1] * z + schedule[0][2] * noise[0]
    for k, (t, a, b, c_skip, c_out) in enumerate(schedule):
        eps = pipe.unet(x_t, torch.tensor([t]), encoder_hidden_states=cond).sample
        x0 = c_out * (x_t - b * eps) / a + c_skip * x_t
        if k + 1 < len(schedule):
            x_t = schedule[k + 1][1] * x0 + schedule[k + 1][2] * noise[k + 1]
    image = pipe.vae.decode(x0 / pipe.vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0)


def test_t_index_list_from_strength():
    assert t_index_list_from_strength(0.4, 4) == [30, 35, 40, 45]
    assert t_index_list_from_strength(0.4, 1) == [30]
    assert StreamConfig().timestep_indices == (30, 35, 40, 45)
    assert StreamConfig(t_index_list=[10, 20]).timestep_indices == (10, 20)


@pytest.mark.parametrize("t_index_list", [(30, 35, 40, 45), (20, 40), (25,)])
def test_stream_batch_equals_each_frame_denoised_alone(tiny_model_taesd, t_index_list):
    """Proves the batching (slots are independent and carried right) and the alignment."""
    frames = video(6)
    stream = StreamV2V(tiny_model_taesd, StreamConfig(t_index_list=t_index_list), NONE, "a cat")
    with torch.inference_mode():
        outputs = list(stream.process(frames))
        assert len(outputs) == len(frames)
        for i, (frame, out) in enumerate(zip(frames, outputs)):
            want = denoise_alone(tiny_model_taesd, frame, "a cat", t_index_list, seed=2)
            torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4, msg=f"frame {i}")


def test_live_push_lags_by_steps_minus_one_and_matches_aligned(tiny_model_taesd):
    frames = video(7)
    aligned = list(StreamV2V(tiny_model_taesd, StreamConfig(), prompt="a dog").process(frames))
    live = StreamV2V(tiny_model_taesd, StreamConfig(), prompt="a dog")
    assert live.lag == 3
    got = []
    for i, frame in enumerate(frames):
        ready = live.push(frame)
        assert len(ready) == (1 if i >= live.lag else 0)
        got += ready
    got += live.flush()
    assert len(got) == len(frames)
    for a, b in zip(aligned, got):
        assert torch.equal(a, b)


def test_same_seed_same_output_other_seed_other_output(tiny_model_taesd):
    frames = video(5)

    def run(seed):
        return torch.stack(
            list(StreamV2V(tiny_model_taesd, StreamConfig(seed=seed), prompt="x").process(frames))
        )

    first, again, other = run(7), run(7), run(8)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_dyme_partitions_come_from_the_seed(tiny_model_taesd):
    """With a KL VAE the seed also drives latent sampling; with TAESD only noise + DyMe."""
    frames = video(9)
    config = BankConfig(interval=1)

    def bank_after(seed):
        stream = StreamV2V(tiny_model_taesd, StreamConfig(seed=seed), config, "x")
        list(stream.process(frames))
        return stream.bank

    a, b, c = bank_after(3), bank_after(3), bank_after(4)
    for name in a.layers:
        assert torch.equal(a.layers[name].keys[0], b.layers[name].keys[0])
    assert any(not torch.equal(a.layers[n].keys[0], c.layers[n].keys[0]) for n in a.layers)


def test_bank_changes_output_and_each_part_acts(tiny_model_taesd):
    frames = video(10)

    def run(bank):
        return torch.stack(
            list(StreamV2V(tiny_model_taesd, StreamConfig(), bank, "x").process(frames))
        )

    none = run(NONE)
    full = run(BankConfig(fusion_threshold=0.0))
    ea_only = run(BankConfig(fusion=False))
    ff_only = run(BankConfig(extended_attention=False, fusion_threshold=0.0))
    assert not torch.allclose(full, none)
    assert not torch.allclose(ea_only, full)
    assert not torch.allclose(ff_only, full)
    assert not torch.allclose(ff_only, none)


def test_fusion_installs_only_in_low_resolution_decoder_layers(tiny_model_taesd):
    stream = StreamV2V(tiny_model_taesd, StreamConfig(), BankConfig(), "x")
    fusing = sorted(n for n, p in stream._processors.items() if getattr(p, "fusing", False))
    assert len([n for n in stream._processors if ".attn1." in n]) == 16
    assert fusing == sorted(
        n
        for n in stream._processors
        if ".attn1." in n and n.startswith(("mid_block", "up_blocks.1."))
    )
    assert len(fusing) == 4


def test_prompt_change_mid_stream_keeps_bank(tiny_model_taesd):
    frames = video(8)
    stream = StreamV2V(tiny_model_taesd, StreamConfig(), BankConfig(interval=1), "a cat")
    for frame in frames[:4]:
        stream.push(frame)
    absorbed = stream.bank.frames_absorbed
    keys = {n: e.keys[0].clone() for n, e in stream.bank.layers.items()}
    stream.set_prompt("a watercolor painting")
    assert stream.bank.frames_absorbed == absorbed
    assert all(torch.equal(keys[n], e.keys[0]) for n, e in stream.bank.layers.items())
    changed = stream.push(frames[4])
    same = StreamV2V(tiny_model_taesd, StreamConfig(), BankConfig(interval=1), "a cat")
    for frame in frames[:4]:
        same.push(frame)
    assert not torch.allclose(changed[0], same.push(frames[4])[0])


def test_bank_memory_is_constant_over_hundreds_of_frames(tiny_model_taesd):
    stream = StreamV2V(tiny_model_taesd, StreamConfig(steps=1), BankConfig(interval=1), "x")
    frame = video(1, 32, 32)[0]
    sizes = []
    for i in range(300):
        stream.push(frame if i % 2 else 1 - frame)
        sizes.append(stream.bank.nbytes())
    assert stream.bank.frames_absorbed == 301  # every call, priming included
    assert len(set(sizes)) == 1 and sizes[0] > 0
    queue = StreamV2V(
        tiny_model_taesd, StreamConfig(steps=1, strength=0.4), BankConfig("queue", 3, 1), "x"
    )
    sizes = []
    for _ in range(12):
        queue.push(frame)
        sizes.append(queue.bank.nbytes())
    assert sizes[-1] == sizes[2] == 3 * sizes[0] // 2  # priming fills 2, then FIFO of 3 holds


def test_stream_save_load_continues_identically(tiny_model_taesd, tmp_path):
    frames = video(12)
    config, bank = StreamConfig(), BankConfig(interval=2)
    a = StreamV2V(tiny_model_taesd, config, bank, "x")
    for frame in frames[:6]:
        a.push(frame)
    a.save(tmp_path / "stream.safetensors")
    b = StreamV2V(tiny_model_taesd, config, bank, "x")
    b.load(tmp_path / "stream.safetensors")
    for frame in frames[6:]:
        for x, y in zip(a.push(frame), b.push(frame)):
            assert torch.equal(x, y)
    for x, y in zip(a.flush(), b.flush()):
        assert torch.equal(x, y)
    other = StreamV2V(tiny_model_taesd, StreamConfig(steps=2), bank, "x")
    with pytest.raises(StreamV2VError, match="settings"):
        other.load(tmp_path / "stream.safetensors")
    a.bank.save(tmp_path / "bank.safetensors")
    with pytest.raises(StreamV2VError, match="stream state"):
        b.load(tmp_path / "bank.safetensors")


def test_bank_from_other_resolution_or_steps_is_refused(tiny_model_taesd):
    bank = FeatureBank(BankConfig(interval=1))
    list(StreamV2V(tiny_model_taesd, StreamConfig(), bank, "x").process(video(2)))
    with pytest.raises(StreamV2VError, match="resolution"):
        list(StreamV2V(tiny_model_taesd, StreamConfig(), bank, "x").process(video(2, 48, 24)))
    with pytest.raises(StreamV2VError, match="reset"):
        list(StreamV2V(tiny_model_taesd, StreamConfig(steps=2), bank, "x").process(video(2)))
    bank.reset()
    assert (
        len(list(StreamV2V(tiny_model_taesd, StreamConfig(steps=2), bank, "x").process(video(2))))
        == 2
    )


def test_any_frame_size_and_format(tiny_model_taesd):
    stream = StreamV2V(tiny_model_taesd, StreamConfig(steps=1), prompt="x")
    rgba = np.random.default_rng(0).integers(0, 256, (29, 43, 4), dtype=np.uint8)
    grey = rgba[..., 0]
    outs = list(stream.process([rgba, rgba]))
    assert [tuple(o.shape) for o in outs] == [(29, 43, 3)] * 2
    assert all(o.dtype == torch.float32 and o.min() >= 0 and o.max() <= 1 for o in outs)
    outs = list(StreamV2V(tiny_model_taesd, StreamConfig(steps=1), prompt="x").process([grey]))
    assert outs[0].shape == (29, 43, 3)
    sized = StreamV2V(tiny_model_taesd, StreamConfig(steps=1, width=20, height=12), prompt="x")
    assert list(sized.process([grey]))[0].shape == (12, 20, 3)


def test_bad_frames_give_clear_errors(tiny_model_taesd):
    stream = StreamV2V(tiny_model_taesd, StreamConfig(), prompt="x")
    with pytest.raises(StreamV2VError, match="no frames"):
        list(stream.process([]))
    stream.push(video(1)[0])
    with pytest.raises(StreamV2VError, match="frame 1 is 40x24"):
        stream.push(video(1, 40, 24)[0])
    with pytest.raises(StreamV2VError, match="channels"):
        stream.push(torch.rand(24, 32, 2))
    with pytest.raises(StreamV2VError, match="dtype"):
        stream.push(np.zeros((24, 32, 3), dtype=np.int64))
    with pytest.raises(StreamV2VError, match="values up to 255: float frames are 0..1"):
        stream.push(video(1)[0].numpy() * 0 + np.float32(255))
    stream.push(video(1)[0] * 1.02)  # a resize's overshoot is fine


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"steps": 5}, "steps"),
        ({"steps": 4, "t_index_list": (1, 2)}, "either"),
        ({"t_index_list": (30, 20)}, "ascending"),
        ({"t_index_list": (30, 50)}, "0..49"),
        ({"t_index_list": ()}, "entries"),
        ({"strength": 0.0}, "strength"),
        ({"strength": 0.05, "steps": 4}, "too low"),
        ({"guidance": 1.5}, "no effect"),
        ({"cfg_type": "self", "guidance": float("inf")}, "finite"),
        ({"cfg_type": "self"}, "no effect"),
        ({"cfg_type": "full", "guidance": 1.5, "delta": 0.5}, "delta"),
        ({"cfg_type": "other"}, "unknown"),
        ({"seed": -1}, "seed"),
        ({"width": 3}, "width"),
        ({"max_skip": 3}, "similar"),
        ({"similar_filter": 0.9, "max_skip": 0}, "max_skip must be"),
        ({"similar_filter": 1.5}, "within"),
    ],
)
def test_config_rejects_bad_or_ineffective_values(kwargs, match):
    with pytest.raises(StreamV2VError, match=match):
        StreamConfig(**kwargs)


def test_negative_prompt_only_where_it_acts(tiny_model_taesd):
    with pytest.raises(StreamV2VError, match="negative prompt"):
        StreamV2V(tiny_model_taesd, StreamConfig(), prompt="x", negative_prompt="blurry")
    with pytest.raises(StreamV2VError, match="negative prompt"):
        StreamV2V(
            tiny_model_taesd,
            StreamConfig(cfg_type="self", guidance=1.4),
            prompt="x",
            negative_prompt="blurry",
        )


@pytest.mark.parametrize("cfg_type", ["self", "initialize", "full"])
def test_residual_cfg_types_run_and_act(tiny_model_taesd, cfg_type):
    frames = video(5)
    base = torch.stack(
        list(StreamV2V(tiny_model_taesd, StreamConfig(), prompt="x").process(frames))
    )
    negative = "blurry" if cfg_type != "self" else ""
    stream = StreamV2V(
        tiny_model_taesd,
        StreamConfig(cfg_type=cfg_type, guidance=1.8),
        prompt="x",
        negative_prompt=negative,
    )
    assert stream._embeds.shape[0] == {"self": 4, "initialize": 5, "full": 8}[cfg_type]
    out = torch.stack(list(stream.process(frames)))
    assert out.shape == base.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, base)


def residual_cfg_alone(model, frames, prompt, negative, cfg_type, guidance, delta, seed=2):
    """StreamDiffusion's guidance slot by slot, one UNet row at a time, from its description:
    ``self``/``initialize`` guide with a virtual negative noise carried per slot (``initialize``
    replaces slot 0's with a real unconditional prediction), ``full`` with real ones. The
    stream primes with frame 0 repeated and flushes with the last frame repeated."""
    pipe = model.pipe
    schedule = lcm_schedule((30, 35, 40, 45))
    steps = len(schedule)
    h, w = frames[0].shape[:2]
    noise = torch.randn(
        (steps, 1, 4, h // 8, w // 8), generator=torch.Generator().manual_seed(seed)
    )
    cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True, negative)
    buffer = [torch.zeros_like(noise[0]) for _ in range(steps - 1)]
    stock = [torch.zeros_like(noise[0]) for _ in range(steps)]
    calls = [frames[0]] * steps + list(frames) + [frames[-1]] * (steps - 1)
    finished = []
    for frame in calls:
        x = frame.permute(2, 0, 1).unsqueeze(0) * 2 - 1
        z = pipe.vae.encode(x).latents * pipe.vae.config.scaling_factor
        slots = [schedule[0][1] * z + schedule[0][2] * noise[0], *buffer]
        stock = [noise[0], *stock[:-1]]
        if cfg_type == "initialize":  # slot 0's real unconditional prediction
            t0 = torch.tensor([schedule[0][0]])
            stock[0] = pipe.unet(slots[0], t0, encoder_hidden_states=uncond).sample
        x0s, new_stock = [], []
        for k, (t, a, b, c_skip, c_out) in enumerate(schedule):
            eps_text = pipe.unet(slots[k], torch.tensor([t]), encoder_hidden_states=cond).sample
            if cfg_type == "full":
                eps_uncond = pipe.unet(slots[k], torch.tensor([t]), encoder_hidden_states=uncond)
                eps_uncond = eps_uncond.sample
            else:
                eps_uncond = delta * stock[k]
            eps = eps_uncond + guidance * (eps_text - eps_uncond)
            x0s.append(c_out * (slots[k] - b * eps) / a + c_skip * slots[k])
            scaled = b * stock[k]
            virtual = c_out * (scaled - b * eps) / a + c_skip * scaled
            a_next, b_next = (schedule[k + 1][1:3]) if k + 1 < steps else (1.0, 1.0)
            new_stock.append(noise[(k + 1) % steps] + a_next * virtual / b_next)
        if cfg_type != "full":
            stock = new_stock
        buffer = [
            schedule[k + 1][1] * x0s[k] + schedule[k + 1][2] * noise[k + 1]
            for k in range(steps - 1)
        ]
        finished.append(x0s[-1])
    images = []
    for x0 in finished[2 * steps - 1 :]:  # frame i leaves the batch S-1 calls after it entered
        image = pipe.vae.decode(x0 / pipe.vae.config.scaling_factor).sample
        images.append((image / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0))
    return images


@pytest.mark.parametrize("cfg_type,delta", [("self", 0.7), ("initialize", 0.7), ("full", 1.0)])
def test_residual_cfg_equals_streamdiffusion_slot_by_slot(tiny_model_taesd, cfg_type, delta):
    frames = video(5)
    negative = "" if cfg_type == "self" else "blurry"
    config = StreamConfig(cfg_type=cfg_type, guidance=1.8, delta=delta)
    stream = StreamV2V(tiny_model_taesd, config, NONE, "a cat", negative)
    with torch.inference_mode():
        got = list(stream.process(frames))
        want = residual_cfg_alone(tiny_model_taesd, frames, "a cat", negative, cfg_type, 1.8, delta)
    assert len(got) == len(want) == len(frames)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=f"frame {i}")


@pytest.mark.parametrize("steps", [1, 4])
def test_similar_frame_filter_skips_static_frames(tiny_model_taesd, steps):
    still = video(1)[0]
    frames = [still] * 20 + video(3, seed=5)
    config = StreamConfig(steps=steps, similar_filter=0.9, max_skip=4)
    stream = StreamV2V(tiny_model_taesd, config, prompt="x")
    calls = []
    original = stream._step
    stream._step = lambda x, tag: calls.append(tag) or original(x, tag)
    outs = list(stream.process(frames))
    assert len(outs) == len(frames)
    real = [t for t in calls if t is not None]
    assert len(real) < len(frames)  # some frames were skipped
    # never more than max_skip in a row: processed indices are at most 5 apart
    assert max(b - a for a, b in zip(real, real[1:])) <= 5
    for i in range(1, 20):
        if i not in real:
            assert torch.equal(outs[i], outs[i - 1])  # a skipped frame repeats the last output


def test_chunks_with_skipped_frames_continue_one_stream(tiny_model_taesd):
    """A chunk border inside a still stretch: frames the similar-frame filter skipped are still
    owed outputs from the last chunk when the next one starts (``pending``), and only this
    chunk's own frames come back."""
    still = video(1)[0]
    frames = torch.stack([still] * 10 + video(6, seed=5))
    config = StreamConfig(similar_filter=0.9, max_skip=4)
    whole = torch.stack(list(StreamV2V(tiny_model_taesd, config, prompt="x").process(frames)))
    session = Session("chunks")
    chunks, pending = [], []
    for a, b in ((0, 5), (5, 11), (11, 16)):
        chunks.append(session.run(tiny_model_taesd, config, BankConfig(), "x", "", frames[a:b]))
        pending.append(session.stream.pending)
    assert [len(c) for c in chunks] == [5, 6, 5]
    assert pending[0] > 3  # three frames in the batch, and skipped stills waiting on them
    torch.testing.assert_close(chunks[1], whole[5:11])
    torch.testing.assert_close(chunks[2], whole[11:])


def test_downloads_keep_few_chunks_and_return_only_this_runs_frames():
    images = [torch.full((2, 3, 3), float(i)) for i in range(100)]
    downloads = session_module._Downloads(torch.device("cpu"), count=97, skip=3)
    for image in images:
        downloads.add([image])
        assert len(downloads.chunks) <= session_module.CHUNKS_IN_FLIGHT
        assert torch.equal(downloads.latest(), image)  # the newest, for the preview
    out = downloads.finish()
    assert torch.equal(out, torch.stack(images[3:]))  # the earlier run's three left out
    short = session_module._Downloads(torch.device("cpu"), count=5, skip=0)
    short.add(images[:4])
    with pytest.raises(RuntimeError, match="4 frames came back for 5"):
        short.finish()


def test_similar_frame_skip_probability_rises_from_the_threshold_to_one():
    """StreamDiffusion's rule: no skip at or below the threshold, then a chance that grows
    linearly to certainty at identical frames (0.99 with threshold 0.98: half of the time)."""
    from streamv2v.similar import SimilarFrameFilter

    f = SimilarFrameFilter(0.98, 10, torch.Generator().manual_seed(0))
    for similarity, want in ((0.5, 0.0), (0.98, 0.0), (0.985, 0.25), (0.99, 0.5), (1.0, 1.0)):
        assert f.skip_probability(similarity) == pytest.approx(want)
    first = torch.tensor([1.0, 0.0])
    near = torch.tensor([0.99, (1 - 0.99**2) ** 0.5])  # cosine similarity 0.99 with ``first``
    skipped = 0
    for _ in range(400):
        f.previous, f.skipped_in_a_row = first, 0
        skipped += f.should_skip(near)
    assert 0.4 < skipped / 400 < 0.6


def test_downloads_from_a_gpu_other_than_cuda_preview_host_copies_only():
    """On Apple's MPS the images stay on the GPU until copied: a preview, which ComfyUI turns
    into a JPEG on the host, must be one of the copies, never an image still on the GPU."""
    images = [torch.full((2, 3, 3), float(i)) for i in range(40)]  # stand-ins for MPS images
    downloads = session_module._Downloads(torch.device("mps"), count=40, skip=0)
    for image in images:
        downloads.add([image])
        latest = downloads.latest()
        assert latest is None or not any(latest is image for image in images)
    assert torch.equal(downloads.latest(), images[-9])  # the newest sent in a chunk of 16
    assert torch.equal(downloads.finish(), torch.stack(images))
