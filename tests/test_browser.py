"""The pack in a real browser: the frontend extension, the webcam workflow, saved workflows.

Drives ComfyUI's own frontend in headless Chromium (Playwright) as a user would: open the
page, pick the webcam example from the template browser, queue it (WebcamCapture grabs a frame
from Chromium's fake camera), read the status boxes, press "Reset bank", save the workflow;
open every example, see its missing models offered for download, and do it all again with the
frontend's DOM-drawn nodes ("Nodes 2.0").

Needs a ComfyUI checkout (``COMFYUI_PATH``, server Python ``COMFYUI_PYTHON``), a Chromium
(``CHROMIUM``, default /usr/bin/chromium; Playwright's own browsers are not used) and the
``playwright`` package; skipped without them. ``COMFYUI_FRONT_END_ROOT`` serves another build
of the frontend (a ``comfyui_frontend_package``'s ``static`` folder) through ``--front-end-root``,
so a newer frontend than the checkout's pinned one can be checked.

    COMFYUI_PATH=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/its/python \\
        python -m pytest tests/test_browser.py -m comfyui
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.comfyui

from comfy_server import (  # noqa: E402
    PACK_FOLDER,
    ComfyServer,
    comfyui_from_env,
    extra_widget_values,
    packs_under_test,
    widget_inputs,
)
from videos import probe  # noqa: E402

COMFYUI_PATH, COMFYUI_PYTHON = comfyui_from_env()
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
FRONT_END_ROOT = os.environ.get("COMFYUI_FRONT_END_ROOT")
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"no Chromium at {CHROMIUM} (set CHROMIUM)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")

ROOT = Path(__file__).resolve().parents[1]
EXTENSION = f"/extensions/{PACK_FOLDER}/streamv2v.js"
WORKFLOW = "streamv2v_webcam"
BASE_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
FAKE_CAMERA = "--use-fake-device-for-media-stream"  # a synthetic camera...
ALLOW_CAMERA = "--use-fake-ui-for-media-stream"  # ...allowed without asking
CHROMIUM_ARGS = [*BASE_ARGS, FAKE_CAMERA, ALLOW_CAMERA]
RUN_TIMEOUT_MS = 180_000  # a queued run (the first one loads the model)
UI_TIMEOUT_MS = 30_000
LOADER, BANK, SAMPLER = "StreamV2VLoadModel", "StreamV2VFeatureBank", "StreamV2VSampler"
OUR_NODES = (LOADER, "StreamV2VPatchAttention", BANK, SAMPLER)
STATUS, RESET, LIVE_BUTTON = "streamv2v_status", "Reset bank", "Live camera"
RECORD = "Record"
MISSING_MODELS_SETTING = "Comfy.Workflow.ShowMissingModelsWarning"
NODES_2_0_SETTING = "Comfy.VueNodes.Enabled"  # "Modern Node Design (Nodes 2.0)"
SIDE_PANEL_SETTING = "Comfy.RightSidePanel.IsOpen"  # the selected node's widgets again (not 1.27)
SIDE_PANEL = '[data-testid="properties-panel"]'
# Where the frontend lists missing models: a dialog (1.27) or, behind "View details", a panel.
MISSING_MODELS_DIALOG = '[aria-labelledby="global-missing-models-warning"]'
MISSING_MODEL_DOWNLOAD = '[data-testid="missing-model-download"]'

# Page-side helpers, defined once per page (window.t) so each call below stays short.
HELPERS = """([STATUS, RUN_TIMEOUT_MS]) => {
  const api = window.comfyAPI.api.api;
  const node = (type) => app.graph.nodes.find((n) => n.comfyClass === type);
  const widget = (type, name) => node(type).widgets.find((w) => w.name === name);
  window.t = {
    node, widget,
    statusBox: (type) => widget(type, STATUS)?.element ?? null,
    status: (type) => widget(type, STATUS)?.value ?? null,
    set: (type, name, value) => { widget(type, name).value = value; },
    cameraReady: () => node("WebcamCapture")?.widgets.at(-1).disabled === false,
    // Queue as the Run button does; settle with the run's end event (or an error event).
    run: () => new Promise((resolve, reject) => {
      const events = ["execution_success", "execution_error", "execution_interrupted"];
      const done = (event) => {
        events.forEach((e) => api.removeEventListener(e, done));
        clearTimeout(timer);
        resolve({ type: event.type, detail: event.detail });
      };
      const timer = setTimeout(() => reject(new Error("run timed out")), RUN_TIMEOUT_MS);
      events.forEach((e) => api.addEventListener(e, done));
      app.queuePrompt(0, 1).catch(reject);
    }),
  };
}"""


@pytest.fixture(scope="module")
def server(comfy_models_dir: Path) -> Iterator[ComfyServer]:
    check = subprocess.run(
        [COMFYUI_PYTHON, "-c", "import torch, aiohttp, comfyui_frontend_package"],
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        pytest.skip(f"{COMFYUI_PYTHON} cannot run ComfyUI and its frontend: {check.stderr[-300:]}")
    srv = ComfyServer(
        COMFYUI_PATH,
        packs_under_test(PACK_FOLDER, ROOT),
        python=COMFYUI_PYTHON,
        models_dir=comfy_models_dir,
        extra_args=["--front-end-root", FRONT_END_ROOT] if FRONT_END_ROOT else (),
    )
    srv.start()
    try:
        # Not a first visit: the frontend would open the template browser by itself.
        srv.post("/settings/Comfy.TutorialCompleted", True)
        # The templates' models are not here (tiny ones stand in): the frontend's missing-models
        # dialog would cover the canvas. Its own test turns it back on.
        srv.post(f"/settings/{MISSING_MODELS_SETTING}", False)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def playwright() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        yield playwright


def launch(playwright: Any, args: list[str]) -> Any:
    return playwright.chromium.launch(executable_path=CHROMIUM, args=args)


@pytest.fixture(scope="module")
def browser(playwright: Any) -> Iterator[Any]:
    chromium = launch(playwright, CHROMIUM_ARGS)
    try:
        yield chromium
    finally:
        chromium.close()


class Page:
    """A ComfyUI tab, with what went wrong in it recorded."""

    def __init__(self, browser: Any, server: ComfyServer, script: str | None = None) -> None:
        """``script``: run in the page before its own, as the browser it stands for would."""
        self.context = browser.new_context(viewport={"width": 1600, "height": 1200})
        if script:
            self.context.add_init_script(script)
        self.page = self.context.new_page()
        self.page.set_default_timeout(UI_TIMEOUT_MS)
        self.errors: list[str] = []  # console errors and uncaught exceptions, with where
        self.extension_status: list[int] = []
        self.warnings: list[str] = []  # console warnings (a frontend's deprecation notices)
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.errors.append(f"{e.message}\n{e.stack}"))
        self.page.on("requestfailed", lambda r: self.errors.append(f"{r.url} {r.failure}"))
        self.page.on(
            "response",
            lambda r: r.url.endswith(EXTENSION) and self.extension_status.append(r.status),
        )
        self.page.goto(server.url)
        self.page.wait_for_function("() => window.app?.graph && window.comfyAPI?.api")
        self.page.evaluate(HELPERS, [STATUS, RUN_TIMEOUT_MS])

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.errors.append(f"{message.text}\n{message.location.get('url', '')}")
        elif message.type == "warning":
            self.warnings.append(message.text)

    def ours(self) -> list[str]:
        """Errors from the extension or the routes it calls (ComfyUI logs a few of its own)."""
        return [e for e in self.errors if EXTENSION in e or "/streamv2v/" in e or "StreamV2V:" in e]

    def js(self, expression: str, arg: Any = None) -> Any:
        return self.page.evaluate(expression, arg)

    def status(self, node_type: str) -> str | None:
        return self.js("(type) => t.status(type)", node_type)

    def shown(self, node_type: str) -> str:
        """The status as the user sees it: the text in the node's box, which must be on screen."""
        box = self.page.evaluate_handle("(type) => t.statusBox(type)", node_type).as_element()
        assert box is not None and box.is_visible(), f"{node_type}: no status box on screen"
        return box.input_value()

    def shown_in_node(self, node_type: str) -> str:
        """``shown`` in Nodes 2.0: the last text box the node's own element draws."""
        node_id = self.js("(type) => t.node(type).id", node_type)
        box = self.page.locator(f'[data-node-id="{node_id}"] textarea').last
        assert box.is_visible(), f"{node_type}: no status box on screen"
        return box.input_value()

    def load_template(self, name: str = WORKFLOW) -> None:
        """Open one of the pack's examples as a user does: Templates, the pack, its card."""
        self.page.get_by_text("Templates", exact=True).first.click()
        self.page.get_by_text(PACK_FOLDER, exact=True).click()
        self.page.get_by_text(name, exact=True).click()
        self.page.wait_for_function(f"() => t.node('{SAMPLER}') && t.node('{BANK}')")

    def prepare(self, bank: str) -> None:
        """Tiny models, a private bank absorbing every frame, a small camera frame."""
        self.js(
            f"""(bank) => {{
              t.set("{LOADER}", "model", "diffusers/tiny-sd15");
              t.set("{LOADER}", "lcm_lora", "lcm-lora-tiny.safetensors");
              t.set("{LOADER}", "dtype", "fp32");
              t.set("{BANK}", "name", bank);
              t.set("{BANK}", "interval", 1);
              t.set("WebcamCapture", "width", 64);
              t.set("WebcamCapture", "height", 48);
            }}""",
            bank,
        )
        self.page.wait_for_function("() => t.cameraReady()")

    def run(self) -> str:
        """Queue the workflow, wait for it; the sampler's status once the bank node caught up."""
        result = self.js("() => t.run()")
        assert result["type"] == "execution_success", result
        self.page.wait_for_function(
            f"""() => {{
              const bank = t.status("{BANK}"), sampler = t.status("{SAMPLER}");
              return bank && sampler && sampler.startsWith(bank);
            }}"""
        )
        return self.status(SAMPLER)

    def click_widget(self, node_type: str, name: str, right: float | None = None) -> None:
        """A real mouse click on a canvas widget: in its middle, or ``right`` canvas units left
        of its right end (a combo's arrow there picks the next value)."""
        x, y = self.js(
            """([type, name, right]) => {
              const node = t.node(type), widget = t.widget(type, name);
              const [x, y] = app.canvas.ds.convertOffsetToCanvas([
                node.pos[0] + (right === null ? node.size[0] / 2 : node.size[0] - right),
                node.pos[1] + widget.y + LiteGraph.NODE_WIDGET_HEIGHT / 2,
              ]);
              const box = app.canvas.canvas.getBoundingClientRect();
              return [box.left + x, box.top + y];
            }""",
            [node_type, name, right],
        )
        self.page.mouse.click(x, y)

    def type_into_widget(self, node_type: str, name: str, text: str) -> None:
        """Edit a canvas text widget as a user does: click it, type into the box the frontend
        opens over the canvas, press Enter."""
        self.click_widget(node_type, name)
        field = self.page.locator(".graphdialog .value")
        field.fill(text)
        field.press("Enter")
        field.wait_for(state="detached")

    def wait_status(self, node_type: str, text: str) -> None:
        """Wait until the node's status reads ``text`` (the frontend asked the server)."""
        self.page.wait_for_function(
            "([type, text]) => t.status(type) === text", arg=[node_type, text]
        )

    def missing_models(self) -> set[str]:
        """The models the frontend offers to download, as "folder / file" (1.27's wording)."""
        dialog = self.page.locator(MISSING_MODELS_DIALOG)
        details = self.page.get_by_text("View details", exact=True)
        dialog.or_(details).first.wait_for()
        if dialog.is_visible():
            rows = dialog.locator("li").filter(has=self.page.get_by_text("Download"))
            return {row.inner_text().splitlines()[0].strip() for row in rows.all()}
        details.click()
        buttons = self.page.locator(MISSING_MODEL_DOWNLOAD)
        buttons.first.wait_for()
        offered = set()
        for button in buttons.all():  # a row: the file name, its folder, then the button
            row = button.locator("xpath=..")
            name, folder = row.inner_text().splitlines()[:2]
            offered.add(f"{folder.strip()} / {name.strip()}")
        return offered

    def choose_run_mode(self, mode: str) -> None:
        """Pick an entry of the Run button's menu (its arrow: "Run options" from 1.28 on)."""
        self.page.locator('button[aria-label="Run options"], .p-splitbutton-dropdown').first.click()
        entries = self.page.get_by_role("menuitem").or_(self.page.get_by_role("menuitemradio"))
        entries.filter(has=self.page.get_by_text(mode, exact=True)).click()

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def page(browser: Any, server: ComfyServer) -> Iterator[Page]:
    tab = Page(browser, server)
    try:
        yield tab
    finally:
        tab.close()


