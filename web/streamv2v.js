// ComfyUI-StreamV2V frontend: show what a bank holds, and reset it with a button.
//
// The pack's nodes send a status line in their UI output ("text"); ComfyUI does not display
// that by itself, so it goes into a read-only text box on the node. The bank lives on the
// server under its name, so "Reset bank" asks the server, and after each run the Feature Bank
// nodes ask again: the bank node runs before the sampler fills the bank, so its own output is
// one run behind. They ask too when their name or kind changes and when a workflow opens: the
// bank named then is another one, or has changed since the workflow was saved. The server
// writes every status (nodes/bank.py, describe()); this file only shows it.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const STATUS = "streamv2v_status";
const BANK = "StreamV2VFeatureBank";
const SAMPLER = "StreamV2VSampler";
const SHOWS_STATUS = new Set([
  BANK,
  SAMPLER,
  "StreamV2VFree",
  "StreamV2VTemporalConsistency",
]);

function addStatus(node) {
  // A multiline text box, as ComfyUI draws prompts: a disabled one-line widget would hide its
  // value, and a one-line one would cut the status off. Built here for node.addDOMWidget, the
  // public API, rather than by ComfyWidgets.STRING: scripts/widgets.js is internal (1.58 warns
  // on import) and may go. Nodes 2.0 has no control of its own for this widget type, so it shows
  // this very element; for "customtext" it would draw a box of its own that later values miss.
  const box = document.createElement("textarea");
  box.className = "comfy-multiline-input"; // the look of the frontend's own prompt boxes
  box.readOnly = true;
  box.rows = 4; // Nodes 2.0 sizes the box by its rows (the canvas sizes it itself)
  box.placeholder = "status: shown after a run";
  box.setAttribute("aria-label", "status"); // named, though no label is drawn beside it
  box.style.opacity = 0.7;
  // The wheel over it moves the canvas, as over the frontend's own text boxes, unless it scrolls.
  box.addEventListener("wheel", (event) => {
    if (event.ctrlKey || box.scrollHeight <= box.clientHeight) app.canvas.processMouseWheel(event);
  });
  const widget = node.addDOMWidget(STATUS, "streamv2v_status", box, {
    getValue: () => box.value,
    setValue: (text) => {
      box.value = text ?? "";
    },
    serialize: false, // not an input of the queued prompt
    hideInPanel: true, // newer frontends' side panel would only pull the element off the node
  });
  widget.label = "status";
  widget.serialize = false; // not in the saved widgets_values: saved workflows stay loadable
}

function findWidget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function showStatus(node, text) {
  const widget = findWidget(node, STATUS);
  if (!widget) return;
  node.streamv2vAsking = null; // an answer to askBank still on its way is older than this
  widget.value = text;
  node.setDirtyCanvas?.(true, true);
}

function widgetValue(node, name) {
  return findWidget(node, name)?.value;
}

function bankName(node) {
  return widgetValue(node, "name") ?? "";
}

// Every node of the workflow, those inside subgraphs too (kept on the root graph by frontends
// that have them).
function allNodes() {
  const graphs = [app.graph, ...(app.graph?.subgraphs?.values() ?? [])];
  return graphs.flatMap((graph) => graph?.nodes ?? []);
}

async function resetBank(node) {
  const name = bankName(node).trim(); // the server trims it too
  try {
    const response = await api.fetchApi("/streamv2v/bank/reset", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ name }),
    });
    const body = await response.json();
    if (body.error) {
      showStatus(node, `reset failed: ${body.error}`);
      return;
    }
    // Every status naming this bank is out of date now: this node's, another Feature Bank node's
    // of that name, and a sampler's that ran on it (its status begins with the bank's state,
    // and its run's notes went with the stream). Samplers are matched by the bank's name, as
    // the server keeps banks: a link would miss reroutes, and bank nodes renamed since.
    for (const other of allNodes()) {
      const named = other.comfyClass === BANK ? bankName(other).trim() : other.streamv2vBank;
      if (other === node || named === name) showStatus(other, body.text);
    }
  } catch (error) {
    showStatus(node, `reset failed: ${error}`);
  }
}

// Show what the bank a Feature Bank node names now holds, as its next run will use it.
async function askBank(node) {
  const asking = {};
  node.streamv2vAsking = asking;
  const kind = widgetValue(node, "kind") ?? "";
  const query = new URLSearchParams({ name: bankName(node), kind });
  try {
    const body = await (await api.fetchApi(`/streamv2v/bank?${query}`)).json();
    // Typing a name asks at each key, and a run's status may come meanwhile: the last wins.
    if (node.streamv2vAsking === asking) showStatus(node, body.error ?? body.text);
  } catch (error) {
    console.warn("StreamV2V: could not read the bank", error);
  }
}

