// tuneforge web UI: plain JS over the JSON endpoints of webui/app.py. Forms are drawn from /api/meta, so they
// always show the config's own keys and defaults; every check happens on the server, through the CLI's config gate.
"use strict";

const $ = (id) => document.getElementById(id);
let META = null;
let currentRun = null;
let pollTimer = null;
let history = [];

async function api(path, body) {
  const init = body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"},
                                         body: JSON.stringify(body)};
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({general: [response.statusText]}));
  return {ok: response.ok, data};
}

// ---- forms -------------------------------------------------------------------------------------------------

function drawForm(formId, prefix, fields) {
  const form = $(formId);
  form.innerHTML = "";
  for (const f of fields) {
    const box = document.createElement("div");
    box.className = f.kind === "bool" ? "field check" : "field";
    const label = document.createElement("label");
    label.textContent = f.key;
    label.htmlFor = `${prefix}-${f.key}`;
    let input;
    if (f.key === "dataset" && prefix === "train") {
      input = document.createElement("select");
      input.multiple = true;
    } else if (f.kind === "select") {
      input = document.createElement("select");
      for (const c of f.choices) input.add(new Option(c === "" ? f.blank : c, c));
    } else {
      input = document.createElement("input");
      input.type = f.kind === "bool" ? "checkbox" : "text";
      if (f.key === "model_name_or_path") input.setAttribute("list", "aliases");
    }
    input.id = `${prefix}-${f.key}`;
    input.dataset.key = f.key;
    setValue(input, f.default);
    const error = document.createElement("span");
    error.className = "error";
    error.id = `${prefix}-err-${f.key}`;
    if (f.kind === "bool") box.append(input, label, error); else box.append(label, input, error);
    form.append(box);
  }
}

function setValue(input, value) {
  if (input.type === "checkbox") input.checked = value === true || value === "true";
  else if (input.multiple) {
    const wanted = String(value || "").split(",").map((s) => s.trim()).filter(Boolean);
    for (const name of wanted) if (![...input.options].some((o) => o.value === name)) input.add(new Option(name, name));
    for (const o of input.options) o.selected = wanted.includes(o.value);
  } else input.value = value === null || value === undefined ? "" : value;
}

function formValues(formId) {
  const values = {};
  for (const input of $(formId).querySelectorAll("[data-key]")) {
    if (input.type === "checkbox") values[input.dataset.key] = input.checked;
    else if (input.multiple) values[input.dataset.key] = [...input.selectedOptions].map((o) => o.value).join(",");
    else values[input.dataset.key] = input.value.trim();
  }
  return values;
}

function trainValues() {
  return {...formValues("train-form"), extra: $("train-extra").value};
}

function showErrors(prefix, result) {
  document.querySelectorAll(`[id^="${prefix}-err-"]`).forEach((e) => { e.textContent = ""; });
  document.querySelectorAll(`#tab-${prefix} .invalid`).forEach((e) => e.classList.remove("invalid"));
  const errors = (result && result.errors) || {};
  for (const [key, message] of Object.entries(errors)) {
    const slot = $(`${prefix}-err-${key}`);
    if (slot) slot.textContent = message;
    const input = $(`${prefix}-${key}`);
    if (input) input.classList.add("invalid");
  }
  const general = $(`${prefix}-general`) || $("chat-general");
  general.innerHTML = "";
  const lines = ((result && result.general) || []).concat(
    Object.entries(errors).filter(([k]) => !$(`${prefix}-err-${k}`)).map(([, m]) => m));
  for (const line of lines) {
    const li = document.createElement("li");
    li.textContent = line;
    general.append(li);
  }
}

async function loadDatasets() {
  const select = $("train-dataset");
  const chosen = [...select.selectedOptions].map((o) => o.value);
  const {ok, data} = await api(`/api/datasets?dataset_dir=${encodeURIComponent($("train-dataset_dir").value || "data")}`);
  select.innerHTML = "";
  if (!ok) { showErrors("train", {errors: {dataset_dir: data.general.join(" ")}}); return; }
  for (const name of data) select.add(new Option(name, name));
  setValue(select, chosen.join(","));
}

async function checkTrain() {
  const {data} = await api("/api/check/train", trainValues());
  showErrors("train", data);
  $("yaml").textContent = data.yaml || "";
  $("download").href = "data:text/yaml;charset=utf-8," + encodeURIComponent(data.yaml || "");
  return data;
}

// ---- runs --------------------------------------------------------------------------------------------------