def absorbed(status: str) -> int:
    return int(re.search(r"\(dyme\): (\d+) updates?,", status).group(1))


def frames_in(status: str) -> int:
    return int(re.search(r"stream: (\d+) frames? in", status).group(1))


def saved_value_count(info: dict[str, Any]) -> int:
    """How many widgets_values ComfyUI saves for a node of the pack's: its widget inputs."""
    return sum(1 + extra_widget_values(*spec) for spec in widget_inputs(info))


def frontend_imports() -> list[str]:
    """The frontend modules the extension imports, as the server path ("scripts/app.js")."""
    source = (ROOT / "web" / "streamv2v.js").read_text("utf-8")
    return re.findall(r'^import .* from "\.\./\.\./([^"]+)";', source, re.MULTILINE)


def test_extension_loads_without_errors(page: Page, server) -> None:
    assert page.extension_status == [200]
    assert "StreamV2V.Nodes" in page.js("() => app.extensions.map((e) => e.name)")
    page.js(f"() => {{ app.graph.add(LiteGraph.createNode('{BANK}')); }}")
    widgets = page.js(f"() => t.node('{BANK}').widgets.map((w) => [w.name, w.type])")
    assert [name for name, _ in widgets][-2:] == [RESET, STATUS]
    box = page.page.evaluate_handle(f"() => t.statusBox('{BANK}')").as_element()
    assert box.evaluate("(e) => e.tagName") == "TEXTAREA"  # multiline
    assert not box.is_editable()  # shown, not typed into
    assert box.get_attribute("aria-label") == "status"
    assert page.js(f"() => t.widget('{BANK}', '{STATUS}').label") == "status"
    assert page.ours() == []
    # Newer frontends warn when a widget's element is read by its old name.
    assert not [w for w in page.warnings if "inputEl" in w], page.warnings
    # ...and when an extension imports a module of theirs that is not public API (1.58:
    # '"scripts/widgets.js" is an internal module, not part of the public API'), which a
    # later frontend may drop, and the extension with it. The public ones load silently.
    imported = frontend_imports()
    assert "scripts/app.js" in imported, imported
    assert not [w for w in page.warnings if any(f'"{m}"' in w for m in imported)], page.warnings
    for module in imported:
        status, shim = server.request("GET", f"/{module}")
        assert status == 200 and b"console.warn" not in shim, (module, shim[:300])


