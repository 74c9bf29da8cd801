"""The pack inside a real ComfyUI: loading, the example workflows, live runs, interrupt, unload.

Needs a ComfyUI checkout (``COMFYUI_PATH``) and a Python with its requirements
(``COMFYUI_PYTHON``, default: this interpreter); skipped without them. One server runs for
the whole module, on the CPU, with the pack symlinked into a private ``custom_nodes/`` and
tiny random models in private model folders (an LCM-style diffusers folder, a LoRA standing in
for the LCM-LoRA, and TAESD files), so nothing is downloaded.

    COMFYUI_PATH=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/its/python \\
        python -m pytest tests/test_comfyui.py -m comfyui
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

pytestmark = pytest.mark.comfyui


from comfy_server import (  # noqa: E402
    PACK_FOLDER,
    ComfyServer,
    RunResult,
    comfyui_from_env,
    import_failures,
    input_spec,
    nodes_of_type,
    packs_under_test,
    set_inputs,
    ui_to_api,
)
from PIL import Image  # noqa: E402
from videos import frame_pattern, make_video, probe  # noqa: E402

COMFYUI_PATH, COMFYUI_PYTHON = comfyui_from_env()

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_DIR = ROOT / "example_workflows"
# What ComfyUI imports at startup (its requirements.txt), checked in COMFYUI_PYTHON.
COMFYUI_MODULES = (
    "torch", "torchsde", "einops", "transformers", "safetensors", "aiohttp", "yarl", "yaml",
    "PIL", "scipy", "tqdm", "psutil", "av", "alembic", "sqlalchemy", "comfyui_frontend_package",
)  # fmt: skip
TINY = {
    "model": "diffusers/tiny-sd15",
    "lcm_lora": "lcm-lora-tiny.safetensors",
    "vae": "taesd",
}
WIDTH, HEIGHT = 64, 48
ANSWERS = ("ready", "size", "error")  # the live connection's first message and its answers

# The node interface (node spec, issue 3): input names in order, outputs.
SPEC = {
    "StreamV2VLoadModel": (
        ["model", "lcm_lora", "lcm_lora_strength", "vae", "dtype"],
        ["STREAMV2V_MODEL"],
    ),
    "StreamV2VLoadLoRA": (["model", "lora_name", "strength"], ["STREAMV2V_MODEL"]),
    "StreamV2VPatchAttention": (
        ["model", "extended_attention", "feature_fusion", "fusion_strength", "fusion_threshold"],
        ["STREAMV2V_MODEL"],
    ),
    "StreamV2VFeatureBank": (
        ["kind", "size", "interval", "name", "each_run"],
        ["STREAMV2V_BANK"],
    ),
    "StreamV2VSampler": (
        [
            "model",
            "bank",
            "images",
            "prompt",
            "negative_prompt",
            "steps",
            "strength",
            "seed",
            "cfg_type",
            "guidance",
            "delta",
            "similar_filter",
            "max_skip",
            "width",
            "height",
            "acceleration",
        ],
        ["IMAGE"],
    ),  # fmt: skip
}


# Defaults and ranges the node spec promises (a subset of each input's options).
SPEC_OPTIONS = {
    ("StreamV2VLoadModel", "lcm_lora_strength"): {
        "default": 1.0, "min": -2.0, "max": 2.0, "step": 0.05,
    },
    ("StreamV2VLoadLoRA", "strength"): {"default": 1.0},
    ("StreamV2VPatchAttention", "extended_attention"): {"default": True},
    ("StreamV2VPatchAttention", "feature_fusion"): {"default": True},
    ("StreamV2VPatchAttention", "fusion_strength"): {"default": 0.8, "min": 0.0, "max": 1.0},
    ("StreamV2VPatchAttention", "fusion_threshold"): {"default": 0.98, "min": -1.0, "max": 1.0},
    ("StreamV2VFeatureBank", "size"): {"default": 1, "min": 1, "max": 16},
    ("StreamV2VFeatureBank", "interval"): {"default": 4, "min": 1, "max": 64},
    ("StreamV2VFeatureBank", "name"): {"default": "bank"},
    ("StreamV2VSampler", "prompt"): {"multiline": True},
    ("StreamV2VSampler", "negative_prompt"): {"multiline": True, "default": ""},
    ("StreamV2VSampler", "steps"): {"default": 4, "min": 1, "max": 4},
    ("StreamV2VSampler", "strength"): {"default": 0.4, "min": 0.02, "max": 1.0, "step": 0.01},
    ("StreamV2VSampler", "seed"): {"default": 2, "control_after_generate": False},
    ("StreamV2VSampler", "guidance"): {"default": 1.0, "min": 1.0, "max": 20.0, "step": 0.1},
    ("StreamV2VSampler", "delta"): {"default": 1.0, "min": 0.0, "max": 5.0},
    ("StreamV2VSampler", "similar_filter"): {"default": 0.0, "min": 0.0, "max": 0.999},
    ("StreamV2VSampler", "max_skip"): {"default": 10, "min": 1, "max": 100},
    ("StreamV2VSampler", "width"): {"default": 0, "min": 0, "max": 4096, "step": 8},
    ("StreamV2VSampler", "height"): {"default": 0, "min": 0, "max": 4096, "step": 8},
    ("StreamV2VSampler", "acceleration"): {"default": "compile"},
}  # fmt: skip
# Combos the node spec fixes (model-file combos depend on the folders: checked in the test).
SPEC_CHOICES = {
    ("StreamV2VLoadModel", "dtype"): ["auto", "fp16", "bf16", "fp32"],
    ("StreamV2VFeatureBank", "kind"): ["dyme", "queue", "none"],
    ("StreamV2VFeatureBank", "each_run"): ["continue stream", "start new stream"],
    ("StreamV2VSampler", "cfg_type"): ["none", "self", "initialize", "full"],
    ("StreamV2VSampler", "acceleration"): ["compile", "graphs", "off"],
}


def comfyui_missing() -> str | None:
    """Why this machine cannot run ComfyUI, or None."""
    if not (Path(COMFYUI_PATH) / "main.py").is_file():
        return f"COMFYUI_PATH={COMFYUI_PATH} has no main.py"
    try:
        check = subprocess.run(
            [COMFYUI_PYTHON, "-c", "import " + ", ".join(COMFYUI_MODULES)],
            capture_output=True,
            text=True,
            timeout=300,
        )
    except OSError as error:
        return f"COMFYUI_PYTHON={COMFYUI_PYTHON} does not run: {error}"
    if check.returncode != 0:
        last = (check.stderr.strip().splitlines() or ["?"])[-1]
        return f"{COMFYUI_PYTHON} lacks ComfyUI's requirements ({last})"
    return None


@pytest.fixture(scope="module")
def comfyui_python() -> str:
    """COMFYUI_PYTHON, once it is known to run ComfyUI (checked before building models)."""
    reason = comfyui_missing()
    if reason:
        pytest.skip(reason)
    return COMFYUI_PYTHON


@pytest.fixture(scope="module")
def server(comfyui_python: str, comfy_models_dir: Path):
    srv = ComfyServer(
        COMFYUI_PATH,
        packs_under_test(PACK_FOLDER, ROOT),
        python=comfyui_python,
        models_dir=comfy_models_dir,
    )
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def object_info(server: ComfyServer) -> dict[str, Any]:
    return server.object_info()


def workflow(name: str) -> dict[str, Any]:
    return json.loads((WORKFLOW_DIR / name).read_text(encoding="utf-8"))


def api_prompt(name: str, object_info: dict[str, Any], bank: str) -> dict[str, dict]:
    """The workflow as the frontend would queue it, on the tiny models and a private bank."""
    prompt = ui_to_api(workflow(name), object_info)
    set_inputs(prompt, "StreamV2VLoadModel", **TINY)
    set_inputs(prompt, "StreamV2VFeatureBank", name=bank)
    return prompt


def png(index: int, width: int = WIDTH, height: int = HEIGHT) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame_pattern(index, width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def upload_video(server: ComfyServer, tmp_path: Path, name: str, **options: Any) -> str:
    path = make_video(tmp_path / name, **options)
    return server.upload(path.read_bytes(), name)


def bank_stats(server: ComfyServer, name: str) -> dict[str, Any]:
    return server.get("/streamv2v/banks").get(name, {})


def succeeded(result: RunResult, server: ComfyServer) -> None:
    assert result.status == "success", result.error_text() or server.log()[-3000:]


def the(prompt: dict[str, dict], class_type: str) -> str:
    (node_id,) = nodes_of_type(prompt, class_type)
    return node_id


# -- (a) loading -------------------------------------------------------------------------------


def test_pack_loads_with_its_nodes(server: ComfyServer, object_info: dict[str, Any]) -> None:
    log = server.log()
    assert not [p for p in import_failures(log) if PACK_FOLDER in p], log[-4000:]
    assert f"custom_nodes/{PACK_FOLDER}" in log  # listed in "Import times for custom nodes"
    for node, (inputs, outputs) in SPEC.items():
        info = object_info[node]
        assert [name for name, _, _ in input_spec(info)] == inputs, node
        assert list(info["output"]) == outputs, node
        assert info["category"] == "StreamV2V"
        assert info["display_name"].endswith("(StreamV2V)")
    assert object_info["StreamV2VFree"]["output_node"]

    specs = {
        (node, name): (kind, options)
        for node in SPEC
        for name, kind, options in input_spec(object_info[node])
    }
    for key, expected in SPEC_OPTIONS.items():
        options = specs[key][1]
        assert {k: options.get(k) for k in expected} == expected, key
    for key, choices in SPEC_CHOICES.items():
        assert specs[key][0] == choices, key
    # The model combos list what is in the model folders, in the spec's forms.
    assert TINY["model"] in specs["StreamV2VLoadModel", "model"][0]
    assert specs["StreamV2VLoadModel", "lcm_lora"][0] == ["none", TINY["lcm_lora"]]
    assert specs["StreamV2VLoadModel", "vae"][0] == ["taesd", "model's own"]
    assert specs["StreamV2VLoadLoRA", "lora_name"][0] == [TINY["lcm_lora"]]


def test_example_workflows_are_served_as_templates(server: ComfyServer) -> None:
    listed = server.get("/api/workflow_templates").get(PACK_FOLDER, [])
    assert sorted(listed) == sorted(p.stem for p in WORKFLOW_DIR.glob("*.json"))
    served = server.get(f"/api/workflow_templates/{PACK_FOLDER}/streamv2v_video.json")
    assert served == workflow("streamv2v_video.json")
    for name in listed:  # the template browser's card shows the workflow's .jpg beside it
        status, body = server.request("GET", f"/api/workflow_templates/{PACK_FOLDER}/{name}.jpg")
        assert status == 200 and Image.open(io.BytesIO(body)).format == "JPEG", name


# -- (b) every example workflow queues and runs ------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.name for p in WORKFLOW_DIR.glob("*.json")))
def test_example_workflow_runs(
    name: str, server: ComfyServer, object_info: dict[str, Any], tmp_path: Path
) -> None:
    if name.endswith("_vhs.json") and "VHS_LoadVideo" not in object_info:
        pytest.skip("ComfyUI-VideoHelperSuite is not installed")
    prompt = api_prompt(name, object_info, bank=f"test-{name}")
    for node in nodes_of_type(prompt, "LoadVideo"):
        prompt[node]["inputs"]["file"] = upload_video(server, tmp_path, "b.mp4", frames=4)
    for node in nodes_of_type(prompt, "VHS_LoadVideo"):
        prompt[node]["inputs"]["video"] = upload_video(server, tmp_path, "b.mp4", frames=4)
    for node in nodes_of_type(prompt, "LoadImage"):
        prompt[node]["inputs"]["image"] = server.upload(png(0), "still.png")
    for node in nodes_of_type(prompt, "WebcamCapture"):
        webcam = server.upload(png(0), "b-webcam.png", subfolder="webcam", kind="temp")
        prompt[node]["inputs"]["image"] = webcam
    result = server.run(prompt)  # raises on node_errors
    succeeded(result, server)
    assert the(prompt, "StreamV2VSampler") in result.executed


# -- (c) a video end to end ----------------------------------------------------------------------


def test_video_workflow_keeps_frame_count_and_rate(
    server: ComfyServer, object_info: dict[str, Any], tmp_path: Path
) -> None:
    prompt = api_prompt("streamv2v_video.json", object_info, bank="test-video")
    clip = upload_video(server, tmp_path, "c.mp4", frames=9, fps=12, width=WIDTH, height=HEIGHT)
    set_inputs(prompt, "LoadVideo", file=clip)
    result = server.run(prompt)
    succeeded(result, server)
    (saved,) = result.outputs[the(prompt, "SaveVideo")]["images"]
    video = probe(server.output_dir / saved["subfolder"] / saved["filename"])
    assert len(video["frames"]) == 9
    assert video["fps"] == 12
    assert (video["width"], video["height"]) == (WIDTH, HEIGHT)


def test_temporal_consistency_measures_the_video_workflow(
    server: ComfyServer, object_info: dict[str, Any], tmp_path: Path
) -> None:
    """The measuring node as a user adds it to the video example: input frames from Get Video
    Components, output frames from the sampler; its numbers and plot come back."""
    prompt = api_prompt("streamv2v_video.json", object_info, bank="test-consistency")
    clip = upload_video(server, tmp_path, "m.mp4", frames=5, width=WIDTH, height=HEIGHT)
    set_inputs(prompt, "LoadVideo", file=clip)
    components, sampler = the(prompt, "GetVideoComponents"), the(prompt, "StreamV2VSampler")
    prompt["90"] = {
        "class_type": "StreamV2VTemporalConsistency",
        "inputs": {"input_images": [components, 0], "output_images": [sampler, 0], "flow": "dis"},
    }
    result = server.run(prompt)
    succeeded(result, server)
    shown = result.outputs["90"]
    assert re.fullmatch(
        r"warp error \d+\.\d\d \(OpenCV .* DIS .*\); frame-to-frame difference \d+\.\d\d",
        shown["text"][0],
    ), shown["text"]
    (plot,) = shown["images"]
    assert Image.open(io.BytesIO(server.view(plot))).size[0] > 0


def test_vhs_workflow_restyles_a_video_in_chunks_as_one_stream(
    server: ComfyServer, object_info: dict[str, Any], tmp_path: Path
) -> None:
    """VideoHelperSuite's meta batch loads a long video a chunk per run and queues the next
    run itself; the bank carries the stream from chunk to chunk into one saved video."""
    if "VHS_LoadVideo" not in object_info:
        pytest.skip("ComfyUI-VideoHelperSuite is not installed (COMFYUI_EXTRA_NODES)")
    bank = "test-vhs-chunks"
    prompt = api_prompt("streamv2v_video_vhs.json", object_info, bank=bank)
    clip = upload_video(server, tmp_path, "long.mp4", frames=10, fps=12, width=WIDTH, height=HEIGHT)
    set_inputs(prompt, "VHS_LoadVideo", video=clip)
    set_inputs(prompt, "VHS_BatchManager", frames_per_batch=4)  # chunks of 4, 4 and 2 frames
    set_inputs(prompt, "VHS_VideoCombine", filename_prefix=bank)
    succeeded(server.run(prompt), server)
    server.wait_idle()  # the chunks' runs, queued by VHS
    stats = bank_stats(server, bank)
    assert (stats["runs"], stats["frames_in"]) == (3, 10), stats
    (saved,) = server.output_dir.glob(f"{bank}_*.mp4")
    video = probe(saved)
    assert len(video["frames"]) == 10
    assert video["fps"] == 12  # the loaded video's rate, through VHS_VideoInfoLoaded
    assert (video["width"], video["height"]) == (WIDTH, HEIGHT)
    history = server.get("/history")  # VHS queues the runs' own prompts, IS_CHANGED values kept
    assert len(history) >= 3


def test_a_lora_chain_runs_with_the_model_loaded_by_its_last_link(
    server: ComfyServer, object_info: dict[str, Any]
) -> None:
    """Loaders read ComfyUI's hidden prompt to leave the load to a chain's last Load LoRA."""
    prompt = api_prompt("streamv2v_still_image.json", object_info, bank="test-lora-chain")
    set_inputs(prompt, "LoadImage", image=server.upload(png(0), "lora-chain.png"))
    loader = the(prompt, "StreamV2VLoadModel")
    source = [loader, 0]
    for link in ("lora-1", "lora-2"):
        inputs = {"model": source, "lora_name": TINY["lcm_lora"], "strength": 0.5}
        prompt[link] = {"class_type": "StreamV2VLoadLoRA", "inputs": inputs}
        source = [link, 0]
    for node_id, node in prompt.items():
        if node_id != "lora-1" and node["inputs"].get("model") == [loader, 0]:
            node["inputs"]["model"] = source
    result = server.run(prompt)
    succeeded(result, server)
    # The loader itself may come from ComfyUI's cache, after another test's run.
    assert {"lora-1", "lora-2", the(prompt, "StreamV2VSampler")} <= set(result.executed)


# -- (d) a webcam stream across runs ---------------------------------------------------------


def test_webcam_stream_continues_across_runs(
    server: ComfyServer, object_info: dict[str, Any]
) -> None:
    prompt = api_prompt("streamv2v_webcam.json", object_info, bank="test-webcam")
    camera, sampler = the(prompt, "WebcamCapture"), the(prompt, "StreamV2VSampler")
    loader = the(prompt, "StreamV2VLoadModel")
    absorbed = []
    for run in range(1, 6):
        # What the frontend does on each queue: upload a new frame under a new name.
        image = server.upload(png(run), f"frame{run}.png", subfolder="webcam", kind="temp")
        prompt[camera]["inputs"]["image"] = image
        result = server.run(prompt)
        succeeded(result, server)
        assert camera in result.executed and sampler in result.executed
        if run > 1:
            assert loader in result.cached  # the model is not reloaded per frame
        (preview,) = result.outputs[the(prompt, "PreviewImage")]["images"]
        assert Image.open(io.BytesIO(server.view(preview))).size == (WIDTH, HEIGHT)
        stats = bank_stats(server, "test-webcam")
        assert (stats["runs"], stats["frames_in"]) == (run, run)
        absorbed.append(stats["frames_absorbed"])
        assert f"(dyme): {stats['frames_absorbed']} update" in result.outputs[sampler]["text"][0]
    assert absorbed == sorted(absorbed) and absorbed[-1] > absorbed[0] > 0, absorbed

    # What the Feature Bank's reset button posts: the next run starts afresh.
    status, reply = server.post("/streamv2v/bank/reset", {"name": "test-webcam"})
    assert status == 200 and reply["reset"] is True, reply
    stats = bank_stats(server, "test-webcam")
    assert stats["frames_absorbed"] == 0 and "frames_in" not in stats, stats
    assert server.post("/streamv2v/bank/reset", {"name": " "})[0] == 400

    # A refusal reaches the error panel as the pack's error type, not under a path.
    prompt[sampler]["inputs"]["guidance"] = 2.0
    result = server.run(prompt)
    assert result.status == "error" and result.error is not None
    assert result.error["exception_type"] == "streamv2v.errors.StreamV2VError", result.error
    assert "no effect with cfg type 'none'" in result.error["exception_message"]


def test_live_camera_continues_the_last_runs_stream(
    server: ComfyServer, object_info: dict[str, Any]
) -> None:
    """What the sampler's "Live camera" button does: after one queued run, frames sent over the
    pack's websocket continue that run's stream, one restyled frame back for each."""
    route = "/streamv2v/live?name=test-live"
    early = server.websocket(route)
    (error,) = early.wait(1)
    assert error["type"] == "error" and "run the workflow once, then go live" in error["text"]
    early.close()

    prompt = api_prompt("streamv2v_webcam.json", object_info, bank="test-live")
    image = server.upload(png(1), "live.png", subfolder="webcam", kind="temp")
    prompt[the(prompt, "WebcamCapture")]["inputs"]["image"] = image
    succeeded(server.run(prompt), server)

    live = server.websocket(route)
    (ready,) = live.wait(1)
    assert (ready["type"], ready["width"], ready["height"]) == ("ready", WIDTH, HEIGHT), ready
    second = server.websocket(route)  # another tab: one camera per bank
    assert "is live already" in second.wait(1)[0]["text"]
    second.close()

    def answers(count: int) -> list:
        """The ready message and the answers to frames: not the status and recording lines."""
        return live.wait(count, kept=lambda m: not isinstance(m, dict) or m["type"] in ANSWERS)

    def said(kind: str) -> dict:
        (message,) = live.wait(1, kept=lambda m: isinstance(m, dict) and m["type"] == kind)
        return message

    live.send_json({"type": "record", "on": True})  # the sampler's Record button
    for index in range(2, 7):  # one frame out at a time
        live.send_bytes(png(index))
        *_, image = answers(index)
        assert Image.open(io.BytesIO(image)).size == (WIDTH, HEIGHT)
    live.send_json({"type": "record", "on": False})
    recorded = said("recorded")
    path = Path(recorded["file"])
    assert said("recording")["file"] == recorded["file"]
    assert path.parent == server.output_dir / "streamv2v"
    assert path.name.startswith("live-test-live-")
    assert (recorded["frames"], recorded["error"]) == (5, None), recorded
    seen = probe(path)
    assert (seen["width"], seen["height"], len(seen["frames"])) == (WIDTH, HEIGHT, 5)
    stats = bank_stats(server, "test-live")
    assert (stats["runs"], stats["frames_in"]) == (6, 6), stats
    live.send_bytes(png(7, WIDTH * 2, HEIGHT))
    assert answers(7)[-1] == {"type": "size", "width": WIDTH, "height": HEIGHT}

    assert server.post("/streamv2v/free")[1] == {"released": True}
    live.send_bytes(png(8))
    error = answers(8)[-1]
    assert error["type"] == "error" and "model was released" in error["text"], error
    assert answers(9) and live.closed  # the server ended the connection
    live.close()
    again = server.websocket(route)  # the bank is free for a camera again, but has no model
    assert "run the workflow once, then go live" in again.wait(1)[0]["text"]
    again.close()


def test_two_samplers_on_one_bank_name_from_string_nodes_are_refused(
    server: ComfyServer, object_info: dict[str, Any]
) -> None:
    """Two Feature Bank nodes named by one String node are refused before either runs; named
    by two String nodes with one text (the queued workflow holds links, not the name), the
    second sampler to run is refused when it runs."""
    if "PrimitiveString" not in object_info:
        pytest.skip("this ComfyUI has no String (PrimitiveString) node")
    prompt = api_prompt("streamv2v_webcam.json", object_info, bank="unused")
    camera, sampler = the(prompt, "WebcamCapture"), the(prompt, "StreamV2VSampler")
    feature_bank = the(prompt, "StreamV2VFeatureBank")
    for name in ("name", "name-2"):
        prompt[name] = {"class_type": "PrimitiveString", "inputs": {"value": "test-linked-name"}}
    prompt[feature_bank]["inputs"]["name"] = ["name", 0]
    prompt["bank-2"] = json.loads(json.dumps(prompt[feature_bank]))
    prompt["sampler-2"] = json.loads(json.dumps(prompt[sampler]))
    prompt["sampler-2"]["inputs"]["bank"] = ["bank-2", 0]
    prompt["preview-2"] = {"class_type": "PreviewImage", "inputs": {"images": ["sampler-2", 0]}}
    image = server.upload(png(1), "linked.png", subfolder="webcam", kind="temp")
    prompt[camera]["inputs"]["image"] = image
    for names, ran in ((("name", 0), 0), (("name-2", 0), 1)):
        prompt["bank-2"]["inputs"]["name"] = list(names)
        result = server.run(prompt)
        assert result.status == "error" and result.error is not None, result.outputs
        assert result.error["exception_type"] == "streamv2v.errors.StreamV2VError", result.error
        assert "both use bank 'test-linked-name'" in result.error["exception_message"]
        # one String node: refused before either sampler ran; two: the first ran alone
        assert bank_stats(server, "test-linked-name").get("frames_in", 0) == ran


def test_bank_route_shows_the_bank_a_name_and_kind_pick(
    server: ComfyServer, object_info: dict[str, Any]
) -> None:
    """What the Feature Bank node asks when its name or kind changes, or a workflow opens."""
    prompt = api_prompt("streamv2v_webcam.json", object_info, bank="test-route")
    camera, sampler = the(prompt, "WebcamCapture"), the(prompt, "StreamV2VSampler")
    image = server.upload(png(1), "route.png", subfolder="webcam", kind="temp")
    prompt[camera]["inputs"]["image"] = image
    result = server.run(prompt)
    succeeded(result, server)
    # The sampler names its bank, for the frontend to update it when that bank is reset.
    assert result.outputs[sampler]["bank"] == ["test-route"]

    def ask(**query: str) -> tuple[int, Any]:
        status, body = server.request("GET", f"/streamv2v/bank?{urlencode(query)}")
        return status, json.loads(body)

    held = bank_stats(server, "test-route")["text"]
    assert "(dyme): " in held and "stream: 1 frame in" in held, held
    assert ask(name="test-route", kind="dyme") == (200, {"text": held})
    assert ask(name=" test-route ") == (200, {"text": held})  # trimmed, as a run does
    status, body = ask(name="test-route", kind="none")
    assert status == 200
    assert body["text"].startswith("bank 'test-route': kind none, no bank"), body

    # A name no run has used: an empty bank, and asking does not make one.
    assert ask(name="test-route-unused", kind="queue") == (
        200,
        {"text": "bank 'test-route-unused': empty (fills on the next run)"},
    )
    assert "test-route-unused" not in server.get("/streamv2v/banks")

    for query in ({"name": " "}, {}, {"name": "test-route", "kind": "big"}):
        status, body = ask(**query)
        assert status == 400 and set(body) == {"error"}, (query, body)
    assert "name is empty" in ask(name="")[1]["error"]
    assert "kind 'big' is unknown" in ask(name="x", kind="big")[1]["error"]


# -- (e) interrupt ---------------------------------------------------------------------------


def test_interrupt_stops_a_long_run_and_keeps_the_bank(
    server: ComfyServer, object_info: dict[str, Any], tmp_path: Path
) -> None:
    prompt = api_prompt("streamv2v_video.json", object_info, bank="test-interrupt")
    set_inputs(prompt, "StreamV2VFeatureBank", each_run="continue stream")
    set_inputs(
        prompt,
        "LoadVideo",
        file=upload_video(server, tmp_path, "short.mp4", frames=5, width=WIDTH, height=HEIGHT),
    )
    succeeded(server.run(prompt), server)
    before = bank_stats(server, "test-interrupt")
    assert before["frames_absorbed"] > 0

    # The same size: frames of another size would start a new bank.
    long_clip = upload_video(server, tmp_path, "long.mp4", frames=400, width=WIDTH, height=HEIGHT)
    set_inputs(prompt, "LoadVideo", file=long_clip)
    sampler = the(prompt, "StreamV2VSampler")
    prompt_id = server.queue(prompt)
    progress = server.wait_for_event(
        prompt_id,
        lambda m: m["type"] == "progress" and m["data"]["node"] == sampler
        and m["data"]["value"] >= 8,
        timeout=120,
    )  # fmt: skip
    assert progress["data"]["max"] == 400
    asked = time.monotonic()
    server.interrupt(prompt_id)
    result = server.wait(prompt_id, timeout=60)
    assert time.monotonic() - asked < 5
    assert result.interrupted and result.status == "error"
    last = max(
        m["data"]["value"] for m in result.events if m["type"] == "progress"
        and m["data"]["node"] == sampler
    )  # fmt: skip
    assert last < 400
    assert bank_stats(server, "test-interrupt") == before


# -- (f) ComfyUI's unload releases our model, and the next run loads it again ------------------


def test_unload_models_releases_the_pack_model(
    server: ComfyServer, object_info: dict[str, Any], tmp_path: Path
) -> None:
    prompt = api_prompt("streamv2v_video.json", object_info, bank="test-free")
    set_inputs(prompt, "StreamV2VFeatureBank", each_run="continue stream")
    set_inputs(prompt, "LoadVideo", file=upload_video(server, tmp_path, "f.mp4", frames=3))
    succeeded(server.run(prompt), server)
    assert "frames_in" in bank_stats(server, "test-free")  # a live stream holds the model

    # ComfyUI applies /free in its worker, between prompts; releasing the model ends the
    # streams that use it (the banks stay), which /streamv2v/banks shows.
    server.free(unload_models=True, free_memory=False)
    deadline = time.monotonic() + 20
    while "frames_in" in bank_stats(server, "test-free"):
        assert time.monotonic() < deadline, "ComfyUI's unload did not release the pack's model"
        time.sleep(0.2)
    assert bank_stats(server, "test-free")["frames_absorbed"] > 0

    result = server.run(prompt)
    succeeded(result, server)
    assert "frames_in" in bank_stats(server, "test-free")