async function refreshBanks() {
  const nodes = allNodes().filter((node) => node.comfyClass === BANK);
  if (!nodes.length) return;
  try {
    const banks = await (await api.fetchApi("/streamv2v/banks")).json();
    for (const node of nodes) {
      const bank = banks[bankName(node).trim()];
      if (bank) showStatus(node, bank.text);
    }
  } catch (error) {
    console.warn("StreamV2V: could not read the banks", error);
  }
}

// Ask again when the user names another bank or picks another kind; the widget's own callback
// (the frontend's, or another extension's) still runs first.
function askOnChange(node, name) {
  const widget = findWidget(node, name);
  if (!widget) return;
  const callback = widget.callback;
  widget.callback = function () {
    const result = callback?.apply(this, arguments);
    askBank(node);
    return result;
  };
}

// The live camera. A queued run per webcam frame (Run (Instant)) pays ComfyUI's own work around
// every run; "Live camera" on a sampler streams this browser's camera to the server instead
// (nodes/live.py), which continues the stream of the sampler's last run on its bank with that
// run's settings, and shows each restyled frame on the node. Two frames at most are out at a
// time, so the camera's frames never queue up behind the GPU: the rest are not sent.
const LIVE = "streamv2v_live";
const LIVE_BUTTON = "Live camera";
const RECORD_BUTTON = "Record";
const IN_FLIGHT = 2;

// The bank the sampler's next run would use: its Feature Bank node's name, or the one its last
// run reported (a name that comes from another node).
function samplerBank(node) {
  const slot = node.findInputSlot?.("bank") ?? -1;
  const source = slot >= 0 ? node.getInputNode?.(slot) : null;
  if (source?.comfyClass === BANK) return bankName(source).trim();
  return node.streamv2vBank ?? "";
}

function liveView(node) {
  let widget = findWidget(node, LIVE);
  if (!widget) {
    const image = document.createElement("img");
    image.alt = "live output";
    image.style.cssText = "width:100%;height:100%;object-fit:contain;background:rgba(0,0,0,0.25)";
    image.title = "Click: the live view in a window of its own (for a screen capture, e.g. OBS)";
    image.addEventListener("click", () => popOut(node, image));
    widget = node.addDOMWidget(LIVE, LIVE, image, {
      serialize: false,
      hideInPanel: true,
      getMinHeight: () => 192,
    });
    widget.serialize = false;
    node.setSize([node.size[0], node.computeSize()[1]]);
  }
  return widget.element;
}

// The live view alone in a window, which a streaming program can capture; it follows the node's.
function popOut(node, image) {
  const [width, height] = [image.naturalWidth || 512, image.naturalHeight || 384];
  const scale = Math.max(1, 256 / width); // a tiny test frame still gets a usable window
  const size = `width=${Math.round(width * scale)},height=${Math.round(height * scale)}`;
  const view = window.open("", `streamv2v-live-${node.id}`, `popup,${size}`);
  if (!view) {
    showStatus(node, "live: the browser blocked the window: allow pop-ups for ComfyUI");
    return;
  }
  view.document.title = "StreamV2V live";
  view.document.body.style.cssText = "margin:0;background:#000;overflow:hidden";
  const copy = view.document.createElement("img");
  copy.alt = "live output";
  copy.style.cssText = "width:100vw;height:100vh;object-fit:contain";
  copy.src = image.src;
  view.document.body.replaceChildren(copy);
  node.streamv2vWindow = copy;
}

function liveURL(name) {
  const route = api.apiURL(`/streamv2v/live?${new URLSearchParams({ name })}`);
  return `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}${route}`;
}

// Browsers give a camera only to secure pages: localhost, or https.
const SECURE_ONLY =
  "the browser gives a camera only to pages on localhost or https: open ComfyUI as " +
  "http://localhost:<port> on the machine it runs on, or serve it over https (ComfyUI's " +
  "--tls-keyfile and --tls-certfile)";

// What to do when the browser gives no camera, by the reason getUserMedia names.
function cameraProblem(error) {
  const again = "then press Live camera again";
  switch (error?.name) {
    case "NotAllowedError": // refused, now or before, or dismissed
      return (
        "the camera is not allowed on this page: allow it (the icon at the left of the " +
        `address bar), ${again}`
      );
    case "NotFoundError":
      return `this browser finds no camera: connect one (or start a virtual camera), ${again}`;
    case "NotReadableError":
      return `the camera would not start: another program may be using it; close that, ${again}`;
    default:
      return `the camera failed (${error?.name}: ${error?.message})`;
  }
}