def test_wheel_over_the_status_box_moves_the_canvas(page: Page) -> None:
    """As over ComfyUI's own text boxes, though the box lies over the canvas, not in it."""
    page.js(
        "(type) => { const node = LiteGraph.createNode(type); node.pos = [300, 200]; "
        "app.graph.add(node); }",
        BANK,
    )
    box = page.page.evaluate_handle(f"() => t.statusBox('{BANK}')").as_element()
    box.wait_for_element_state("visible")
    view = "() => JSON.stringify([app.canvas.ds.scale, ...app.canvas.ds.offset])"
    before = page.js(view)
    box.hover()
    page.page.mouse.wheel(0, 300)
    page.page.wait_for_function(f"(before) => ({view})() !== before", arg=before)


def test_webcam_stream_grows_the_bank_and_reset_empties_it(page: Page, server) -> None:
    bank = f"browser-{uuid.uuid4().hex[:8]}"
    page.load_template()
    page.prepare(bank)

    first = page.run()
    second = page.run()
    assert f"bank '{bank}'" in first
    assert (frames_in(first), frames_in(second)) == (1, 2)  # the stream carried over
    assert absorbed(second) > absorbed(first) > 0
    assert page.shown(SAMPLER) == second
    assert second.startswith(page.shown(BANK))  # the bank node caught up when the run ended
    assert page.js("() => t.node('PreviewImage').imgs?.length") == 1

    page.click_widget(BANK, RESET)
    page.page.wait_for_function(
        f"() => !t.status('{BANK}').includes('stream:')"  # the stream ended with the reset
    )
    assert "empty" in page.shown(BANK), page.shown(BANK)
    assert server.get("/streamv2v/banks")[bank].get("frames_absorbed", 0) == 0

    third = page.run()
    assert frames_in(third) == 1  # a new stream
    assert page.ours() == []


