// Room Classifier page: add photos (drop, pick, paste, URL), send them to /classify or /classify_batch,
// show each answer next to its photo, download the gallery as CSV. With "Why?" on, requests ask for
// explain=true and each photo's heatmap (the API's 0..1 grid over its crop box) is drawn on a canvas over the
// thumbnail, where the thumbnail shows that part of the photo.
// Every string from the service or the user goes into the page as text (textContent), never as HTML,
// and no handler is inline: the page's Content-Security-Policy allows scripts from this origin only.
"use strict";

(function () {
  const CSV_NAME = "room-classes.csv";

  const state = {
    labels: [], // the model's labels, in the model's order: the order of the bars and of the CSV columns
    maxPerRequest: 1, // until /health gives RC_MAX_IMAGES_PER_REQUEST: one photo a request is always within it
    entries: [], // one per photo: {name, source, file, url, card, objectUrl, result, error}
    busy: 0,
    canExplain: false, // /health's `explain`: the model has activation maps
    why: false, // the "Why?" toggle: ask for heatmaps and show them
  };

  const byId = (id) => document.getElementById(id);

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // "other" is the model's answer for a photo that shows none of the rooms (a house front, a yard, a hallway)
  const OTHER_LABEL = "other";
  const readable = (label) => (String(label) === OTHER_LABEL ? "not one of the four rooms"
                                                             : String(label).replace(/_/g, " "));
  const capitalised = (text) => text.charAt(0).toUpperCase() + text.slice(1);
  const percent = (p) => (p * 100).toFixed(1) + "%";

  // ---- the service's status and limits ---------------------------------------------------------------

  async function loadHealth() {
    const status = byId("service-status");
    let body = null;
    try {
      const response = await fetch("health", { headers: { Accept: "application/json" } });
      body = await response.json();
    } catch (err) {
      status.textContent = "The service cannot be reached right now; photos added now will get an error.";
      status.classList.add("bad");
      return;
    }
    if (!body || body.status !== "ok") {
      const why = body && body.error ? body.error : "not ready";
      status.textContent = "The service is not ready (" + why + "); photos added now will get an error.";
      status.classList.add("bad");
      return;
    }
    state.labels = Array.isArray(body.labels) ? body.labels.map(String) : [];
    const config = body.config || {};
    if (Number.isInteger(config.max_images_per_request) && config.max_images_per_request > 0) {
      state.maxPerRequest = config.max_images_per_request;
    }
    if (typeof config.uncertain_threshold === "number") {
      byId("threshold-input").value = String(config.uncertain_threshold);
    }
    if (config.api_key_required === true) showKeyBox();
    if (config.url_fetch === false) {
      byId("url-input").disabled = true;
      byId("url-form").querySelector("button").disabled = true;
      byId("url-problem").textContent = "This service accepts uploads only (image URLs are turned off).";
    }
    state.canExplain = body.explain === true;
    byId("why-toggle").disabled = !state.canExplain;
    byId("why-hint").textContent = state.canExplain
      ? "Colours each photo where the model found what it answered (the top room; both rooms when not sure)."
      : "This model cannot show why (it was exported without activation maps).";
    status.textContent = "Ready: model " + body.model + " (" + state.labels.map(readable).join(", ") + ").";
    byId("limit-hint").textContent = "Up to " + state.maxPerRequest + " photos go in one request " +
      "(a listing's gallery); more are sent in groups of " + state.maxPerRequest + ".";
  }

  // ---- the API key, where the server needs one -------------------------------------------------------
  // It lives in the field only (this tab's memory): never in storage, cookies, the URL or the CSV.

  function showKeyBox() {
    byId("key-box").hidden = false;
  }

  function keyHeaders() {
    const key = byId("api-key-input").value.trim();
    return key ? { Authorization: "Bearer " + key } : {};
  }

  // ---- adding photos ---------------------------------------------------------------------------------

  function addFiles(fileList) {
    const files = Array.from(fileList || []);
    if (!files.length) return;
    const entries = files.map((file) => newEntry({
      name: file.name || "pasted image", source: "file", file: file,
    }));
    classifyAll(entries);
  }

  function addUrls(urls) {
    if (!urls.length) return;
    classifyAll(urls.map((url) => newEntry({ name: url, source: "url", url: url })));
  }

  function httpUrl(text) {
    try {
      const url = new URL(text.trim());
      return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
    } catch (err) {
      return null;
    }
  }

  function urlsIn(text) {
    return String(text || "").split(/\s+/).map(httpUrl).filter(Boolean);
  }

  function wireInputs() {
    const fileInput = byId("file-input");
    fileInput.addEventListener("change", () => {
      addFiles(fileInput.files);
      fileInput.value = ""; // the same photo can be picked again
    });

    const zone = byId("drop-zone");
    let depth = 0; // dragenter/dragleave fire for every child element
    document.addEventListener("dragenter", (event) => {
      event.preventDefault();
      depth += 1;
      zone.classList.add("dragging");
    });
    document.addEventListener("dragleave", () => {
      depth = Math.max(0, depth - 1);
      if (depth === 0) zone.classList.remove("dragging");
    });
    document.addEventListener("dragover", (event) => event.preventDefault()); // allow a drop anywhere
    document.addEventListener("drop", (event) => {
      event.preventDefault(); // never navigate away to the dropped file
      depth = 0;
      zone.classList.remove("dragging");
      const data = event.dataTransfer;
      if (!data) return;
      if (data.files && data.files.length) {
        addFiles(data.files);
      } else {
        addUrls(urlsIn(data.getData("text/uri-list") || data.getData("text/plain")));
      }
    });

    document.addEventListener("paste", (event) => {
      const data = event.clipboardData;
      if (!data) return;
      if (data.files && data.files.length) {
        event.preventDefault();
        addFiles(data.files);
        return;
      }
      const target = event.target;
      if (target instanceof HTMLInputElement) return; // ordinary paste into a text field
      const urls = urlsIn(data.getData("text/plain"));
      if (urls.length) {
        event.preventDefault();
        addUrls(urls);
      }
    });

    byId("url-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const input = byId("url-input");
      const problem = byId("url-problem");
      const url = httpUrl(input.value);
      if (!url) {
        problem.textContent = "Enter a full http:// or https:// address of an image.";
        input.setAttribute("aria-invalid", "true");
        input.focus();
        return;
      }
      problem.textContent = "";
      input.removeAttribute("aria-invalid");
      input.value = "";
      addUrls([url]);
    });

    byId("why-toggle").addEventListener("change", (event) => setWhy(event.target.checked));
    byId("download-csv").addEventListener("click", downloadCsv);
    byId("clear-results").addEventListener("click", clearResults);
  }

  // ---- asking the service ----------------------------------------------------------------------------

  function threshold() {
    const value = byId("threshold-input").valueAsNumber;
    return Number.isFinite(value) && value >= 0 && value <= 1 ? value : null;
  }

  function chunks(items, size) {
    const out = [];
    for (let i = 0; i < items.length; i += size) out.push(items.slice(i, i + size));
    return out;
  }

  async function classifyAll(entries) {
    state.busy += entries.length;
    updateProgress();
    for (const chunk of chunks(entries, state.maxPerRequest)) {
      await classifyChunk(chunk); // one request at a time: a gallery must not trip the service's overload guard
      state.busy -= chunk.length;
      updateProgress();
    }
  }

  // A chunk holds only files or only URLs (one add action): files go as multipart, URLs as JSON.
  function requestFor(chunk) {
    const limit = threshold();
    const single = chunk.length === 1;
    const path = single ? "classify" : "classify_batch"; // relative: works behind a path prefix too
    if (chunk[0].source === "file") {
      const form = new FormData();
      for (const entry of chunk) form.append(single ? "image" : "images", entry.file, entry.file.name || "image");
      if (limit !== null) form.append("threshold", String(limit));
      if (state.why) form.append("explain", "true");
      return { path: path, init: { method: "POST", headers: keyHeaders(), body: form } };
    }
    const body = single ? { image_url: chunk[0].url } : { image_urls: chunk.map((entry) => entry.url) };
    if (limit !== null) body.threshold = limit;
    if (state.why) body.explain = true;
    return {
      path: path,
      init: {
        method: "POST",
        headers: Object.assign({ "Content-Type": "application/json" }, keyHeaders()),
        body: JSON.stringify(body),
      },
    };
  }

  async function readJson(response) {
    try {
      return await response.json();
    } catch (err) {
      return null;
    }
  }

  function errorOf(response, body) {
    if (body && body.error && typeof body.error === "object" && body.error.code) {
      return { code: String(body.error.code), message: String(body.error.message || "") };
    }
    return { code: "http_" + response.status, message: response.statusText || "unexpected answer from the service" };
  }

  async function classifyChunk(chunk) {
    const request = requestFor(chunk);
    let response;
    try {
      response = await fetch(request.path, request.init);
    } catch (err) {
      const error = { code: "network_error", message: "the service could not be reached (" + err.message + ")" };
      chunk.forEach((entry) => showError(entry, error));
      return;
    }
    const body = await readJson(response);
    if (response.status === 401) {
      showKeyBox(); // the server asks for a key: show where to give it
      byId("api-key-input").focus();
    }
    if (!response.ok || body === null) {
      const error = errorOf(response, body); // a request-level refusal belongs to every photo in it
      chunk.forEach((entry) => showError(entry, error));
      return;
    }
    if (request.path === "classify") {
      showResult(chunk[0], body);
      return;
    }
    for (const item of body.results || []) {
      const match = /\[(\d+)\]$/.exec(String(item.input)); // "images[3]" / "image_urls[0]"
      const entry = match ? chunk[Number(match[1])] : undefined;
      if (!entry) continue;
      if (item.result) showResult(entry, item.result);
      else showError(entry, item.error || { code: "unknown", message: "no answer for this photo" });
    }
    chunk.filter((entry) => !entry.result && !entry.error).forEach((entry) => showError(entry, {
      code: "missing_answer", message: "the service answered without this photo",
    }));
  }

  // ---- showing answers -------------------------------------------------------------------------------

  function newEntry(fields) {
    const entry = Object.assign({ result: null, error: null, objectUrl: null }, fields);
    const card = element("li", "card");
    card.dataset.state = "pending";
    const thumb = element("div", "thumb");
    if (entry.file) {
      entry.objectUrl = URL.createObjectURL(entry.file);
      const img = element("img");
      img.alt = "Photo " + entry.name;
      img.src = entry.objectUrl;
      img.addEventListener("error", () => thumb.replaceChildren(element("span", "thumb-placeholder", "No preview")));
      thumb.append(img);
    } else {
      // The browser never loads the URL itself (the CSP allows this origin only); the service fetches it.
      thumb.append(element("span", "thumb-placeholder", "Photo from a URL"));
    }
    // head: name and verdict beside the thumbnail; details: bars or error, full width on a phone
    entry.head = element("div", "card-head");
    entry.details = element("div", "card-details");
    entry.head.append(element("h3", "photo-name", entry.name), element("p", "pending", "Classifying…"));
    card.append(thumb, entry.head, entry.details);
    entry.card = card;
    byId("results").append(card);
    state.entries.push(entry);
    updateButtons();
    return entry;
  }

  function barOrder(result) {
    const returned = result.probabilities.map((pair) => String(pair[0]));
    const known = state.labels.length === returned.length && returned.every((label) => state.labels.includes(label));
    return known ? state.labels : returned;
  }

  function showResult(entry, result) {
    entry.result = result;
    entry.card.dataset.state = "done";
    const probability = new Map(result.probabilities.map((pair) => [String(pair[0]), Number(pair[1])]));
    const label = String(result.class);

    const verdict = element("p", "verdict");
    verdict.append(element("span", "class-name", capitalised(readable(label))), " ",
                   element("span", "confidence", percent(Number(result.confidence))));
    const head = [element("h3", "photo-name", entry.name), verdict];
    if (result.uncertain) {
      const [first, second] = result.probabilities;
      const guess = second ? readable(first[0]) + " or " + readable(second[0]) : readable(first[0]);
      head.push(element("p", "uncertain", "Not sure: " + guess + "?"));
    }
    const bars = element("ul", "bars");
    bars.setAttribute("aria-label", "Probability of each answer");
    for (const name of barOrder(result)) {
      const p = probability.get(name) || 0;
      const bar = element("li", name === label ? "bar top" : "bar");
      bar.dataset.label = name;
      const track = element("span", "bar-track");
      track.setAttribute("aria-hidden", "true");
      const fill = element("span", "bar-fill");
      fill.style.width = (p * 100) + "%"; // CSSOM, allowed by the CSP (style attributes in markup are not)
      track.append(fill);
      bar.append(element("span", "bar-label", readable(name)), track, element("span", "bar-value", percent(p)));
      bars.append(bar);
    }
    entry.head.replaceChildren(...head);
    entry.details.replaceChildren(bars, element("p", "model-tag", "Model: " + result.model));
    if (result.heatmap && entry.file) showHeatmap(entry, 0); // a URL's photo has no thumbnail to draw on
  }

  // ---- why: heatmaps over the thumbnails -------------------------------------------------------------

  // 0..1 -> colour: transparent where nothing came from, through yellow to red where most of the answer did.
  function heatColour(value) {
    const v = Math.min(1, Math.max(0, Number(value) || 0));
    return [255, Math.round(230 * (1 - v)), 0, Math.round(255 * 0.7 * v)];
  }

  function setWhy(on) {
    state.why = on && state.canExplain;
    byId("results").classList.toggle("show-why", state.why);
    byId("why-legend").hidden = !state.why;
    if (!state.why) return;
    // photos answered without a heatmap are asked again, with explain=true
    const missing = state.entries.filter((entry) => entry.result && !entry.result.heatmap);
    const groups = [missing.filter((entry) => entry.file), missing.filter((entry) => !entry.file)];
    groups.filter((group) => group.length).forEach((group) => classifyAll(group));
  }

  function drawLegend() {
    const canvas = byId("why-legend-bar");
    const context = canvas.getContext("2d");
    for (let x = 0; x < canvas.width; x += 1) {
      const [r, g, b, a] = heatColour(x / (canvas.width - 1));
      context.fillStyle = "rgba(" + r + "," + g + "," + b + "," + (a / 255) + ")";
      context.fillRect(x, 0, 1, canvas.height);
    }
  }

  // Where the crop box lands in the thumbnail: the image is scaled to cover the square and centred.
  function boxInThumb(heatmap, width, height) {
    const [photoWidth, photoHeight] = heatmap.image_size;
    const scale = Math.max(width / photoWidth, height / photoHeight);
    const dx = (width - photoWidth * scale) / 2;
    const dy = (height - photoHeight * scale) / 2;
    const [left, top, right, bottom] = heatmap.crop_box;
    return { x: dx + left * scale, y: dy + top * scale, w: (right - left) * scale, h: (bottom - top) * scale };
  }

  function gridImage(grid) {
    const rows = grid.length;
    const cols = rows ? grid[0].length : 0;
    const cells = document.createElement("canvas");
    cells.width = cols;
    cells.height = rows;
    const pixels = cells.getContext("2d").createImageData(cols, rows);
    grid.forEach((row, y) => row.forEach((value, x) => pixels.data.set(heatColour(value), (y * cols + x) * 4)));
    cells.getContext("2d").putImageData(pixels, 0, 0);
    return cells;
  }

  function showHeatmap(entry, index) {
    const heatmap = entry.result.heatmap;
    const map = heatmap.maps[index];
    const thumb = entry.card.querySelector(".thumb");
    let canvas = thumb.querySelector("canvas.heat");
    if (!canvas) {
      canvas = element("canvas", "heat");
      canvas.setAttribute("aria-hidden", "true");
      thumb.append(canvas);
    }
    const width = thumb.clientWidth || 96;
    const height = thumb.clientHeight || 96;
    const ratio = window.devicePixelRatio || 1;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    canvas.dataset.label = String(map.class);
    const context = canvas.getContext("2d");
    context.clearRect(0, 0, canvas.width, canvas.height);
    context.imageSmoothingEnabled = true; // the grid's cells blend into a smooth map
    const box = boxInThumb(heatmap, width, height);
    context.drawImage(gridImage(map.grid), box.x * ratio, box.y * ratio, box.w * ratio, box.h * ratio);

    const caption = element("p", "why-caption", "Heatmap: why " + readable(map.class) + ".");
    if (heatmap.maps.length > 1) {
      const other = (index + 1) % heatmap.maps.length;
      const button = element("button", "button", "Show " + readable(heatmap.maps[other].class));
      button.type = "button";
      button.addEventListener("click", () => showHeatmap(entry, other));
      caption.append(button);
    }
    const old = entry.details.querySelector(".why-caption");
    if (old) old.replaceWith(caption);
    else entry.details.append(caption);
  }

  function showError(entry, error) {
    entry.error = error;
    entry.card.dataset.state = "error";
    const box = element("p", "error");
    box.append(element("strong", null, "Could not classify this photo. "),
               element("span", "error-code", error.code), ": ", element("span", "error-message", error.message));
    entry.head.replaceChildren(element("h3", "photo-name", entry.name));
    entry.details.replaceChildren(box);
  }

  function updateProgress() {
    const total = state.entries.length;
    const failed = state.entries.filter((entry) => entry.error).length;
    const done = state.entries.filter((entry) => entry.result).length;
    let text = total ? done + " of " + total + " photos classified" : "No photos yet";
    if (failed) text += ", " + failed + " could not be classified";
    if (state.busy) text += "; working on " + state.busy + "…";
    byId("progress").textContent = text + ".";
  }

  function updateButtons() {
    const empty = state.entries.length === 0;
    byId("download-csv").disabled = empty;
    byId("clear-results").disabled = empty;
  }

  function clearResults() {
    for (const entry of state.entries) if (entry.objectUrl) URL.revokeObjectURL(entry.objectUrl);
    state.entries = [];
    byId("results").replaceChildren();
    updateButtons();
    updateProgress();
  }

  // ---- CSV -------------------------------------------------------------------------------------------

  // Quotes when needed; a leading = + - @ gets a ' so a spreadsheet never runs a file name as a formula.
  function csvCell(value) {
    let text = value === null || value === undefined ? "" : String(value);
    if (/^[=+\-@\t\r]/.test(text)) text = "'" + text;
    return /[",\r\n]/.test(text) ? '"' + text.replace(/"/g, '""') + '"' : text;
  }

  function csvText() {
    const labels = state.labels.length ? state.labels
      : Array.from(new Set(state.entries.flatMap((e) => (e.result ? e.result.probabilities.map((p) => p[0]) : []))));
    const header = ["photo", "source", "class", "confidence", "uncertain"]
      .concat(labels.map((label) => "p_" + label), ["model", "error_code", "error_message"]);
    const rows = state.entries.map((entry) => {
      const result = entry.result;
      const probability = new Map(result ? result.probabilities.map((pair) => [String(pair[0]), pair[1]]) : []);
      return [entry.name, entry.source,
        result ? result.class : "", result ? result.confidence : "", result ? String(result.uncertain) : ""]
        .concat(labels.map((label) => (probability.has(label) ? probability.get(label) : "")),
                [result ? result.model : "", entry.error ? entry.error.code : "", entry.error ? entry.error.message : ""]);
    });
    return [header].concat(rows).map((row) => row.map(csvCell).join(",")).join("\r\n") + "\r\n";
  }

  function downloadCsv() {
    const url = URL.createObjectURL(new Blob([csvText()], { type: "text/csv" }));
    const link = element("a");
    link.href = url;
    link.download = CSV_NAME;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  wireInputs();
  drawLegend();
  loadHealth();
})();
