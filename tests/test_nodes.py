"""The ComfyUI nodes without ComfyUI: contracts, and each node's function on tiny models.

ComfyUI is stood in for by the three modules the nodes import (``folder_paths``,
``comfy.utils``, ``comfy.model_management``), backed by temporary model folders; the pack is
loaded the way ComfyUI loads it (a package under a mangled name, relative imports only).
"""

import gc
import importlib.util
import json
import os
import re
import sys
import types
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PACK = "ComfyUI-StreamV2V"  # ComfyUI registers a pack under its folder name


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def comfy(tmp_path_factory, tiny_diffusers_dir, tiny_lcm_lora, tiny_lora_kohya, tiny_taesd_dir):
    """Stand-in ComfyUI modules over temporary model folders, and the pack loaded into it."""
    models = tmp_path_factory.mktemp("comfy_models")
    folders = {
        kind: models / kind for kind in ("checkpoints", "diffusers", "loras", "vae", "vae_approx")
    }
    for folder in folders.values():
        folder.mkdir()
    (folders["diffusers"] / "tiny-lcm").symlink_to(tiny_diffusers_dir)
    (folders["loras"] / "lcm-lora-tiny.safetensors").symlink_to(tiny_lcm_lora)
    (folders["loras"] / "style.safetensors").symlink_to(tiny_lora_kohya)
    for name in os.listdir(tiny_taesd_dir):
        (folders["vae_approx"] / name).symlink_to(tiny_taesd_dir / name)

    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_folder_paths = lambda kind: [str(folders[kind])]
    folder_paths.get_filename_list = lambda kind: sorted(
        str(p.relative_to(folders[kind])) for p in folders[kind].rglob("*") if p.is_file()
    )

    def get_full_path(kind, name):
        path = folders[kind] / name
        return str(path) if path.is_file() else None

    folder_paths.get_full_path = get_full_path
    temp = tmp_path_factory.mktemp("comfy_temp")
    folder_paths.get_temp_directory = lambda: str(temp)

    progress = []

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            progress.append((value, total, preview is not None))

    # free: what ComfyUI's get_free_memory reports; freed: its free_memory calls, which
    # unload none of its own models here
    state = types.SimpleNamespace(interrupt_after=None, checks=0, free=2**30, freed=[], empties=0)

    def throw_exception_if_processing_interrupted():
        state.checks += 1
        if state.interrupt_after is not None and state.checks > state.interrupt_after:
            raise Interrupted()

    def free_memory(memory_required, device, keep_loaded=()):
        state.freed.append((memory_required, device))
        return []

    def soft_empty_cache():
        state.empties += 1

    comfy_pkg = types.ModuleType("comfy")
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    mm = types.ModuleType("comfy.model_management")
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    mm.free_memory = free_memory
    mm.get_free_memory = lambda device: state.free
    mm.soft_empty_cache = soft_empty_cache
    # as ComfyUI's: a call through the module, so a wrapped free_memory is the one called
    mm.unload_all_models = lambda: mm.free_memory(1e30, mm.get_torch_device())
    comfy_pkg.utils, comfy_pkg.model_management = utils, mm

    with pytest.MonkeyPatch.context() as mp:
        for name, module in {
            "folder_paths": folder_paths,
            "comfy": comfy_pkg,
            "comfy.utils": utils,
            "comfy.model_management": mm,
        }.items():
            mp.setitem(sys.modules, name, module)
        spec = importlib.util.spec_from_file_location(
            PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
        )
        pack = importlib.util.module_from_spec(spec)
        mp.setitem(sys.modules, PACK, pack)
        spec.loader.exec_module(pack)
        yield types.SimpleNamespace(
            pack=pack,
            nodes=pack.NODE_CLASS_MAPPINGS,
            folders=folders,
            progress=progress,
            state=state,
            mm=mm,
            state_module=sys.modules[PACK + ".nodes.state"],
            engine=lambda name: sys.modules[f"{PACK}.streamv2v.{name}"],
        )
        sys.modules[PACK + ".nodes.state"].SESSIONS.clear()
        sys.modules[PACK + ".nodes.state"].MODELS.clear()


def widget_inputs(cls):
    spec = cls.INPUT_TYPES()
    return {**spec.get("required", {}), **spec.get("optional", {})}