def test_live_camera_streams_frames_on_the_sampler_without_queued_runs(page: Page, server) -> None:
    """ "Live camera" after one run: the browser's camera goes straight to the bank's stream and
    the restyled frames show on the sampler, many a second, until the button stops it."""
    bank = f"browser-{uuid.uuid4().hex[:8]}"
    page.load_template()
    page.prepare(bank)
    page.run()  # the settings the live camera goes on with
    page.click_widget(SAMPLER, LIVE_BUTTON)
    # until the first rate comes: the bank, the frame size and which camera (Chromium's fake one)
    page.wait_status(SAMPLER, f"live: bank '{bank}', 64x48, fake_device_0\n{page.status(BANK)}")
    page.page.wait_for_function(
        f"() => /^live: [0-9.]+ frames\\/s, ([3-9]\\d|\\d{{3,}}) frames\\n/"
        f".test(t.status('{SAMPLER}') ?? '')",
        timeout=RUN_TIMEOUT_MS,
    )
    live = page.status(SAMPLER)
    # read between frames: each frame's new picture has no size until it has loaded
    view = page.page.wait_for_function(
        f"() => {{ const e = t.widget('{SAMPLER}', 'streamv2v_live').element;"
        " return e.complete && e.naturalWidth > 0"
        " && [e.src, e.naturalWidth, e.naturalHeight, e.getBoundingClientRect().height]; }"
    ).json_value()
    assert view[0].startswith("blob:") and view[1:3] == [64, 48] and view[3] > 50, view
    assert f"bank '{bank}'" in live, live
    with page.page.expect_popup() as opened:  # the view alone, for a streaming program
        page.page.locator('img[alt="live output"]').click()
    window = opened.value
    window.wait_for_function(
        "() => { const e = document.querySelector('img'); return e?.src.startsWith('blob:') "
        "&& e.naturalWidth === 64 && e.getBoundingClientRect().width > 100; }"
    )
    first = window.evaluate("() => document.querySelector('img').src")
    window.wait_for_function("(first) => document.querySelector('img').src !== first", arg=first)
    # A run queued while live, with other frames: the live camera goes on at their size.
    page.js("() => t.set('WebcamCapture', 'width', 80)")
    assert page.js("() => t.run()")["type"] == "execution_success"
    window.wait_for_function("() => document.querySelector('img').naturalWidth === 80")
    page.click_widget(SAMPLER, LIVE_BUTTON)  # now labelled "Stop live camera"
    page.page.wait_for_function(f"() => t.status('{SAMPLER}').startsWith('live stopped')")
    stats = server.get("/streamv2v/banks")[bank]
    # two queued runs, the rest live; the stream since the size change has its own count
    assert stats["runs"] > 30 and 0 < stats["frames_in"] < stats["runs"], stats
    print(f"\n{live.splitlines()[0]}")  # the rate this machine reached
    assert page.ours() == []


