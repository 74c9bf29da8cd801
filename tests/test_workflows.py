"""The example workflows load in ComfyUI's editor and queue as they are.

ComfyUI is not needed here: our nodes' inputs come from the pack itself, loaded the way
ComfyUI loads it, and the few core and VideoHelperSuite nodes the workflows use are described
below from their sources (tests/test_comfyui.py checks the core ones against a real server).
A workflow that breaks these rules opens with red nodes, lost widget values or dangling links.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from comfy_server import combo_choices, input_spec, is_widget, widget_inputs

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_DIR = ROOT / "example_workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))
EXPECTED = {
    "streamv2v_video.json",
    "streamv2v_webcam.json",
    "streamv2v_still_image.json",
    "streamv2v_video_vhs.json",
}
UI_KEYS = {"last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version"}
NODE_KEYS = {
    "id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties",
    "widgets_values",
}  # fmt: skip

# The model files the README's Models table tells users to download, under the names the
# workflows use: with these on disk every workflow queues as shipped.
TYPICAL_MODELS = {
    "checkpoints": ["DreamShaper_8_pruned.safetensors"],
    "diffusers": [],
    "loras": ["lcm-lora-sdv1-5.safetensors"],
    "vae": [],
    "vae_approx": ["taesd_decoder.safetensors", "taesd_encoder.safetensors"],
}


@dataclass(frozen=True)
class Shape:
    """A foreign node as the editor saves it: sockets, outputs, widget values."""

    inputs: dict[str, str] = field(default_factory=dict)  # socket (or linkable widget) -> type
    outputs: tuple[tuple[str, str], ...] = ()
    widgets: int | frozenset[str] = 0  # how many values, or (VHS) the names saved
    output_node: bool = False


# Core nodes (ComfyUI 0.3.64's /object_info). Upload combos save one more value ("image"),
# WebcamCapture saves its capture button's value after its four widgets.
CORE = {
    "LoadVideo": Shape(outputs=(("VIDEO", "VIDEO"),), widgets=2),
    "GetVideoComponents": Shape(
        inputs={"video": "VIDEO"},
        outputs=(("images", "IMAGE"), ("audio", "AUDIO"), ("fps", "FLOAT")),
    ),
    "CreateVideo": Shape(
        inputs={"images": "IMAGE", "audio": "AUDIO", "fps": "FLOAT"},
        outputs=(("VIDEO", "VIDEO"),),
        widgets=1,
    ),
    "SaveVideo": Shape(inputs={"video": "VIDEO"}, widgets=3, output_node=True),
    "WebcamCapture": Shape(outputs=(("IMAGE", "IMAGE"),), widgets=5),
    "LoadImage": Shape(outputs=(("IMAGE", "IMAGE"), ("MASK", "MASK")), widgets=2),
    "PreviewImage": Shape(inputs={"images": "IMAGE"}, output_node=True),
    "Note": Shape(widgets=1),
}
# VideoHelperSuite (Kosinkadink/ComfyUI-VideoHelperSuite): its nodes save widgets_values as a
# dict by widget name; the names below are its INPUT_TYPES widgets.
VHS = {
    "VHS_BatchManager": Shape(
        outputs=(("meta_batch", "VHS_BatchManager"),), widgets=frozenset({"frames_per_batch"})
    ),
    "VHS_LoadVideo": Shape(
        inputs={"meta_batch": "VHS_BatchManager", "vae": "VAE"},
        outputs=(
            ("IMAGE", "IMAGE"),
            ("frame_count", "INT"),
            ("audio", "AUDIO"),
            ("video_info", "VHS_VIDEOINFO"),
        ),
        widgets=frozenset(
            {
                "video",
                "force_rate",
                "custom_width",
                "custom_height",
                "frame_load_cap",
                "skip_first_frames",
                "select_every_nth",
                "format",
            }
        ),  # fmt: skip
    ),
    "VHS_VideoInfoLoaded": Shape(
        inputs={"video_info": "VHS_VIDEOINFO"},
        outputs=(
            ("fps🟦", "FLOAT"),
            ("frame_count🟦", "INT"),
            ("duration🟦", "FLOAT"),
            ("width🟦", "INT"),
            ("height🟦", "INT"),
        ),
    ),
    "VHS_VideoCombine": Shape(
        inputs={
            "images": "IMAGE",
            "audio": "AUDIO",
            "meta_batch": "VHS_BatchManager",
            "vae": "VAE",
            "frame_rate": "FLOAT",
        },
        outputs=(("Filenames", "VHS_FILENAMES"),),
        widgets=frozenset(
            {"frame_rate", "loop_count", "filename_prefix", "format", "pingpong", "save_output"}
        ),
        output_node=True,
    ),
}

# What each workflow is for: (origin type, target type, target input) links it must have, and
# what its bank does between runs.
REQUIRED_LINKS = {
    "streamv2v_video.json": {
        ("LoadVideo", "GetVideoComponents", "video"),
        ("GetVideoComponents", "StreamV2VSampler", "images"),
        ("StreamV2VSampler", "CreateVideo", "images"),
        ("GetVideoComponents", "CreateVideo", "fps"),
        ("GetVideoComponents", "CreateVideo", "audio"),
        ("CreateVideo", "SaveVideo", "video"),
    },
    "streamv2v_webcam.json": {
        ("WebcamCapture", "StreamV2VSampler", "images"),
        ("StreamV2VSampler", "PreviewImage", "images"),
    },
    "streamv2v_still_image.json": {
        ("LoadImage", "StreamV2VSampler", "images"),
        ("StreamV2VSampler", "PreviewImage", "images"),
    },
    "streamv2v_video_vhs.json": {
        ("VHS_BatchManager", "VHS_LoadVideo", "meta_batch"),
        ("VHS_BatchManager", "VHS_VideoCombine", "meta_batch"),
        ("VHS_LoadVideo", "StreamV2VSampler", "images"),
        ("StreamV2VSampler", "VHS_VideoCombine", "images"),
        ("VHS_LoadVideo", "VHS_VideoCombine", "audio"),
    },
}
COMMON_LINKS = {
    ("StreamV2VLoadModel", "StreamV2VPatchAttention", "model"),
    ("StreamV2VPatchAttention", "StreamV2VSampler", "model"),
    ("StreamV2VFeatureBank", "StreamV2VSampler", "bank"),
}
EACH_RUN = {
    "streamv2v_video.json": "start new stream",  # a whole clip per run
    "streamv2v_webcam.json": "continue stream",  # one frame per run
    "streamv2v_still_image.json": "continue stream",
    "streamv2v_video_vhs.json": "continue stream",  # one chunk per run
}


def fake_folder_paths() -> types.ModuleType:
    """ComfyUI's folder_paths for a user who downloaded what the README says."""
    module = types.ModuleType("folder_paths")

    def get_filename_list(kind: str) -> list[str]:
        return list(TYPICAL_MODELS[kind])

    def get_folder_paths(kind: str) -> list[str]:
        TYPICAL_MODELS[kind]  # unknown kinds raise KeyError, as in ComfyUI
        return []

    def get_full_path(kind: str, name: str) -> str | None:
        return f"/models/{kind}/{name}" if name in TYPICAL_MODELS[kind] else None

    module.get_filename_list = get_filename_list
    module.get_folder_paths = get_folder_paths
    module.get_full_path = get_full_path
    return module


