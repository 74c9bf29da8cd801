// ComfyUI-StreamV2V frontend: show what a bank holds, and reset it with a button.
//
// The pack's nodes send a status line in their UI output ("text"); ComfyUI does not display
// that by itself, so it goes into a read-only text box on the node. The bank lives on the
// server under its name, so "Reset bank" asks the server, and after each run the Feature Bank
// nodes ask again: the bank node runs before the sampler fills the bank, so its own output is
// one run behind.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const STATUS = "streamv2v_status";
const BANK = "StreamV2VFeatureBank";
const SHOWS_STATUS = new Set([
  BANK,
  "StreamV2VSampler",
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

function showStatus(node, text) {
  const widget = node.widgets?.find((w) => w.name === STATUS);
  if (!widget) return;
  widget.value = text;
  node.setDirtyCanvas?.(true, true);
}

function bankName(node) {
  return node.widgets?.find((w) => w.name === "name")?.value ?? "";
}

async function resetBank(node) {
  try {
    const response = await api.fetchApi("/streamv2v/bank/reset", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ name: bankName(node) }),
    });
    const body = await response.json();
    showStatus(node, body.error ? `reset failed: ${body.error}` : body.text);
  } catch (error) {
    showStatus(node, `reset failed: ${error}`);
  }
}

async function refreshBanks() {
  const nodes = app.graph.nodes.filter((node) => node.comfyClass === BANK);
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

app.registerExtension({
  name: "StreamV2V.Nodes",
  setup() {
    api.addEventListener("execution_success", refreshBanks);
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
      }
      addStatus(this);
      this.setSize(this.computeSize());
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.text?.length) showStatus(this, message.text.join("\n"));
    };
  },
});