def finished(path: Path, timeout: float = 10.0) -> dict:
    """What a player sees in ``path`` once the server has finished it: it does when the
    connection has closed, a moment after the page's camera stopped."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return probe(path)
        except Exception:  # not there yet, or its index not written yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_record_keeps_the_live_frames_in_a_video_file(page: Page, server) -> None:
    """Record while live: the restyled frames go into a file in ComfyUI's output folder,
    named on the node; stopping the live camera while recording finishes the file too."""
    bank = f"browser-{uuid.uuid4().hex[:8]}"
    page.load_template()
    page.prepare(bank)
    page.run()

    def when_status_starts(start: str) -> str:
        return page.page.wait_for_function(
            "([type, start]) => { const s = t.status(type); return s.startsWith(start) && s; }",
            arg=[SAMPLER, start],
        ).json_value()

    page.click_widget(SAMPLER, RECORD)
    page.wait_status(
        SAMPLER, "record: press Live camera first (Record keeps the live frames in a video)"
    )
    page.click_widget(SAMPLER, LIVE_BUTTON)
    page.page.wait_for_function(f"() => /^live: [0-9.]+ frames\\/s/.test(t.status('{SAMPLER}'))")
    page.click_widget(SAMPLER, RECORD)
    folder = server.output_dir / "streamv2v"
    page.page.wait_for_function(
        f"() => t.status('{SAMPLER}').includes('recording {folder}/live-{bank}-')"
    )
    assert page.js(f"() => t.widget('{SAMPLER}', '{RECORD}').label") == "Stop recording"
    page.page.wait_for_function(  # a second's status line says it is recording
        f"() => /^live: [0-9.]+ frames\\/s, \\d+ frames\\nrecording /.test(t.status('{SAMPLER}'))"
    )
    page.click_widget(SAMPLER, RECORD)
    said = when_status_starts("live: saved ")  # read at once: a status line comes each second
    saved = re.fullmatch(
        r"live: saved (\S+) \((\d+) frames, ([0-9.]+) s(, \d+ left out to keep up)?\)", said
    )
    assert saved, said
    path, count = Path(saved[1]), int(saved[2])
    assert path.parent == folder and count > 0, saved.groups()
    seen = probe(path)
    assert (seen["width"], seen["height"], len(seen["frames"])) == (64, 48, count)
    assert page.js(f"() => t.widget('{SAMPLER}', '{RECORD}').label") == RECORD

    page.click_widget(SAMPLER, RECORD)  # again, then the live camera stopped meanwhile
    second = Path(when_status_starts("live: recording ").removeprefix("live: recording "))
    assert second != path
    page.page.wait_for_function(f"() => /\\d+ frames\\nrecording /.test(t.status('{SAMPLER}'))")
    page.click_widget(SAMPLER, LIVE_BUTTON)
    page.page.wait_for_function(
        f"() => /^live stopped; finishing the recording /.test(t.status('{SAMPLER}'))"
    )
    stopped = page.status(SAMPLER).splitlines()
    assert stopped[0] == f"live stopped; finishing the recording {second}", stopped
    assert stopped[1].startswith(f"saved {path} ("), stopped  # the one before, still named
    assert page.js(f"() => t.widget('{SAMPLER}', '{RECORD}').label") == RECORD
    assert len(finished(second)["frames"]) > 0
    assert page.ours() == []


def test_live_camera_follows_runs_that_change_the_model_or_the_bank(page: Page, server) -> None:
    """Change a control and press Run while live: the live camera goes on after the run, even
    when the run released its stream (another LoRA strength loads the model again), and moves
    to the run's bank when the bank was renamed."""
    first, second = (f"browser-{uuid.uuid4().hex[:8]}" for _ in range(2))
    page.load_template()
    page.prepare(first)
    page.run()
    page.click_widget(SAMPLER, LIVE_BUTTON)
    more_frames = (  # live on that bank, more than n frames since it went live
        f"([bank, n]) => {{ const live = t.node('{SAMPLER}').streamv2vLive;"
        " return live?.bank === bank && live.frames > n; }"
    )
    page.page.wait_for_function(more_frames, arg=[first, 5], timeout=RUN_TIMEOUT_MS)
    page.js(f"() => t.set('{LOADER}', 'lcm_lora_strength', 0.5)")
    assert page.js("() => t.run()")["type"] == "execution_success"
    page.page.wait_for_function(more_frames, arg=[first, 5], timeout=RUN_TIMEOUT_MS)
    page.js(f"(bank) => t.set('{BANK}', 'name', bank)", second)
    assert page.js("() => t.run()")["type"] == "execution_success"
    page.page.wait_for_function(more_frames, arg=[second, 5], timeout=RUN_TIMEOUT_MS)
    page.click_widget(SAMPLER, LIVE_BUTTON)
    page.page.wait_for_function(f"() => t.status('{SAMPLER}').startsWith('live stopped')")
    banks = server.get("/streamv2v/banks")
    assert banks[second]["runs"] > 5, banks[second]  # one queued run, then live frames
    assert page.ours() == []