@pytest.fixture(scope="module")
def our_nodes() -> dict[str, dict[str, Any]]:
    """Our node classes as /object_info describes them, for a user with the typical models.

    The repository is imported as ComfyUI imports a custom-node folder: a package under a
    name made from its path, so only relative imports resolve. It is unloaded afterwards.
    """
    name = str(ROOT).replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "folder_paths", fake_folder_paths())
        pack = importlib.util.module_from_spec(spec)
        mp.setitem(sys.modules, name, pack)
        try:
            spec.loader.exec_module(pack)
            return {
                key: {
                    "input": cls.INPUT_TYPES(),
                    "output": tuple(cls.RETURN_TYPES),
                    "output_name": tuple(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
                    "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
                }
                for key, cls in pack.NODE_CLASS_MAPPINGS.items()
            }
        finally:
            for module in [m for m in sys.modules if m.startswith(name + ".")]:
                del sys.modules[module]


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def by_id(workflow: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {node["id"]: node for node in workflow["nodes"]}


def check_value(where: str, kind: Any, options: dict[str, Any], value: Any) -> None:
    choices = combo_choices(kind, options)
    if choices is not None:
        assert value in choices, f"{where}: {value!r} is not one of {choices}"
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), f"{where}: {value!r} is not a boolean"
    elif kind == "STRING":
        assert isinstance(value, str), f"{where}: {value!r} is not a string"
    else:
        number = int if kind == "INT" else (int, float)
        assert isinstance(value, number) and not isinstance(value, bool), (
            f"{where}: {value!r} is not {kind}"
        )
        low, high = options.get("min", float("-inf")), options.get("max", float("inf"))
        assert low <= value <= high, f"{where}: {value!r} is outside [{low}, {high}]"


def test_the_four_workflows_are_there() -> None:
    assert {path.name for path in WORKFLOWS} >= EXPECTED
    for path in WORKFLOWS:  # the template browser's thumbnail: a picture of the graph
        assert path.with_suffix(".jpg").read_bytes()[:3] == b"\xff\xd8\xff", path.name


def test_our_nodes_are_loaded(our_nodes: dict[str, dict[str, Any]]) -> None:
    # The fixture must see every node the workflows use, or the tests below check nothing.
    assert {"StreamV2VLoadModel", "StreamV2VSampler", "StreamV2VFeatureBank"} <= set(our_nodes)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_ui_format_and_links(path: Path) -> None:
    workflow = load(path)
    assert set(workflow) >= UI_KEYS, UI_KEYS - set(workflow)
    assert workflow["version"] == 0.4
    nodes = by_id(workflow)
    assert len(nodes) == len(workflow["nodes"]), "node ids repeat"
    for node in workflow["nodes"]:
        assert set(node) >= NODE_KEYS, (node["id"], NODE_KEYS - set(node))
        if node["type"] != "Note":
            assert node["properties"].get("Node name for S&R") == node["type"], node["id"]
    links = {link[0]: link for link in workflow["links"]}
    assert len(links) == len(workflow["links"]), "link ids repeat"
    assert workflow["last_node_id"] >= max(nodes)
    assert workflow["last_link_id"] >= max(links, default=0)

    for link_id, origin, origin_slot, target, target_slot, kind in workflow["links"]:
        assert origin in nodes and target in nodes, f"link {link_id} has a missing end"
        output = nodes[origin]["outputs"][origin_slot]
        assert output["type"] == kind and link_id in (output["links"] or []), (link_id, output)
        slot = nodes[target]["inputs"][target_slot]
        assert slot["type"] == kind and slot["link"] == link_id, (link_id, slot)
    for node in workflow["nodes"]:
        for index, slot in enumerate(node["inputs"]):
            if slot.get("link") is not None:
                assert links[slot["link"]][3:5] == [node["id"], index], (node["id"], slot)
        for index, output in enumerate(node["outputs"]):
            for link_id in output["links"] or []:
                assert links[link_id][1:3] == [node["id"], index], (node["id"], output)

    # Execution order: every link goes from an earlier node to a later one (no cycles).
    for link_id, origin, _, target, _, _ in workflow["links"]:
        assert nodes[origin]["order"] < nodes[target]["order"], f"link {link_id} goes backwards"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_nodes_match_their_definitions(path: Path, our_nodes: dict[str, dict[str, Any]]) -> None:
    workflow = load(path)
    vhs = path.stem.endswith("_vhs")  # VideoHelperSuite is a separate install
    known = {**CORE, **(VHS if vhs else {})}
    has_output_node = False
    for node in workflow["nodes"]:
        where = f"{path.name} node {node['id']} ({node['type']})"
        if node["type"] in our_nodes:
            info = our_nodes[node["type"]]
            spec = {name: (kind, options) for name, kind, options in input_spec(info)}
            for slot in node["inputs"]:
                assert slot["name"] in spec, f"{where}: no input {slot['name']}"
                kind, options = spec[slot["name"]]
                if is_widget(kind, options):
                    assert slot.get("widget", {}).get("name") == slot["name"], (where, slot)
                    assert slot["link"] is not None, f"{where}: unlinked widget socket"
                else:
                    assert slot["type"] == kind, (where, slot)
            linked = {slot["name"] for slot in node["inputs"] if slot["link"] is not None}
            required = info["input"].get("required", {})
            for name, (kind, options) in spec.items():
                if name in required and not is_widget(kind, options):
                    assert name in linked, f"{where}: required input {name} is not connected"
            outputs = [(o["name"], o["type"]) for o in node["outputs"]]
            assert outputs == list(zip(info["output_name"], info["output"])), where
            values = node["widgets_values"]
            widgets = widget_inputs(info)
            assert isinstance(values, list) and len(values) == len(widgets), (
                f"{where}: {len(values)} widget values for {[w[0] for w in widgets]}"
            )
            for (name, kind, options), value in zip(widgets, values):
                check_value(f"{where} {name}", kind, options, value)
            has_output_node |= info["output_node"]
        elif node["type"] in known:
            shape = known[node["type"]]
            for slot in node["inputs"]:
                assert shape.inputs.get(slot["name"]) == slot["type"], (where, slot)
            assert [(o["name"], o["type"]) for o in node["outputs"]] == list(shape.outputs), where
            values = node["widgets_values"]
            if isinstance(shape.widgets, frozenset):
                assert isinstance(values, dict) and shape.widgets <= set(values), (
                    f"{where}: widget values lack {shape.widgets - set(values or {})}"
                )
            else:
                assert isinstance(values, list) and len(values) == shape.widgets, where
            has_output_node |= shape.output_node
        else:
            pytest.fail(f"{where}: not a StreamV2V or core node{' or VHS' * vhs}")
    assert has_output_node, f"{path.name} has no output node: ComfyUI would refuse to queue it"


TITLE_HEIGHT = 30  # litegraph draws a node's title above its pos


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_no_node_covers_another(path: Path) -> None:
    nodes = json.loads(path.read_text(encoding="utf-8"))["nodes"]
    boxes = {
        f"{n['id']} {n['type']}": (
            n["pos"][0], n["pos"][1] - TITLE_HEIGHT, n["pos"][0] + n["size"][0],
            n["pos"][1] + n["size"][1],
        )
        for n in nodes
    }  # fmt: skip
    for (a, (ax0, ay0, ax1, ay1)), (b, (bx0, by0, bx1, by1)) in itertools.combinations(
        boxes.items(), 2
    ):
        assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, f"{a} and {b} overlap"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_is_wired_for_its_purpose(path: Path) -> None:
    workflow = load(path)
    nodes = by_id(workflow)
    edges = {
        (nodes[o]["type"], nodes[t]["type"], nodes[t]["inputs"][slot]["name"])
        for _, o, _, t, slot, _ in workflow["links"]
    }
    required = COMMON_LINKS | REQUIRED_LINKS.get(path.name, set())
    assert required <= edges, required - edges
    banks = [n for n in workflow["nodes"] if n["type"] == "StreamV2VFeatureBank"]
    assert banks and all(b["widgets_values"][-1] == EACH_RUN[path.name] for b in banks)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_note_says_which_models_to_get(path: Path) -> None:
    workflow = load(path)
    notes = [n for n in workflow["nodes"] if n["type"] == "Note"]
    assert notes, f"{path.name} has no Note"
    text = "\n".join(n["widgets_values"][0] for n in notes)
    for folder in ("models/checkpoints", "models/loras", "models/vae_approx"):
        assert folder in text, f"{path.name}'s note does not say what goes in {folder}"
    for loader in (n for n in workflow["nodes"] if n["type"] == "StreamV2VLoadModel"):
        model, lcm_lora, _, vae, _ = loader["widgets_values"]
        for name in (model, lcm_lora, vae):
            assert name in text, f"{path.name}'s note does not name {name}"
    if "webcam" in path.stem:
        assert "Run (Instant)" in text


# What ComfyUI's frontend needs to offer a missing model for download (its missing-models
# dialog in 1.27, its issues panel in 1.58): an https URL on an allowed host, a file name with
# an allowed suffix, and the folder to save it in.
DOWNLOAD_HOSTS = ("https://huggingface.co/", "https://civitai.com/")
LOADER_FOLDERS = {0: "checkpoints", 1: "loras"}  # Load LCM Model's file widgets, by value index


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_models_are_linked_for_download(path: Path) -> None:
    workflow = load(path)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    declared = list(workflow.get("models", []))
    for loader in (n for n in workflow["nodes"] if n["type"] == "StreamV2VLoadModel"):
        models = loader["properties"].get("models", [])
        declared += models
        # The frontend links a node's entry only to a widget value of that node.
        wanted = {(loader["widgets_values"][i], folder) for i, folder in LOADER_FOLDERS.items()}
        assert {(m["name"], m["directory"]) for m in models} == wanted, path.name
        if loader["widgets_values"][3] == "taesd":
            taesd = {(m["name"], m["directory"]) for m in workflow.get("models", [])}
            assert taesd == {(n, "vae_approx") for n in TYPICAL_MODELS["vae_approx"]}, path.name
    assert declared, f"{path.name} declares no models"
    for model in declared:
        assert set(model) == {"name", "url", "directory"}, model
        assert model["url"].startswith(DOWNLOAD_HOSTS), model
        assert model["name"].endswith(".safetensors"), model
        assert model["name"] in TYPICAL_MODELS[model["directory"]], model
        repo = "/".join(model["url"].split("/")[:5])  # https://huggingface.co/owner/name
        assert f"]({repo})" in readme, f"the README's Models table does not link {repo}"
