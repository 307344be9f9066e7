// The draw-a-digit page: strokes on a canvas go to POST predict as a PNG, the answer fills
// the label and the ten bars. Plain browser APIs only: no build step, nothing fetched from
// elsewhere.
"use strict";

const THROTTLE_MS = 150; // at most one prediction per this while a stroke goes on
const LINE_WIDTH = 22; // on the 280-pixel canvas: about MNIST's stroke once scaled to 28

const pad = document.getElementById("pad");
const ctx = pad.getContext("2d");
const statusLine = document.getElementById("status");
const modelBadge = document.getElementById("model");
const labelView = document.getElementById("label");
const confidenceView = document.getElementById("confidence");
const bars = [...document.querySelectorAll("#bars li")];
const upload = document.getElementById("upload");
const keyForm = document.getElementById("key-form");
const keyInput = document.getElementById("key");

let apiKey = sessionStorage.getItem("mnistflow-api-key") || "";
let drawing = false;
let drawn = false; // something on the pad worth predicting
let last = null; // the previous pointer position in canvas pixels
let lastSent = 0;
let timer = null;
let inFlight = false;
let queued = null; // the newest request waiting for the one in flight
let generation = 0; // bumped by Clear, so late answers for a cleared pad are dropped
let lastRequest = null; // resent once an API key is entered

function setStatus(text, isError = false) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", isError);
}

function showModel(model) {
  if (model && model.name) {
    modelBadge.textContent = model.version ? `${model.name} v${model.version}` : model.name;
  }
}

function showPrediction(prediction) {
  const probabilities = prediction ? prediction.probabilities : null;
  // abstain: the model's confidence is under the threshold logged with it, so it says so
  // rather than show a digit it does not believe (a model without a threshold never does).
  const unsure = Boolean(prediction && prediction.abstain);
  const percent = prediction ? `${(probabilities[prediction.label] * 100).toFixed(1)}%` : "";
  labelView.textContent = prediction ? (unsure ? "?" : String(prediction.label)) : "–";
  labelView.classList.toggle("unsure", unsure);
  confidenceView.textContent = prediction
    ? unsure
      ? `not sure this is a digit (best guess ${prediction.label}, ${percent})`
      : `${percent} sure`
    : "";
  bars.forEach((bar, digit) => {
    const p = probabilities ? probabilities[digit] : 0;
    bar.style.setProperty("--p", p);
    bar.dataset.p = probabilities ? String(p) : "";
    bar.classList.toggle("top", Boolean(prediction) && digit === prediction.label);
    bar.querySelector(".pct").textContent = probabilities ? `${(p * 100).toFixed(p < 0.1 ? 1 : 0)}%` : "";
  });
}

function paintBackground() {
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, pad.width, pad.height);
}

function clearPad() {
  generation += 1;
  paintBackground();
  drawn = false;
  queued = null;
  clearTimeout(timer);
  timer = null;
  showPrediction(null);
  setStatus("Draw a digit with your mouse or finger.");
}

// -- drawing ---------------------------------------------------------------------------

function canvasPoint(event) {
  const box = pad.getBoundingClientRect();
  return {
    x: ((event.clientX - box.left) * pad.width) / box.width,
    y: ((event.clientY - box.top) * pad.height) / box.height,
  };
}

function stroke(from, to) {
  ctx.strokeStyle = "#fff";
  ctx.lineWidth = LINE_WIDTH;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.moveTo(from.x, from.y);
  ctx.lineTo(to.x, to.y);
  ctx.stroke();
}

pad.addEventListener("pointerdown", (event) => {
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);
  drawing = true;
  drawn = true;
  last = canvasPoint(event);
  stroke(last, last);
});

pad.addEventListener("pointermove", (event) => {
  if (!drawing) return;
  const point = canvasPoint(event);
  stroke(last, point);
  last = point;
  predictThrottled();
});

function endStroke() {
  if (!drawing) return;
  drawing = false;
  clearTimeout(timer);
  timer = null;
  predictPad();
}
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);

// -- predicting ------------------------------------------------------------------------

function predictThrottled() {
  const wait = THROTTLE_MS - (performance.now() - lastSent);
  if (wait <= 0) {
    predictPad();
  } else if (timer === null) {
    timer = setTimeout(() => {
      timer = null;
      predictPad();
    }, wait);
  }
}

function predictPad() {
  if (!drawn) return;
  const sentFor = generation;
  pad.toBlob((blob) => {
    if (blob && sentFor === generation) send(blob, "digit.png");
  }, "image/png");
}

async function send(blob, filename) {
  // One request at a time; while it runs only the newest picture waits.
  if (inFlight) {
    queued = { blob, filename };
    return;
  }
  inFlight = true;
  lastSent = performance.now();
  lastRequest = { blob, filename };
  const sentFor = generation;
  try {
    const form = new FormData();
    form.append("file", blob, filename);
    const headers = apiKey ? { "X-API-Key": apiKey } : {};
    const response = await fetch("predict", { method: "POST", body: form, headers });
    const body = await response.json().catch(() => ({}));
    if (sentFor !== generation) return;
    if (response.status === 401) {
      keyForm.hidden = false;
      keyInput.focus();
      setStatus(body.error || "This server needs an API key.", true);
    } else if (!response.ok) {
      showPrediction(null);
      setStatus(body.error || `The server answered ${response.status}.`, true);
    } else {
      showModel(body.model);
      showPrediction(body.predictions[0]);
      setStatus("");
    }
  } catch (error) {
    setStatus("Cannot reach the server.", true);
  } finally {
    inFlight = false;
    if (queued) {
      const next = queued;
      queued = null;
      send(next.blob, next.filename);
    }
  }
}

// -- buttons, upload, API key ------------------------------------------------------------

document.getElementById("clear").addEventListener("click", clearPad);

upload.addEventListener("change", () => {
  const file = upload.files[0];
  upload.value = ""; // choosing the same file again still fires "change"
  if (!file) return;
  clearPad();
  setStatus(`Classifying ${file.name}…`);
  send(file, file.name);
  // Show the picture on the pad (fitted, centred) so one sees what was classified.
  const url = URL.createObjectURL(file);
  const image = new Image();
  image.onload = () => {
    const scale = Math.min(pad.width / image.width, pad.height / image.height);
    const w = image.width * scale;
    const h = image.height * scale;
    ctx.drawImage(image, (pad.width - w) / 2, (pad.height - h) / 2, w, h);
    URL.revokeObjectURL(url);
  };
  image.src = url;
});

keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  apiKey = keyInput.value.trim();
  sessionStorage.setItem("mnistflow-api-key", apiKey);
  keyForm.hidden = true;
  setStatus("");
  if (lastRequest) send(lastRequest.blob, lastRequest.filename);
});

fetch("version")
  .then((response) => (response.ok ? response.json() : null))
  .then((model) => showModel(model))
  .catch(() => {});

clearPad();