# Browsers that give no camera: their Chromium switches, a script, what the sampler then says.
NO_CAMERA = {
    "refused": ([FAKE_CAMERA], None, "the camera is not allowed on this page: allow it"),
    "missing": ([ALLOW_CAMERA], None, "this browser finds no camera: connect one"),
    # A page that is not secure (http, by another name than localhost) has no mediaDevices in
    # Chromium. Reaching this server so took 47 s here, against 2.5 s as 127.0.0.1: too slow
    # for a test, so the page is secure and the script takes them away.
    "insecure": (
        [FAKE_CAMERA, ALLOW_CAMERA],
        "delete Navigator.prototype.mediaDevices",
        "no camera on this page: the browser gives a camera only to pages on localhost or https",
    ),
}


def test_live_camera_says_why_the_browser_gives_no_camera(playwright, page: Page, server) -> None:
    """A camera refused, missing, or withheld from a page that is not secure: the sampler says
    which and what to do, and the bank is free for the next try."""
    bank = f"browser-{uuid.uuid4().hex[:8]}"
    page.load_template()
    page.prepare(bank)
    page.run()  # a stream to go live on
    for case, (args, script, said) in NO_CAMERA.items():
        chromium = launch(playwright, [*BASE_ARGS, *args])
        try:
            tab = Page(chromium, server, script)
            tab.load_template()
            tab.js(f"(bank) => t.set('{BANK}', 'name', bank)", bank)
            tab.click_widget(SAMPLER, LIVE_BUTTON)
            tab.page.wait_for_function(
                f"() => /^live: (?!connecting)/.test(t.status('{SAMPLER}') ?? '')"
            )
            status = tab.status(SAMPLER)
            assert status.startswith(f"live: {said}"), (case, status)
            button = f"(({{label, name}}) => label ?? name)(t.widget('{SAMPLER}', '{LIVE_BUTTON}'))"
            assert tab.js(f"() => {button}") == LIVE_BUTTON, case  # not "Stop live camera"
            assert tab.ours() == [], case
        finally:
            chromium.close()
    live = server.websocket(f"/streamv2v/live?name={bank}")  # given back each time
    (ready,) = live.wait(1)
    live.close()
    assert ready["type"] == "ready", ready


def test_reset_bank_shows_the_emptied_bank_on_its_sampler(page: Page) -> None:
    """The sampler's status begins with its bank's state: a reset makes that out of date."""
    bank = f"browser-{uuid.uuid4().hex[:8]}"
    page.load_template()
    page.prepare(bank)
    status = page.run()
    assert absorbed(status) > 0 and frames_in(status) == 1

    page.click_widget(BANK, RESET)
    page.page.wait_for_function(f"() => !t.status('{BANK}').includes('stream:')")
    reset = page.shown(BANK)
    assert reset == f"bank '{bank}': empty (fills on the next run)", reset
    assert page.shown(SAMPLER) == reset  # no longer the run's "(dyme): N updates"
    assert page.ours() == []