function drawChart(records) {
  const svg = $("loss-chart");
  const points = records.filter((r) => r.loss !== undefined).map((r) => [r.current_steps, r.loss]);
  svg.innerHTML = "";
  if (!points.length) return;
  const W = 600, H = 240, pad = 30;
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-6);
  const sx = (x) => pad + (x - x0) / (x1 - x0) * (W - 2 * pad);
  const sy = (y) => H - pad - (y - y0) / (y1 - y0) * (H - 2 * pad);
  const ns = "http://www.w3.org/2000/svg";
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("class", "line");
  line.setAttribute("points", points.map(([x, y]) => `${sx(x)},${sy(y)}`).join(" "));
  svg.append(line);
  for (const [x, y] of points) {
    const dot = document.createElementNS(ns, "circle");
    dot.setAttribute("class", "pt");
    dot.setAttribute("cx", sx(x)); dot.setAttribute("cy", sy(y)); dot.setAttribute("r", 2.5);
    svg.append(dot);
  }
  for (const [text, x, y] of [[`loss ${y1.toFixed(3)}`, 4, pad - 8], [y0.toFixed(3), 4, H - pad + 14],
                              [`step ${x1}`, W - 70, H - 8]]) {
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", x); label.setAttribute("y", y); label.textContent = text;
    svg.append(label);
  }
}

async function watch(name) {
  currentRun = name;
  $("live").hidden = false;
  clearTimeout(pollTimer);
  const {ok, data} = await api(`/api/runs/${encodeURIComponent(name)}`);
  if (!ok) { showErrors("train", data); return; }
  $("run-name").textContent = data.name;
  $("run-status").textContent = data.status;
  const eta = data.remaining_time ? `, ETA ${data.remaining_time}` : "";
  $("run-progress").textContent = data.step ? `step ${data.step} / ${data.total_steps}, loss ${data.loss}, ` +
    `lr ${Number(data.lr).toExponential(2)}, ${data.tokens_per_second} tokens/s${eta}` : "starting...";
  drawChart(data.records);
  $("console").textContent = data.console.join("\n");
  $("stop").disabled = data.status !== "running";
  $("resume").disabled = data.status === "running" || data.status === "finished";
  if (data.status === "running" && currentRun === name) pollTimer = setTimeout(() => watch(name), 1000);
}

async function refreshRuns() {
  const {data} = await api("/api/runs");
  const body = document.querySelector("#runs-table tbody");
  body.innerHTML = "";
  for (const run of data) {
    const tr = document.createElement("tr");
    const results = Object.entries(run.results || {}).filter(([k]) => /loss|accuracy|runtime/.test(k))
      .map(([k, v]) => `${k} ${typeof v === "number" ? v.toFixed(4) : v}`).join(", ");
    const cells = [run.name, run.status, run.total_steps ? `${run.step}/${run.total_steps}` : "", run.loss ?? "",
                   results];
    for (const text of cells) { const td = document.createElement("td"); td.textContent = text; tr.append(td); }
    const plot = document.createElement("td");
    if (run.plot) {
      const img = document.createElement("img");
      img.src = `/api/runs/${encodeURIComponent(run.name)}/plot`; img.height = 60; img.alt = "loss plot";
      plot.append(img);
    }
    tr.append(plot);
    tr.onclick = () => { selectTab("train"); watch(run.name); };
    body.append(tr);
  }
}

// ---- chat --------------------------------------------------------------------------------------------------

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  $("messages").append(div);
  return div;
}

async function send() {
  const text = $("chat-input").value.trim();
  if (!text) return;
  $("chat-input").value = "";
  addMessage("user", text);
  history.push({role: "user", content: text});
  const answer = addMessage("assistant", "");
  answer.dataset.chunks = "0";
  $("chat-send").disabled = true;
  const response = await fetch("/api/chat", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({messages: history, system: $("chat-system").value, settings: formValues("gen-form")})});
  if (!response.ok) {
    const data = await response.json();
    showErrors("gen", data);
    answer.remove();
    history.pop();
  } else {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      const {done, value} = await reader.read();
      if (done) break;
      answer.textContent += decoder.decode(value, {stream: true});
      answer.dataset.chunks = String(Number(answer.dataset.chunks) + 1);
    }
    answer.dataset.done = "true";
    history.push({role: "assistant", content: answer.textContent});
  }
  $("chat-send").disabled = false;
}

// ---- wiring ------------------------------------------------------------------------------------------------

