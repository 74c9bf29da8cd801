"""The repository as ComfyUI, ComfyUI-Manager and the Comfy registry see it.

These guard the promises a user relies on before any node runs: installing the pack never
replaces ComfyUI's torch, every dependency it declares is the one it imports, the pack loads
the way ComfyUI loads it, and the engine stays usable without ComfyUI.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]

# ComfyUI owns these: a pack that lists them can make pip replace ComfyUI's CUDA build.
COMFYUI_OWNED = {"torch", "torchvision", "torchaudio"}

# Top-level modules that exist only inside a running ComfyUI.
COMFYUI_MODULES = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "server", "execution"}


@functools.cache
def distribution_modules() -> dict[str, set[str]]:
    """Each installed distribution's top-level modules, by canonical distribution name: the
    names differ (opencv-python-headless installs cv2)."""
    modules: dict[str, set[str]] = {}
    for module, dists in importlib.metadata.packages_distributions().items():
        if module.isidentifier() and not module.startswith("_"):
            for dist in dists:
                modules.setdefault(canonicalize_name(dist), set()).add(module)
    return modules


def requirement_lines() -> list[str]:
    """ComfyUI-Manager installs requirements.txt one line at a time, skipping only lines
    that start with '#', so each other line must be a lone requirement."""
    text = (ROOT / "requirements.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def requirements() -> list[Requirement]:
    return [Requirement(line) for line in requirement_lines()]


def load_pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_requirement_lines_are_lone_requirements() -> None:
    for line in requirement_lines():
        assert "#" not in line and not line.startswith("-"), line
        try:
            Requirement(line)
        except InvalidRequirement as error:
            pytest.fail(f"requirements.txt line {line!r} is not a requirement: {error}")


def test_requirements_leave_torch_to_comfyui() -> None:
    names = {canonicalize_name(req.name) for req in requirements()}
    assert names, "requirements.txt lists nothing"
    assert not names & COMFYUI_OWNED


def test_pyproject_dependencies_equal_requirements() -> None:
    declared = {str(Requirement(dep)) for dep in load_pyproject()["project"]["dependencies"]}
    assert declared == {str(req) for req in requirements()}


@pytest.mark.parametrize("line", requirement_lines())
def test_requirement_is_installed_and_importable(line: str) -> None:
    req = Requirement(line)
    try:
        installed = importlib.metadata.version(req.name)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{req.name} is in requirements.txt but not installed")
    assert req.specifier.contains(installed, prereleases=True), (req, installed)

    modules = distribution_modules().get(canonicalize_name(req.name))
    assert modules, f"{req.name} provides no importable module"
    for module in sorted(modules):
        __import__(module)


def test_pyproject_has_what_the_comfy_registry_reads() -> None:
    pyproject = load_pyproject()
    project = pyproject["project"]
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", project["name"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["description"]
    license_file = ROOT / project["license"]["file"]
    assert "Apache License" in license_file.read_text(encoding="utf-8")
    assert project["urls"]["Repository"].startswith("https://github.com/")
    comfy = pyproject["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert "Icon" in comfy


def test_pack_loads_as_comfyui_loads_it(tmp_path: Path) -> None:
    # A fresh interpreter without the repository on sys.path, so only relative imports can
    # succeed, and with a top-level `nodes` module of its own, as ComfyUI has: a pack that
    # wrote `import nodes` or `import streamv2v` would get the wrong one or none. The module
    # name is the folder's path with dots replaced, as ComfyUI's load_custom_node does.
    (tmp_path / "nodes.py").write_text("raise ImportError('this is ComfyUI nodes.py')\n")
    script = textwrap.dedent(
        """
        import importlib.util, json, os, sys
        path = sys.argv[1]
        name = path.replace(".", "_x_")
        spec = importlib.util.spec_from_file_location(name, os.path.join(path, "__init__.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        classes = module.NODE_CLASS_MAPPINGS
        names = module.NODE_DISPLAY_NAME_MAPPINGS
        assert isinstance(classes, dict) and isinstance(names, dict)
        assert set(names) <= set(classes), set(names) - set(classes)
        for key, cls in classes.items():
            for attribute in ("INPUT_TYPES", "RETURN_TYPES", "FUNCTION", "CATEGORY"):
                assert hasattr(cls, attribute), (key, attribute)
            assert callable(getattr(cls, cls.FUNCTION)), key
        web = getattr(module, "WEB_DIRECTORY", None)
        if web is not None:
            assert any(
                f.endswith(".js") for _, _, files in os.walk(os.path.join(path, web)) for f in files
            ), web
        top = sorted(m for m in sys.modules if m.split(".")[0] in {"nodes", "streamv2v"})
        print(json.dumps(top))
        """
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", script, str(ROOT)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]", "the pack imported a top-level module"


def imported_modules(source: Path) -> set[str]:
    tree = ast.parse(source.read_text(encoding="utf-8"), filename=str(source))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_engine_never_imports_comfyui() -> None:
    sources = sorted((ROOT / "streamv2v").rglob("*.py"))
    assert sources
    offenders = {
        str(source.relative_to(ROOT)): sorted(imported_modules(source) & COMFYUI_MODULES)
        for source in sources
    }
    assert not {path: names for path, names in offenders.items() if names}


def test_engine_imports_only_declared_dependencies() -> None:
    # A module the engine imports but requirements.txt does not declare would work here and
    # fail in a user's ComfyUI. torch, numpy and Pillow come with ComfyUI itself; xformers,
    # torchvision (RAFT flow for the metrics), triton (the fused DyMe kernel; CUDA torch
    # brings it) and flash_attn (flash-attn-4, for self-attention) are optional, used only
    # where installed.
    provided = set().union(
        *(distribution_modules().get(canonicalize_name(req.name), set()) for req in requirements())
    )
    unlisted = {"torch", "numpy", "PIL", "xformers", "torchvision", "triton", "flash_attn"}
    allowed = provided | unlisted | {"streamv2v"} | set(sys.stdlib_module_names)
    imported = set().union(*(imported_modules(p) for p in (ROOT / "streamv2v").rglob("*.py")))
    assert not imported - allowed


def test_a_torch_too_old_for_the_engine_is_named_at_import() -> None:
    """The bank's operators need ``torch.library.custom_op`` (PyTorch 2.4): without it, the
    import says which PyTorch is there and what to do, rather than failing on an attribute."""
    script = "import torch; del torch.library.custom_op; import streamv2v"
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: ComfyUI-StreamV2V needs PyTorch 2.4 or newer")
    assert f"has torch {importlib.metadata.version('torch')}" in last