def test_renaming_the_bank_shows_the_bank_now_named(page: Page, server) -> None:
    """The server keeps banks by name: a Feature Bank node given another name (or kind) shows
    that bank's state at once, not the old one's until the next run."""
    bank = f"browser-{uuid.uuid4().hex[:8]}"
    page.load_template()
    page.prepare(bank)
    status = page.run()
    held = server.get("/streamv2v/banks")[bank]["text"]
    assert status.startswith(held) and page.shown(BANK) == held

    other = f"{bank}-other"
    page.type_into_widget(BANK, "name", other)
    page.wait_status(BANK, f"bank '{other}': empty (fills on the next run)")
    assert page.shown(SAMPLER) == status  # the sampler's status is its last run's
    assert other not in server.get("/streamv2v/banks")  # looking did not make a bank

    page.type_into_widget(BANK, "name", bank)  # back to the bank that holds a stream
    page.wait_status(BANK, held)
    page.click_widget(BANK, "kind", right=20)  # the arrow: dyme -> queue
    page.page.wait_for_function(f"() => t.widget('{BANK}', 'kind').value === 'queue'")
    page.click_widget(BANK, "kind", right=20)  # queue -> none: the next run uses no bank
    none = server.get(f"/streamv2v/bank?name={bank}&kind=none")["text"]
    assert none.startswith(f"bank '{bank}': kind none, no bank"), none
    page.wait_status(BANK, none)
    assert page.shown(BANK) == none
    assert page.ours() == []


def test_run_instant_streams_the_webcam_until_stopped(page: Page) -> None:
    """What the webcam example's Note says: choose Run (Instant) in the Run button's menu, press
    the button, and runs follow each other, a camera frame each; choosing Run stops them."""
    page.load_template()
    page.prepare(f"browser-{uuid.uuid4().hex[:8]}")
    page.choose_run_mode("Run (Instant)")
    page.page.locator('button:has-text("Run (Instant)")').first.click()
    page.page.wait_for_function(
        f"() => /stream: ([5-9]|\\d\\d+) frames in/.test(t.status('{SAMPLER}') ?? '')",
        timeout=RUN_TIMEOUT_MS,
    )
    page.choose_run_mode("Run")
    frames = frames_in(page.status(SAMPLER))
    for _ in range(20):  # the run under way, and any already queued, end
        page.page.wait_for_timeout(1500)
        frames, before = frames_in(page.status(SAMPLER)), frames
        if frames == before:
            break
    page.page.wait_for_timeout(3000)
    assert frames_in(page.status(SAMPLER)) == frames  # no run follows
    assert page.ours() == []


TEMPLATES = sorted(p.stem for p in (ROOT / "example_workflows").glob("*.json"))


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_opens_with_its_nodes_and_values(page: Page, name: str) -> None:
    vhs = page.js("() => !!LiteGraph.registered_node_types.VHS_LoadVideo")
    if name.endswith("_vhs") and not vhs:
        pytest.skip("ComfyUI-VideoHelperSuite is not installed (COMFYUI_EXTRA_NODES)")
    page.load_template(name)
    shipped = json.loads((ROOT / "example_workflows" / f"{name}.json").read_text("utf-8"))
    opened = page.js(
        """() => app.graph.nodes.map((n) => [String(n.id), n.type,  // 1.58's ids are strings
             !!LiteGraph.registered_node_types[n.type],
             (n.widgets ?? []).filter((w) => w.serialize !== false).map((w) => w.value)])"""
    )
    ids = sorted(str(node["id"]) for node in shipped["nodes"])
    assert sorted(node_id for node_id, *_ in opened) == ids
    assert all(registered for _, _, registered, _ in opened), opened
    values = {node_id: widget_values for node_id, _, _, widget_values in opened}
    for node in shipped["nodes"]:
        if node["type"] in OUR_NODES:  # every value kept, in place (none reset to a default)
            assert values[str(node["id"])] == node["widgets_values"], node["type"]
    assert page.ours() == []


def test_saved_workflow_leaves_out_status_and_button(page: Page, server) -> None:
    page.load_template()
    page.prepare(f"browser-{uuid.uuid4().hex[:8]}")
    page.run()  # the status boxes now hold text: they must still not be saved
    info = server.object_info()

    saved = page.js("() => app.graph.serialize()")
    values = {node["type"]: node["widgets_values"] for node in saved["nodes"]}
    for node_type in OUR_NODES:
        assert len(values[node_type]) == saved_value_count(info[node_type]), node_type
    assert values[BANK][2] == 1  # interval, as set: values did not shift

    prompt = page.js("async () => (await app.graphToPrompt()).output")
    for node in prompt.values():
        if node["class_type"] in OUR_NODES:
            allowed = {name for section in info[node["class_type"]]["input"].values()
                       for name in section}  # fmt: skip
            assert set(node["inputs"]) <= allowed, node

    page.js("async (workflow) => { await app.loadGraphData(workflow); }", saved)
    reloaded = page.js(
        f"""() => [t.widget("{BANK}", "interval").value, t.widget("{BANK}", "name").value,
                   t.status("{SAMPLER}"), t.widget("{SAMPLER}", "prompt").value]"""
    )
    bank_values = values[BANK]
    assert reloaded[:2] == [bank_values[2], bank_values[3]]
    assert reloaded[2] == ""  # a fresh, empty status box, not a saved value
    assert reloaded[3] == values[SAMPLER][0]
    # The bank outlives the page: the opened workflow's bank node shows what it holds now.
    page.wait_status(BANK, server.get("/streamv2v/banks")[bank_values[3]]["text"])
    assert page.ours() == []