async function openCamera(width, height) {
  const stream = await navigator.mediaDevices.getUserMedia({
    video: { width: { ideal: width }, height: { ideal: height } },
    audio: false,
  });
  const video = document.createElement("video");
  video.muted = true;
  video.playsInline = true;
  video.srcObject = stream;
  await video.play();
  return video;
}

// When the current queued run began: a live camera that the run ended goes on after it.
let runStarted = Infinity;

// End the node's live camera (``live``: only if it is still that one, not a later one).
function stopLive(node, text, live = node.streamv2vLive) {
  if (!live || node.streamv2vLive !== live) return;
  node.streamv2vLive = null;
  live.stopped = true;
  live.socket.close();
  live.video?.srcObject?.getTracks().forEach((track) => track.stop());
  findWidget(node, LIVE_BUTTON).label = LIVE_BUTTON;
  findWidget(node, RECORD_BUTTON).label = RECORD_BUTTON;
  // The server finishes the file when the connection ends (none without a frame).
  if (text && live.recording && live.frames > live.recordedFrom) {
    text += `; finishing the recording ${live.recording}`;
  }
  if (text && live.note) text += `\n${live.note.trim()}`;
  if (text) showStatus(node, text);
  node.setDirtyCanvas?.(true, true);
}

function startLive(node) {
  const name = samplerBank(node);
  if (!name) {
    showStatus(node, "live: connect a Feature Bank and run the workflow once first");
    return;
  }
  if (!navigator.mediaDevices?.getUserMedia) {
    showStatus(node, `live: no camera on this page: ${SECURE_ONLY}`);
    return;
  }
  const live = {
    bank: name,
    socket: new WebSocket(liveURL(name)),
    inFlight: 0,
    frames: 0,
    urls: [],
    stopped: false,
    recordOn: false, // Record pressed (and not pressed again)
    recording: null, // the file being written, while recording
    recordedFrom: 0, // the frames shown when it began
    note: "", // what the last recording kept
  };
  node.streamv2vLive = live;
  findWidget(node, LIVE_BUTTON).label = "Stop live camera";
  showStatus(node, `live: connecting to bank '${name}'`);
  const canvas = document.createElement("canvas");
  const image = liveView(node);
  const send = () => {
    if (live.stopped || live.inFlight >= IN_FLIGHT) return;
    live.inFlight += 1;
    canvas.getContext("2d").drawImage(live.video, 0, 0, canvas.width, canvas.height);
    canvas.toBlob((blob) => live.stopped || live.socket.send(blob), "image/jpeg", 0.9);
  };
  const tick = () => {
    if (live.stopped) return;
    send();
    // Each new camera frame; a browser without the callback (Firefox before 132) polls instead.
    if (live.video.requestVideoFrameCallback) live.video.requestVideoFrameCallback(tick);
    else setTimeout(tick, 1000 / 30);
  };
  live.socket.onmessage = async (event) => {
    if (live.stopped) return;
    if (event.data instanceof Blob) {
      live.inFlight -= 1;
      live.frames += 1;
      const url = URL.createObjectURL(event.data);
      image.src = url;
      const view = node.streamv2vWindow;
      if (view?.ownerDocument.defaultView && !view.ownerDocument.defaultView.closed) view.src = url;
      // Revoked a frame later, once the pop-out's copy has surely loaded it too.
      live.urls.push(url);
      if (live.urls.length > 2) URL.revokeObjectURL(live.urls.shift());
      return;
    }
    const message = JSON.parse(event.data);
    if (message.type === "error") {
      stopLive(node, `live stopped: ${message.text}`, live);
      node.streamv2vLiveEnded = { bank: live.bank, at: Date.now() }; // see liveAfterRun
    } else if (message.type === "ready" || message.type === "size") {
      if (message.type === "size") live.inFlight -= 1;
      canvas.width = message.width;
      canvas.height = message.height;
      if (live.video) return;
      try {
        live.video = await openCamera(message.width, message.height);
      } catch (error) {
        stopLive(node, `live: ${cameraProblem(error)}`, live);
        return;
      }
      if (live.stopped) {
        // stopped while the camera opened
        live.video.srcObject.getTracks().forEach((track) => track.stop());
        return;
      }
      // Named, so that a user with several sees which one (the browser's camera icon picks).
      const camera = live.video.srcObject.getVideoTracks()[0]?.label || "camera";
      const size = `${message.width}x${message.height}`;
      showStatus(node, `live: bank '${name}', ${size}, ${camera}\n${message.text}`);
      tick();
    } else if (message.type === "status") {
      const rate = message.fps ? `${message.fps.toFixed(1)} frames/s, ` : "";
      const note = live.recording ? `recording ${live.recording}\n` : live.note;
      showStatus(node, `live: ${rate}${live.frames} frames\n${note}${message.text}`);
    } else if (message.type === "recording") {
      live.recording = message.file;
      live.recordedFrom = live.frames;
      findWidget(node, RECORD_BUTTON).label = "Stop recording";
      showStatus(node, `live: recording ${message.file}`);
    } else if (message.type === "recorded") {
      live.recording = null;
      if (message.error) live.recordOn = false; // stopped by the server: press Record again
      findWidget(node, RECORD_BUTTON).label = live.recordOn ? "Stop recording" : RECORD_BUTTON;
      live.note = `${recordedText(message)}\n`;
      showStatus(node, `live: ${recordedText(message)}`);
    }
  };
  live.socket.onclose = () => stopLive(node, `live stopped after ${live.frames} frames`, live);
  live.socket.onerror = () => stopLive(node, "live: the connection to ComfyUI failed", live);
}

