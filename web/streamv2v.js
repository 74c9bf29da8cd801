// ComfyUI-StreamV2V frontend: show what a bank holds, and reset it with a button.
//
// The Feature Bank and Stream Batch Sampler nodes send a status line in their UI output
// ("text"); ComfyUI does not display that by itself, so it goes into a read-only text box on
// the node. The bank lives on the server under its name, so "Reset bank" asks the server.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const STATUS = "streamv2v_status";
const SHOWS_STATUS = new Set([
  "StreamV2VFeatureBank",
  "StreamV2VSampler",
  "StreamV2VFree",
  "StreamV2VTemporalConsistency",
]);

function showStatus(node, text) {
  let widget = node.widgets?.find((w) => w.name === STATUS);
  if (!widget) {
    widget = node.addWidget("text", STATUS, "", () => {}, { serialize: false });
    widget.serialize = false; // never part of widgets_values: saved workflows stay loadable
    widget.disabled = true;
  }
  widget.value = text;
  node.setDirtyCanvas?.(true, true);
}

async function resetBank(node) {
  const name = node.widgets?.find((w) => w.name === "name")?.value ?? "";
  try {
    const response = await api.fetchApi("/streamv2v/bank/reset", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ name }),
    });
    const body = await response.json();
    showStatus(node, body.error ? `reset failed: ${body.error}` : body.text);
  } catch (error) {
    showStatus(node, `reset failed: ${error}`);
  }
}

app.registerExtension({
  name: "StreamV2V.Nodes",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (SHOWS_STATUS.has(nodeData.name)) {
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        onExecuted?.apply(this, arguments);
        if (message?.text?.length) showStatus(this, message.text.join("\n"));
      };
    }
    if (nodeData.name === "StreamV2VFeatureBank") {
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const result = onNodeCreated?.apply(this, arguments);
        const button = this.addWidget("button", "Reset bank", null, () => resetBank(this), {
          serialize: false,
        });
        button.serialize = false;
        return result;
      };
    }
  },
});