def test_node_contracts(comfy):
    assert set(comfy.pack.NODE_DISPLAY_NAME_MAPPINGS) == set(comfy.nodes)
    for key, cls in comfy.nodes.items():
        assert cls.CATEGORY == "StreamV2V", key
        assert cls.DESCRIPTION, key
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS), key
        assert callable(getattr(cls(), cls.FUNCTION)), key
        for name, (kind, *rest) in widget_inputs(cls).items():
            options = rest[0] if rest else {}
            assert options.get("tooltip"), (key, name)
            if isinstance(kind, list):
                assert kind and options.get("default", kind[0]) in kind, (key, name)
            elif kind in ("INT", "FLOAT"):
                assert options["min"] <= options["default"] <= options["max"], (key, name)
            elif kind not in ("STRING", "BOOLEAN"):
                assert kind == "IMAGE" or kind.startswith("STREAMV2V_"), (key, name, kind)
        for kind in cls.RETURN_TYPES:
            assert kind in ("IMAGE", "FLOAT") or kind.startswith("STREAMV2V_"), (key, kind)
    sampler = widget_inputs(comfy.nodes["StreamV2VSampler"])
    assert sampler["seed"][1]["control_after_generate"] is False  # a stream's seed stays fixed


def test_nodes_that_run_every_time_say_so_in_json(comfy):
    """ComfyUI keeps IS_CHANGED's value in the prompt and sends its history as JSON: NaN (the
    usual 'always run') is not JSON, and the frontend's queue then fails to load."""
    for name in ("StreamV2VSampler", "StreamV2VFeatureBank", "StreamV2VFree"):
        first, second = (comfy.nodes[name].IS_CHANGED() for _ in range(2))
        assert first != second, name
        json.dumps([first, second], allow_nan=False)


def test_dropdowns_list_the_model_folders(comfy):
    loader = widget_inputs(comfy.nodes["StreamV2VLoadModel"])
    assert loader["model"][0] == ["diffusers/tiny-lcm"]
    assert loader["lcm_lora"][0] == ["none", "lcm-lora-tiny.safetensors", "style.safetensors"]
    assert loader["vae"][0] == ["taesd", "model's own"]


def load(comfy, **overrides):
    args = dict(
        model="diffusers/tiny-lcm",
        lcm_lora="none",
        lcm_lora_strength=1.0,
        vae="taesd",
        dtype="auto",
    )
    return comfy.nodes["StreamV2VLoadModel"]().load(**{**args, **overrides})[0]


def bank(comfy, **overrides):
    args = dict(kind="dyme", size=1, interval=4, name="test", each_run="continue stream")
    out = comfy.nodes["StreamV2VFeatureBank"]().bank(**{**args, **overrides})
    return out["result"][0], out["ui"]["text"][0]


SAMPLER_DEFAULTS = dict(
    prompt="a cat",
    negative_prompt="",
    steps=4,
    strength=0.4,
    seed=2,
    cfg_type="none",
    guidance=1.0,
    delta=1.0,
    similar_filter=0.0,
    max_skip=10,
    width=0,
    height=0,
)


def sample(comfy, model, bank_handle, images, **overrides):
    out = comfy.nodes["StreamV2VSampler"]().sample(
        model, bank_handle, images, **{**SAMPLER_DEFAULTS, **overrides}
    )
    return out["result"][0], out["ui"]["text"][0]