// What a finished recording holds, or why it stopped.
function recordedText(message) {
  const left = message.dropped ? `, ${message.dropped} left out to keep up` : "";
  const kept = message.file
    ? `saved ${message.file} (${message.frames} frames, ${message.seconds.toFixed(1)} s${left})`
    : "the recording stopped before any frame: nothing saved";
  return message.error ? `${message.error}; ${kept}` : kept;
}

// Record (a button): the live frames, as shown, into a video file on the server.
function toggleRecording(node) {
  const live = node.streamv2vLive;
  if (!live || live.socket.readyState !== WebSocket.OPEN) {
    showStatus(node, "record: press Live camera first (Record keeps the live frames in a video)");
    return;
  }
  live.recordOn = !live.recordOn; // as pressed, before the server's answer comes
  live.socket.send(JSON.stringify({ type: "record", on: live.recordOn }));
  findWidget(node, RECORD_BUTTON).label = live.recordOn ? "Stop recording" : RECORD_BUTTON;
}

// After the sampler's run: the live camera follows the run's bank, and goes on when the run
// ended it (a new model or LoRA releases the old one, and the stream with it).
function liveAfterRun(node, bank) {
  const live = node.streamv2vLive;
  const ended = node.streamv2vLiveEnded;
  node.streamv2vLiveEnded = null;
  const again = live ? live.bank !== bank : ended?.bank === bank && ended.at >= runStarted;
  if (!again) return;
  const recording = live?.recording;
  stopLive(node, null, live); // nothing when it had ended
  startLive(node);
  if (recording) {
    node.streamv2vLive.note =
      `the recording ${recording} ended when the run restarted the camera: press Record again\n`;
  }
}

app.registerExtension({
  name: "StreamV2V.Nodes",
  setup() {
    api.addEventListener("execution_success", refreshBanks);
    api.addEventListener("execution_start", () => (runStarted = Date.now()));
  },
  loadedGraphNode(node) {
    // Banks outlive the page: an opened workflow's bank may hold a stream, or be gone.
    if (node.comfyClass === BANK) askBank(node);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!SHOWS_STATUS.has(nodeData.name)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      if (nodeData.name === BANK) {
        const button = this.addWidget("button", "Reset bank", null, () => resetBank(this), {
          serialize: false,
        });
        button.serialize = false;
        askOnChange(this, "name");
        askOnChange(this, "kind");
      }
      if (nodeData.name === SAMPLER) {
        const button = this.addWidget(
          "button",
          LIVE_BUTTON,
          null,
          () => (this.streamv2vLive ? stopLive(this, "live stopped") : startLive(this)),
          { serialize: false },
        );
        button.serialize = false;
        const record = this.addWidget("button", RECORD_BUTTON, null, () => toggleRecording(this), {
          serialize: false,
        });
        record.serialize = false;
        const onRemoved = this.onRemoved;
        this.onRemoved = function () {
          stopLive(this);
          return onRemoved?.apply(this, arguments);
        };
      }
      addStatus(this);
      this.setSize(this.computeSize());
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.text?.length) showStatus(this, message.text.join("\n"));
      if (message?.bank?.length) {
        this.streamv2vBank = message.bank[0]; // for resetBank
        if (nodeData.name === SAMPLER) liveAfterRun(this, message.bank[0]);
      }
    };
  },
});