function selectTab(name) {
  document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t.dataset.tab === name));
  document.querySelectorAll(".panel").forEach((p) => p.classList.toggle("active", p.id === `tab-${name}`));
  if (name === "runs") refreshRuns();
}

async function init() {
  META = (await api("/api/meta")).data;
  drawForm("train-form", "train", META.train);
  drawForm("chat-form", "chat", META.chat);
  drawForm("gen-form", "gen", META.generate);
  drawForm("export-form", "export", META.export);
  const aliases = document.createElement("datalist");
  aliases.id = "aliases";
  for (const a of META.aliases) aliases.append(new Option(a, a));
  document.body.append(aliases);
  for (const r of META.recipes) $("recipe").add(new Option(r, r));
  $("output-root").textContent = META.output_root;
  $("train-output_dir").value = `${META.output_root}/run-${new Date().toISOString().slice(0, 19).replace(/[:T]/g, "-")}`;
  $("train-dataset_dir").addEventListener("change", loadDatasets);
  await loadDatasets();

  document.querySelectorAll(".tab").forEach((t) => { t.onclick = () => selectTab(t.dataset.tab); });
  for (const form of ["train-form", "chat-form", "gen-form", "export-form"]) $(form).onsubmit = (e) => e.preventDefault();
  $("load-recipe").onclick = async () => {
    if (!$("recipe").value) return;
    const {ok, data} = await api(`/api/recipe/${encodeURIComponent($("recipe").value)}`);
    if (!ok) { showErrors("train", data); return; }
    for (const f of META.train) setValue($(`train-${f.key}`), f.default);
    for (const [key, value] of Object.entries(data)) {
      if (key === "extra") $("train-extra").value = value; else if ($(`train-${key}`)) setValue($(`train-${key}`), value);
    }
    await loadDatasets();
    setValue($("train-dataset"), data.dataset || "");
  };
  $("check").onclick = async () => { const data = await checkTrain(); $("yaml-box").open = !!data.yaml; };
  $("download").onclick = () => checkTrain();
  $("preview").onclick = async () => {
    $("preview-box").open = true;
    $("preview-out").textContent = "reading the data...";
    const {ok, data} = await api("/api/preview", trainValues());
    if (!ok) { showErrors("train", data); $("preview-out").textContent = ""; return; }
    showErrors("train", {});
    const pre = $("preview-out");
    pre.textContent = "";
    const text = data.ok ? data.output : data.error;
    text.split(/(\[\[[\s\S]*?\]\])/).forEach((part) => {
      if (part.startsWith("[[") && part.endsWith("]]")) {
        const mark = document.createElement("mark"); mark.textContent = part.slice(2, -2); pre.append(mark);
      } else pre.append(document.createTextNode(part));
    });
  };
  $("start").onclick = async () => {
    const data = await checkTrain();
    if (Object.keys(data.errors).length || data.general.length) return;
    const started = await api("/api/runs", trainValues());
    if (!started.ok) { showErrors("train", started.data); return; }
    watch(started.data.name);
  };
  $("stop").onclick = async () => { await api(`/api/runs/${encodeURIComponent(currentRun)}/stop`, {}); watch(currentRun); };
  $("resume").onclick = async () => {
    const {ok, data} = await api(`/api/runs/${encodeURIComponent(currentRun)}/resume`, {});
    if (!ok) showErrors("train", data);
    watch(currentRun);
  };
  $("chat-load").onclick = async () => {
    $("chat-loaded").textContent = "loading...";
    const {ok, data} = await api("/api/chat/load", formValues("chat-form"));
    showErrors("chat", ok ? {} : data);
    $("chat-loaded").textContent = ok ? `loaded (template ${data.template})` : "";
  };
  $("chat-send").onclick = send;
  $("chat-input").addEventListener("keydown", (e) => { if (e.key === "Enter") send(); });
  $("chat-clear").onclick = () => { history = []; $("messages").innerHTML = ""; };
  $("export-run").onclick = async () => {
    $("export-result").textContent = "exporting...";
    const {ok, data} = await api("/api/export", formValues("export-form"));
    showErrors("export", ok ? {} : data);
    if (!ok) { $("export-result").textContent = ""; return; }
    $("export-result").textContent = data.ok ? `exported to ${data.path} (${data.size_mb} MB: ${data.files.join(", ")})`
      : "export failed:";
    $("export-out").textContent = data.ok ? data.output : data.error;
  };
}

init();