def video(count, width=32, height=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(count, height, width, 3, generator=g)


def engine_outputs(comfy, model, frames, bank_config=None):
    stream_module = comfy.engine("stream")
    StreamConfig, StreamV2V = stream_module.StreamConfig, stream_module.StreamV2V
    loaded = comfy.state_module.MODELS.get(model.spec)
    stream = StreamV2V(
        loaded, StreamConfig(), bank_config or model.bank_config("dyme", 1, 4), prompt="a cat"
    )
    return stream, torch.stack(list(stream.process(frames)))


def test_loader_loads_once_and_patches_never_mutate(comfy):
    model = load(comfy)
    cache = comfy.state_module.MODELS
    first = cache.get(model.spec)
    assert load(comfy).spec == model.spec and cache.get(model.spec) is first
    patch = comfy.nodes["StreamV2VPatchAttention"]().patch
    patched = patch(model, False, True, 0.5, 0.9)[0]
    assert model.patch.extended_attention and not patched.patch.extended_attention
    assert patched.spec == model.spec
    lora = comfy.nodes["StreamV2VLoadLoRA"]().apply(model, "style.safetensors", 0.7)[0]
    assert model.spec.loras == () and lora.spec.loras[0].weight == 0.7


def test_a_lora_chain_loads_the_model_once_at_its_end(comfy, monkeypatch):
    """The first run of loader -> Load LoRA -> Load LoRA -> sampler loads one model (the
    whole chain), not the base model first; a loader that also feeds another node loads."""
    session = comfy.engine("session")
    loads = []
    real_load = session.ModelSpec.load
    monkeypatch.setattr(
        session.ModelSpec, "load", lambda spec: loads.append(spec) or real_load(spec)
    )
    comfy.state_module.MODELS.clear()
    graph = {
        "1": {"class_type": "StreamV2VLoadModel", "inputs": {"model": "diffusers/tiny-lcm"}},
        "2": {"class_type": "StreamV2VLoadLoRA", "inputs": {"model": ["1", 0]}},
        "3": {"class_type": "StreamV2VLoadLoRA", "inputs": {"model": ["2", 0]}},
        "4": {"class_type": "StreamV2VSampler", "inputs": {"model": ["3", 0], "bank": ["5", 0]}},
    }
    lora = comfy.nodes["StreamV2VLoadLoRA"]()
    base = load(comfy, lcm_lora="lcm-lora-tiny.safetensors", unique_id="1", graph=graph)
    first = lora.apply(base, "style.safetensors", 0.5, unique_id="2", graph=graph)[0]
    assert loads == [] and comfy.state_module.MODELS.loaded is None
    both = lora.apply(first, "style.safetensors", 0.25, unique_id="3", graph=graph)[0]
    assert loads == [both.spec] and len(both.spec.loras) == 2
    handle, _ = bank(comfy, name="chain", each_run="start new stream")
    sample(comfy, both, handle, video(2), unique_id="4", graph=graph)
    assert loads == [both.spec]  # the sampler runs on the model the chain loaded

    graph["6"] = {"class_type": "StreamV2VPatchAttention", "inputs": {"model": ["1", 0]}}
    plain = load(comfy, unique_id="1", graph=graph)
    assert loads[-1] == plain.spec


def test_a_loader_that_skips_the_load_still_names_a_wrong_lcm_lora(comfy):
    from safetensors.torch import save_file

    graph = {"2": {"class_type": "StreamV2VLoadLoRA", "inputs": {"model": ["1", 0]}}}
    save_file({"weight": torch.zeros(2)}, comfy.folders["loras"] / "empty.safetensors")
    try:
        with pytest.raises(comfy.engine("errors").StreamV2VError, match="LCM-LoRA .* no LoRA"):
            load(comfy, lcm_lora="empty.safetensors", unique_id="1", graph=graph)
    finally:
        (comfy.folders["loras"] / "empty.safetensors").unlink()


def test_batch_mode_is_the_engine_aligned_output(comfy):
    model = load(comfy)
    frames = video(20)  # more than one transfer chunk
    handle, _ = bank(comfy, name="batch", each_run="start new stream")
    comfy.progress.clear()
    out, text = sample(comfy, model, handle, frames)
    assert out.shape == (20, 24, 32, 3) and out.dtype == torch.float32 and out.device.type == "cpu"
    _, want = engine_outputs(comfy, model, frames)
    torch.testing.assert_close(out, want)
    assert [p[0] for p in comfy.progress] == list(range(1, 21))
    # A preview once the first output is out (steps - 1 frames in), not once a chunk is back.
    assert [p[2] for p in comfy.progress[:5]] == [False, False, False, True, False]
    updates = comfy.state_module.SESSIONS.get("batch").bank.frames_absorbed
    assert f"(dyme): {updates} updates" in text and "stream: 20 frames in" in text
    assert "behind" not in text  # a batch comes out in step
    again, _ = sample(comfy, model, handle, frames)  # start new stream: the same result again
    torch.testing.assert_close(again, out)


def test_chunks_continue_one_stream_without_a_seam(comfy):
    model = load(comfy)
    frames = video(8)
    handle, _ = bank(comfy, name="chunks")
    first, _ = sample(comfy, model, handle, frames[:4])
    second, _ = sample(comfy, model, handle, frames[4:])
    _, whole = engine_outputs(comfy, model, frames)
    torch.testing.assert_close(second, whole[4:])  # the second chunk is exactly the whole run's
    torch.testing.assert_close(first[:1], whole[:1])  # frames 1-3 were finished early, then
    assert first.shape == (4, 24, 32, 3)  # recomputed with real successors for the next chunk


def test_a_last_chunk_of_one_frame_comes_out_in_step(comfy):
    model = load(comfy)
    frames = video(9)
    handle, _ = bank(comfy, name="last-chunk")
    chunks = [sample(comfy, model, handle, frames[a:b])[0] for a, b in ((0, 4), (4, 8), (8, 9))]
    _, whole = engine_outputs(comfy, model, frames)
    torch.testing.assert_close(chunks[1], whole[4:8])
    torch.testing.assert_close(chunks[2], whole[8:])  # not a live frame lagging 3 behind


def test_webcam_mode_carries_the_bank_across_runs(comfy):
    model = load(comfy)
    frames = video(6)
    handle, text = bank(comfy, name="webcam")
    assert "empty" in text
    stream, _ = engine_outputs(comfy, model, frames[:1])
    live = type(stream)(stream.model, stream.config, model.bank_config("dyme", 1, 4), "a cat")
    absorbed = []
    for i in range(6):
        out, _ = sample(comfy, model, handle, frames[i : i + 1])
        assert out.shape == (1, 24, 32, 3)
        ready = live.push(frames[i])
        if i >= 3:  # the stream is full: the output lags steps - 1 = 3 runs
            torch.testing.assert_close(out[0], ready[0])
        absorbed.append(comfy.state_module.SESSIONS.get("webcam").bank.frames_absorbed)
    assert absorbed == sorted(absorbed) and absorbed[-1] > absorbed[0]
    text = bank(comfy, name="webcam")[1]
    assert f"(dyme): {absorbed[-1]} updates" in text
    assert text.endswith("stream: 6 frames in, output 3 frames behind")


def test_interrupt_stops_within_a_frame_and_keeps_the_bank(comfy):
    model = load(comfy)
    frames = video(8)
    handle, _ = bank(comfy, name="interrupt")
    sample(comfy, model, handle, frames[:4])
    session = comfy.state_module.SESSIONS.get("interrupt")
    before = session.stats()
    comfy.state.checks, comfy.state.interrupt_after = 0, 2
    with pytest.raises(Interrupted):
        sample(comfy, model, handle, frames[4:])
    assert comfy.state.checks == 3  # stopped at the third frame's check
    comfy.state.interrupt_after = None
    assert session.stats() == before
    resumed, _ = sample(comfy, model, handle, frames[4:])
    _, whole = engine_outputs(comfy, model, frames)
    torch.testing.assert_close(resumed, whole[4:])  # as if the interrupted run never happened


def test_an_interrupted_run_after_a_release_keeps_the_bank_as_it_was(comfy):
    """Released, the stream is gone but its bank is kept: the run that makes the new stream
    refills that bank, and an interrupt puts it back."""
    model = load(comfy)
    handle, _ = bank(comfy, name="released-interrupt")
    sample(comfy, model, handle, video(4))
    session = comfy.state_module.SESSIONS.get("released-interrupt")
    comfy.state_module.release_models()
    before = session.stats()
    keys = {name: e.keys.clone() for name, e in session.bank.layers.items()}
    comfy.state.checks, comfy.state.interrupt_after = 0, 2
    with pytest.raises(Interrupted):
        sample(comfy, model, handle, video(6, seed=1))
    comfy.state.interrupt_after = None
    assert session.stats() == before
    assert all(torch.equal(session.bank.layers[name].keys, k) for name, k in keys.items())


def test_bad_inputs_name_themselves(comfy):
    StreamV2VError = comfy.engine("errors").StreamV2VError

    model = load(comfy)
    handle, _ = bank(comfy, name="errors")
    sample(comfy, model, handle, video(2))
    with pytest.raises(StreamV2VError, match="no frames"):
        sample(comfy, model, handle, video(0))
    with pytest.raises(StreamV2VError, match="no effect with cfg type 'none'"):
        sample(comfy, model, handle, video(1), guidance=2.0)
    with pytest.raises(StreamV2VError, match="dyme"):
        bank(comfy, size=3)
    with pytest.raises(StreamV2VError, match="bank name is empty"):
        bank(comfy, name="  ")
    with pytest.raises(StreamV2VError, match="no effect without an LCM-LoRA"):
        load(comfy, lcm_lora_strength=0.5)
    with pytest.raises(StreamV2VError, match="feature fusion off"):
        comfy.nodes["StreamV2VPatchAttention"]().patch(model, True, False, 0.5, 0.98)
    with pytest.raises(StreamV2VError, match="kind 'none'"):
        patched = comfy.nodes["StreamV2VPatchAttention"]().patch(model, False, True, 0.8, 0.98)
        sample(comfy, patched[0], bank(comfy, kind="none", name="x")[0], video(1))


def test_a_bank_of_another_shape_or_model_is_replaced_with_a_note(comfy):
    model = load(comfy)
    handle, _ = bank(comfy, name="shared")
    session = comfy.state_module.SESSIONS.get("shared")
    fresh = {}

    def alone(name, images, model=model, **settings):
        if name not in fresh:
            fresh[name] = sample(comfy, model, bank(comfy, name=name)[0], images, **settings)[0]
        return fresh[name]

    sample(comfy, model, handle, video(3))
    out, text = sample(comfy, model, handle, video(3), steps=2)
    assert "the step count or CFG type changed: started a new bank" in text
    torch.testing.assert_close(out, alone("steps2", video(3), steps=2))

    out, text = sample(comfy, model, handle, video(3, width=40), steps=2)
    assert "the frame size (32x24 to 40x24) changed: started a new bank" in text
    torch.testing.assert_close(out, alone("wide", video(3, width=40), steps=2))

    styled = comfy.nodes["StreamV2VLoadLoRA"]().apply(model, "style.safetensors", 1.0)[0]
    out, text = sample(comfy, styled, handle, video(3, width=40), steps=2)
    assert "the model changed: started a new bank" in text
    torch.testing.assert_close(out, alone("styled", video(3, width=40), styled, steps=2))

    before = session.stats()
    out, text = sample(comfy, styled, handle, video(3, width=40), steps=2, seed=5)
    assert "settings changed: new stream, bank kept" in text  # the seed: same tokens' shape
    assert session.stats()["frames_absorbed"] > before["frames_absorbed"]

    _, text = sample(comfy, model, handle, video(3), steps=3)
    assert "the model and the frame size (40x24 to 32x24) and the step count or CFG type " in text


def test_a_width_alone_keeps_the_aspect_ratio(comfy):
    model = load(comfy)
    handle, _ = bank(comfy, name="aspect", each_run="start new stream")
    assert sample(comfy, model, handle, video(2), width=64)[0].shape == (2, 48, 64, 3)
    assert sample(comfy, model, handle, video(2), height=12)[0].shape == (2, 12, 16, 3)


def test_two_samplers_on_one_bank_name_are_refused(comfy):
    StreamV2VError = comfy.engine("errors").StreamV2VError
    sharing = sys.modules[PACK + ".nodes.sampler"].samplers_sharing

    def graph(*names):
        nodes = {}
        for i, name in enumerate(names):
            nodes[f"b{i}"] = {"class_type": "StreamV2VFeatureBank", "inputs": {"name": name}}
            nodes[f"s{i}"] = {"class_type": "StreamV2VSampler", "inputs": {"bank": [f"b{i}", 0]}}
        return nodes

    assert sharing(graph("a", "b"), "s0", "a") == []
    assert sharing(graph("a", " a"), "s0", "a") == ["s1"]
    one_bank = graph("a")
    one_bank["s1"] = {"class_type": "StreamV2VSampler", "inputs": {"bank": ["b0", 0]}}
    assert sharing(one_bank, "s1", "a") == ["s0"]
    assert sharing(None, "s0", "a") == []
    linked = graph(["str", 0], ["str", 0])  # one String node names both banks
    assert sharing(linked, "s0", "linked") == ["s1"]
    linked["s1"]["inputs"]["bank"] = ["b0", 0]  # one bank node with a linked name, two samplers
    assert sharing(linked, "s0", "linked") == ["s1"]
    assert sharing(graph(["str", 0], ["str", 1]), "s0", "linked") == []  # two outputs

    model = load(comfy)
    handle, _ = bank(comfy, name="a")
    with pytest.raises(StreamV2VError, match=r"node s0\) and node s1 both use bank 'a'"):
        sample(comfy, model, handle, video(1), unique_id="s0", graph=graph("a", "a"))
    assert comfy.state_module.SESSIONS.get("a").bank is None  # refused before it ran


def test_two_samplers_on_one_computed_bank_name_are_refused_when_the_second_runs(
    comfy, monkeypatch
):
    """A name that other nodes compute (two String nodes with one text) is not in the queued
    workflow for the sampler to read: the second sampler to run that bank in the same queued
    run is refused then."""
    StreamV2VError = comfy.engine("errors").StreamV2VError
    running = types.SimpleNamespace(prompt_id="p1")
    utils = types.ModuleType("comfy_execution.utils")
    utils.get_executing_context = lambda: running
    monkeypatch.setitem(sys.modules, "comfy_execution", types.ModuleType("comfy_execution"))
    monkeypatch.setitem(sys.modules, "comfy_execution.utils", utils)
    graph = {
        "t0": {"class_type": "PrimitiveString", "inputs": {"value": "linked"}},
        "t1": {"class_type": "PrimitiveString", "inputs": {"value": "linked"}},
        "b0": {"class_type": "StreamV2VFeatureBank", "inputs": {"name": ["t0", 0]}},
        "b1": {"class_type": "StreamV2VFeatureBank", "inputs": {"name": ["t1", 0]}},
        "s0": {"class_type": "StreamV2VSampler", "inputs": {"bank": ["b0", 0]}},
        "s1": {"class_type": "StreamV2VSampler", "inputs": {"bank": ["b1", 0]}},
    }
    model = load(comfy)
    handle, _ = bank(comfy, name="linked")
    sample(comfy, model, handle, video(1), unique_id="s0", graph=graph)
    session = comfy.state_module.SESSIONS.get("linked")
    held = session.stats()
    with pytest.raises(StreamV2VError, match=r"node s1\) and node s0 both use bank 'linked'"):
        sample(comfy, model, handle, video(1), unique_id="s1", graph=graph)
    assert session.stats() == held  # refused before it ran
    # The next queued run: the same sampler, or another one alone, runs the bank again.
    running.prompt_id = "p2"
    sample(comfy, model, handle, video(1), unique_id="s0", graph=graph)
    running.prompt_id = "p3"
    sample(comfy, model, handle, video(1), unique_id="s1")
    assert session.stats()["frames_in"] == 3


def test_reset_during_a_run_waits_for_it_and_release_restarts_the_stream(comfy, monkeypatch):
    model = load(comfy)
    handle, _ = bank(comfy, name="busy")
    sessions = comfy.state_module.SESSIONS
    sample(comfy, model, handle, video(4))
    replies = []
    Progress = sys.modules[PACK + ".nodes.comfy"].Progress
    monkeypatch.setattr(
        Progress, "__call__", lambda self, *a: replies.append(sessions.reset("busy"))
    )
    out, text = sample(comfy, model, handle, video(4, seed=1))
    assert replies == [False] * 4  # asked during the run: done when it ended
    assert out.shape == (4, 24, 32, 3) and "empty (fills on the next run)" in text
    monkeypatch.undo()
    assert sessions.reset("busy") is True and sessions.reset("no such bank") is None

    sample(comfy, model, handle, video(4))
    comfy.state_module.release_models()
    out, text = sample(comfy, model, handle, video(4, seed=1))
    assert "the model was released: new stream, bank kept" in text


def test_bank_status_reads_as_a_sentence(comfy):
    model = load(comfy)
    _, text = bank(comfy, name="status", kind="none")
    assert text == "bank 'status': kind none, no bank (plain StreamDiffusion)"
    handle, _ = bank(comfy, name="status")
    _, text = sample(comfy, model, handle, video(1))
    updates = comfy.state_module.SESSIONS.get("status").bank.frames_absorbed
    assert text.startswith(f"bank 'status' (dyme): {updates} updates, 16 layers x 12 tokens, ")
    assert "; stream: 1 frame in;" in text  # still filling: the frame was finished, not behind
    describe = sys.modules[PACK + ".nodes.bank"].describe
    assert describe("never-used") == "bank 'never-used': empty (fills on the next run)"
    assert "never-used" not in comfy.state_module.SESSIONS.names()  # looking makes no bank


def test_missing_models_say_where_to_put_them(comfy, monkeypatch):
    StreamV2VError = comfy.engine("errors").StreamV2VError

    fp = sys.modules["folder_paths"]
    monkeypatch.setattr(fp, "get_filename_list", lambda kind: [])
    monkeypatch.setattr(fp, "get_folder_paths", lambda kind: [f"/nowhere/{kind}"])
    loader = widget_inputs(comfy.nodes["StreamV2VLoadModel"])
    assert loader["model"][0] == ["no models found"]
    assert loader["vae"][0] == ["taesd", "model's own"]  # taesd stays, to say what it needs
    with pytest.raises(StreamV2VError, match="/nowhere/checkpoints"):
        load(comfy, model="no models found")
    with pytest.raises(StreamV2VError, match="taesd_encoder and taesd_decoder.*/nowhere/vae_app"):
        sys.modules[PACK + ".nodes.comfy"].resolve_vae("taesd")
    lora_node = comfy.nodes["StreamV2VLoadLoRA"]
    assert widget_inputs(lora_node)["lora_name"][0] == ["no LoRAs found"]
    with pytest.raises(StreamV2VError, match="no LoRAs found: put an SD1.5 LoRA in /nowhere/loras"):
        lora_node().apply(None, "no LoRAs found", 1.0)


def test_a_file_that_is_no_lora_is_named_on_the_load_lora_node(comfy, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    StreamV2VError = comfy.engine("errors").StreamV2VError
    save_file({"weight": torch.zeros(2)}, comfy.folders["loras"] / "not-a-lora.safetensors")
    model = load(comfy)
    with pytest.raises(StreamV2VError, match="not-a-lora.safetensors' holds no LoRA weights"):
        comfy.nodes["StreamV2VLoadLoRA"]().apply(model, "not-a-lora.safetensors", 1.0)
    (comfy.folders["loras"] / "not-a-lora.safetensors").unlink()


def test_out_of_memory_becomes_a_clear_message(comfy, monkeypatch):
    StreamV2VError = comfy.engine("errors").StreamV2VError
    StreamV2V = comfy.engine("stream").StreamV2V

    model = load(comfy)
    handle, _ = bank(comfy, name="oom")

    def too_big(self, x, tag):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(StreamV2V, "_step", too_big)
    with pytest.raises(StreamV2VError, match="32x24 frames .* do not fit in GPU memory"):
        sample(comfy, model, handle, video(2))


def test_loading_another_model_lets_go_of_the_old_one_first(comfy):
    """The streams hold the model they run; before other weights load (a LoRA added, another
    VAE) they let go of it, so two models never sit in memory together."""
    model = load(comfy)
    handle, _ = bank(comfy, name="old-model")
    sample(comfy, model, handle, video(2))
    old = weakref.ref(comfy.state_module.MODELS.get(model.spec))
    loads = []
    spec_type = comfy.engine("session").ModelSpec
    original = spec_type.load

    def load_spec(spec):
        gc.collect()
        loads.append(old() is None)  # gone before the new weights load
        return original(spec)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(spec_type, "load", load_spec)
        load(comfy, dtype="fp32")
    assert loads == [True]
    _, text = sample(comfy, model, handle, video(2))  # that stream reloads its model
    assert "the model was released: new stream, bank kept" in text


@pytest.fixture
def running(comfy, monkeypatch) -> list[dict]:
    """The prompts ComfyUI is running, as its queue gives them (none between prompts)."""
    prompts: list[dict] = []
    queue = types.SimpleNamespace(
        get_current_queue_volatile=lambda: ([(0, "id", p, {}, []) for p in prompts], [])
    )
    server = types.ModuleType("server")
    server.PromptServer = types.SimpleNamespace(instance=types.SimpleNamespace(prompt_queue=queue))
    monkeypatch.setitem(sys.modules, "server", server)
    comfy.state.freed.clear()
    comfy.state.empties = 0
    comfy.pack.nodes.hook_free_memory()
    comfy.pack.nodes.hook_free_memory()  # once: a second call does not wrap it twice
    return prompts


def test_free_releases_the_model_through_comfyui_unload(comfy, running):
    model = load(comfy)
    cache = comfy.state_module.MODELS
    assert cache.loaded == model.spec
    comfy.mm.unload_all_models()
    assert cache.loaded is None and comfy.state.freed == [(1e30, torch.device("cpu"))]
    assert comfy.state.empties == 1
    out = comfy.nodes["StreamV2VFree"]().free(video(1))
    assert out["ui"]["text"] == ["no StreamV2V model was loaded"]
    handle, _ = bank(comfy, name="after-free")
    assert sample(comfy, model, handle, video(2))[0].shape == (2, 24, 32, 3)  # reloads
    assert comfy.nodes["StreamV2VFree"]().free(video(1))["ui"]["text"] == [
        "released the StreamV2V model"
    ]


def test_comfyui_short_of_memory_releases_the_model_unless_streamv2v_is_running(comfy, running):
    model = load(comfy)
    handle, _ = bank(comfy, name="room")
    sample(comfy, model, handle, video(2))
    cache, sessions = comfy.state_module.MODELS, comfy.state_module.SESSIONS
    cpu = torch.device("cpu")

    comfy.mm.free_memory(2**20, cpu)  # ComfyUI has the room: ours stays
    assert cache.loaded == model.spec
    comfy.mm.free_memory(2**40, torch.device("cuda:0"))  # another device's room
    assert cache.loaded == model.spec
    running.append({"1": {"class_type": "StreamV2VSampler", "inputs": {}}})
    comfy.mm.free_memory(2**40, cpu)  # short, in a StreamV2V prompt: reloading every run
    assert cache.loaded == model.spec  # would cost more than ComfyUI's low-VRAM loading
    running[:] = [{"1": {"class_type": "KSampler", "inputs": {}}}]
    comfy.mm.free_memory(2**40, cpu)  # short, in another workflow: ours goes, the bank stays
    assert cache.loaded is None and comfy.state.empties == 1
    assert sessions.find("room").bank.frames_absorbed > 0
    assert len(comfy.state.freed) == 4  # ComfyUI's own unloading ran every time

    running.clear()
    out = sample(comfy, model, handle, video(2))  # the next StreamV2V run loads it again
    assert out[0].shape == (2, 24, 32, 3) and cache.loaded == model.spec
    assert "the model was released: new stream, bank kept" in out[1]


def test_temporal_consistency_measures_flicker_and_plots_it(comfy):
    from PIL import Image

    g = torch.Generator().manual_seed(3)
    base = torch.rand(40, 64, 3, generator=g)
    frames = torch.stack([torch.roll(base, shifts=2 * i, dims=1) for i in range(6)])
    flicker = (frames + 0.15 * (torch.arange(6) % 2).view(6, 1, 1, 1)).clamp(0, 1)
    node = comfy.nodes["StreamV2VTemporalConsistency"]()
    steady = node.measure(frames, frames, "dis")
    flickering = node.measure(frames, flicker, "dis")
    assert steady["result"][0] < 2.0 < 10.0 < flickering["result"][0]
    assert flickering["result"][1] > steady["result"][1] > 0
    image = steady["ui"]["images"][0]
    assert image["type"] == "temp" and image["filename"].endswith(".png")
    plot = Image.open(Path(sys.modules["folder_paths"].get_temp_directory()) / image["filename"])
    assert plot.size == (480, 160)
    assert "warp error" in steady["ui"]["text"][0] and "DIS" in steady["ui"]["text"][0]

    larger = torch.nn.functional.interpolate(frames.movedim(-1, 1), size=(80, 128))
    scaled = node.measure(frames, larger.movedim(1, -1).clamp(0, 1), "dis")
    assert scaled["result"][0] < 2.0
    assert scaled["ui"]["text"][0].endswith("inputs resized from 64x40 to 128x80")


def test_temporal_consistency_names_what_does_not_fit(comfy):
    StreamV2VError = comfy.engine("errors").StreamV2VError
    node = comfy.nodes["StreamV2VTemporalConsistency"]()
    frames = video(4)
    with pytest.raises(StreamV2VError, match="input_images has 4 frames and output_images 3"):
        node.measure(frames, frames[:3], "dis")
    with pytest.raises(StreamV2VError, match="at least 2 frames"):
        node.measure(frames[:1], frames[:1], "dis")
    tiny = video(3, width=7, height=5)
    with pytest.raises(StreamV2VError, match="as small as 7x5: use flow 'farneback'"):
        node.measure(tiny, tiny, "dis")


def test_the_preview_is_the_frame_in_8_bits(comfy, monkeypatch):
    shown = []

    class ProgressBar:
        def __init__(self, total):
            pass

        def update_absolute(self, value, total=None, preview=None):
            shown.append(preview)

    monkeypatch.setattr(sys.modules["comfy.utils"], "ProgressBar", ProgressBar)
    image = torch.tensor([[[-0.2, 0.0, 0.25], [0.6, 0.999, 1.4]]])  # outside 0..1 too
    sys.modules[PACK + ".nodes.comfy"].Progress(1)(1, 1, image)
    kind, picture, size = shown[0]
    assert (kind, size) == ("JPEG", 512)
    assert np.asarray(picture).tolist() == [[[0, 0, 64], [153, 255, 255]]]


def test_live_recordings_get_new_names_in_comfyuis_output_folder(comfy, tmp_path, monkeypatch):
    live = sys.modules[PACK + ".nodes.live"]
    output = tmp_path / "output"
    monkeypatch.setattr(
        sys.modules["folder_paths"], "get_output_directory", lambda: str(output), raising=False
    )
    folder = sys.modules[PACK + ".nodes.comfy"].recordings_folder()
    assert folder == output / "streamv2v"
    monkeypatch.setattr(live.time, "strftime", lambda pattern: "20261123-153000")
    first = live.recording_path("my bank/../x", folder)
    assert first == folder / "live-my_bank_.._x-20261123-153000.mp4"
    assert live.recording_path("my bank/../x", folder).name.endswith("153000-2.mp4")
    folder.mkdir(parents=True)
    (folder / "live-b-20261123-153000.mp4").touch()  # from an earlier ComfyUI
    assert live.recording_path("b", folder).name == "live-b-20261123-153000-2.mp4"


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ('{"type": "record", "on": true}', True),
        ('{"type": "record", "on": false}', False),
        ("record", 'the live connection takes camera frames and {"type": "record", "on": true'),
        ('{"type": "stop"}', "the live connection takes camera frames"),
        ('{"type": "record", "on": "yes"}', 'a record message needs "on": true or false'),
    ],
)
def test_a_live_pages_record_message_is_checked(comfy, text, said):
    live = sys.modules[PACK + ".nodes.live"]
    if isinstance(said, bool):
        assert live.record_request(text) is said
    else:
        with pytest.raises(comfy.engine("errors").StreamV2VError, match=re.escape(said)):
            live.record_request(text)