@contextmanager
def tab_with(browser: Any, server: ComfyServer, setting: str) -> Iterator[Page]:
    """A tab opened with a frontend setting on, which the other tests keep off."""
    server.post(f"/settings/{setting}", True)
    tab = Page(browser, server)
    try:
        yield tab
    finally:
        tab.close()
        server.post(f"/settings/{setting}", False)


def test_template_offers_its_missing_models_for_download(browser: Any, server) -> None:
    with tab_with(browser, server, MISSING_MODELS_SETTING) as tab:
        tab.load_template()
        offered = tab.missing_models()
    # The server has tiny stand-ins under other names, and TAESD under its own: these two miss.
    assert offered == {
        "checkpoints / DreamShaper_8_pruned.safetensors",
        "loras / lcm-lora-sdv1-5.safetensors",
    }


def test_side_panel_leaves_the_status_box_on_its_node(browser: Any, server) -> None:
    """Newer frontends list the selected node's widgets in a side panel too. The one status box
    cannot be in both places: drawn in the panel as well, it took the panel's width on the node."""
    with tab_with(browser, server, SIDE_PANEL_SETTING) as tab:
        tab.js(
            "(type) => { const node = LiteGraph.createNode(type); node.pos = [300, 200]; "
            "app.graph.add(node); app.canvas.selectNode(node); }",
            BANK,
        )
        panel = tab.page.locator(SIDE_PANEL)
        try:
            panel.get_by_role("button", name=RESET, exact=True).wait_for(timeout=5000)
        except sync_api.TimeoutError:
            pytest.skip("this frontend has no side panel for a node's widgets (1.27)")
        tab.js("() => app.canvas.draw(true, true)")  # the box follows its widget on a redraw
        tab.page.wait_for_timeout(500)
        box, node = tab.js(
            """(type) => {
              const node = t.node(type), { ds } = app.canvas;
              const [x] = ds.convertOffsetToCanvas(node.pos);
              const left = app.canvas.canvas.getBoundingClientRect().left + x;
              const box = t.statusBox(type).getBoundingClientRect();
              return [[box.left, box.right], [left, left + node.size[0] * ds.scale]];
            }""",
            BANK,
        )
        assert node[0] <= box[0] < box[1] <= node[1], (box, node)
        assert tab.shown(BANK) == ""
        assert tab.ours() == []


def test_nodes_2_0_show_the_status_and_the_reset_button(browser: Any, server) -> None:
    """The frontend's DOM-drawn nodes ("Nodes 2.0", a setting) carry the same controls."""
    with tab_with(browser, server, NODES_2_0_SETTING) as tab:
        tab.load_template()
        note = tab.js(
            """() => [...document.querySelectorAll(
                `[data-node-id="${app.graph.nodes.find((n) => n.type === "Note").id}"] textarea`
              )].map((e) => e.value)"""
        )
        if not any(text.startswith("StreamV2V") for text in note):
            pytest.skip("this frontend's Nodes 2.0 does not draw text widgets yet (1.27)")
        bank = f"browser-{uuid.uuid4().hex[:8]}"
        tab.prepare(bank)
        status = tab.run()
        assert absorbed(status) > 0
        tab.page.get_by_role("button", name=RESET, exact=True).click()
        tab.page.wait_for_function(f"() => !t.status('{BANK}').includes('stream:')")
        reset = tab.shown_in_node(BANK)
        assert "empty" in reset, reset
        assert tab.shown_in_node(SAMPLER) == reset  # its status began with the bank's old state
        for node_type in (BANK, SAMPLER):  # the status is shown, not an input to type into
            node_id = tab.js("(type) => t.node(type).id", node_type)
            box = tab.page.locator(f'[data-node-id="{node_id}"] textarea').last
            assert box.get_attribute("readonly") is not None, node_type
        sampler = tab.page.locator(f'[data-node-id="{tab.js(f"() => t.node({SAMPLER!r}).id")}"]')
        sampler.get_by_role("button", name=LIVE_BUTTON, exact=True).click()
        tab.page.wait_for_function(
            f"() => /^live: [0-9.]+ frames\\/s, ([3-9]|\\d\\d+) frames\\n/"
            f".test(t.status('{SAMPLER}') ?? '')",
            timeout=RUN_TIMEOUT_MS,
        )
        live = sampler.locator('img[alt="live output"]')
        assert live.is_visible() and live.get_attribute("src").startswith("blob:")
        sampler.get_by_role("button", name=re.compile(LIVE_BUTTON, re.I)).click()
        tab.page.wait_for_function(f"() => t.status('{SAMPLER}').startsWith('live stopped')")
        assert tab.ours() == []
