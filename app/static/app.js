// Model LEGO web page: plain modern JavaScript, no build step. It talks to the same
// HTTP API as curl, sending the signed-in key in the Authorization header. The key is
// kept in sessionStorage (or localStorage when "remember" is ticked), never in a URL.

const KEY_NAME = "lego.apiKey";
const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                 "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#7f7f7f"];
const main = document.getElementById("main");
const nav = document.getElementById("nav");
let timers = [];
let config = null;

// ------------------------------------------------------------------ helpers

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "style") el.style.cssText = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function modelColor(id) { return PALETTE[(id - 1) % PALETTE.length]; }

function human(n) {
  if (n === null || n === undefined) return "–";
  const abs = Math.abs(n);
  if (abs >= 1e9) return (n / 1e9).toFixed(2) + " G";
  if (abs >= 1e6) return (n / 1e6).toFixed(2) + " M";
  if (abs >= 1e3) return (n / 1e3).toFixed(1) + " k";
  return String(n);
}

function pct(part, whole) {
  if (!whole) return "–";
  return (100 * part / whole).toFixed(part / whole < 0.1 ? 1 : 0) + "%";
}

function getKey() {
  return sessionStorage.getItem(KEY_NAME) || localStorage.getItem(KEY_NAME);
}

function setKey(key, remember) {
  sessionStorage.setItem(KEY_NAME, key);
  if (remember) localStorage.setItem(KEY_NAME, key);
  else localStorage.removeItem(KEY_NAME);
}

function clearKey() {
  sessionStorage.removeItem(KEY_NAME);
  localStorage.removeItem(KEY_NAME);
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

// The error text of a response: `detail` is a string, or (request validation) a list.
async function errorText(res) {
  let body = null;
  try { body = await res.json(); } catch { /* not JSON */ }
  const d = body && (body.detail ?? body.title);
  if (typeof d === "string") return d;
  if (Array.isArray(d)) {
    return d.map((e) => (e.loc ? e.loc.filter((x) => x !== "body").join(".") + ": " : "") +
                        (e.msg || JSON.stringify(e))).join("; ");
  }
  return `${res.status} ${res.statusText}`;
}

async function api(path, opts = {}, key = getKey()) {
  const headers = new Headers(opts.headers || {});
  if (key) headers.set("Authorization", `Bearer ${key}`);
  if (opts.json !== undefined) {
    headers.set("Content-Type", "application/json");
    opts = { ...opts, body: JSON.stringify(opts.json) };
  }
  const res = await fetch(`/api/v1${path}`, { ...opts, headers });
  if (res.status === 401 && key === getKey() && key) {
    clearKey();
    location.hash = "#/signin";
    throw new ApiError(401, "your key is no longer accepted; sign in again");
  }
  if (!res.ok) throw new ApiError(res.status, await errorText(res));
  if (opts.raw) return res;
  if (res.status === 204) return null;
  return res.json();
}

function toast(text) {
  const t = document.getElementById("toast");
  t.textContent = text;
  setTimeout(() => { if (t.textContent === text) t.textContent = ""; }, 4000);
}

function every(ms, fn) {
  const id = setInterval(fn, ms);
  timers.push(id);
  return id;
}

// Each navigation starts a new generation; a view that finishes loading after the
// user went elsewhere is dropped instead of replacing the newer one.
let gen = 0;
class Stale extends Error {}

function setView(g, title, ...children) {
  if (g !== gen) throw new Stale();
  timers.forEach(clearInterval);
  timers = [];
  main.replaceChildren(h("h1", { id: "view-title" }, title), ...children);
  document.title = `${title} · Model LEGO`;
  main.focus({ preventScroll: true });
}

function statusBadge(status) {
  return h("span", { class: `badge ${status}` }, status);
}

async function loadConfig() {
  if (!config) config = await (await fetch("/ui/config")).json();
  return config;
}

// ------------------------------------------------------------------ sign in

function signInView() {
  nav.hidden = true;
  const err = h("p", { class: "alert", id: "signin-error", role: "alert" });
  const input = h("input", { type: "password", id: "api-key", name: "key", required: true,
                             autocomplete: "current-password", "aria-describedby": "key-hint" });
  const remember = h("input", { type: "checkbox", id: "remember" });
  const form = h("form", { class: "stack card signin", id: "signin-form",
                           "aria-labelledby": "view-title" },
    h("div", { class: "field" },
      h("label", { for: "api-key" }, "API key"),
      input,
      h("span", { class: "hint", id: "key-hint" },
        "The key ", h("code", {}, "lego serve"), " printed, or one from ",
        h("code", {}, "lego keys create NAME"),
        ". It is kept in this browser tab's storage and sent in the Authorization header.")),
    h("label", { class: "check" }, remember, "Remember on this device"),
    err,
    h("div", {}, h("button", { type: "submit" }, "Sign in")));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    err.textContent = "";
    const key = input.value.trim();
    try {
      await api("/models", {}, key);
      setKey(key, remember.checked);
      location.hash = "#/catalog";
    } catch (e) {
      err.textContent = e.status === 401
        ? "That key was not accepted: it is unknown or revoked. Check it and try again."
        : `Could not sign in: ${e.message}`;
      input.focus();
    }
  });
  setView(gen, "Sign in", form);
  input.focus();
}

// ------------------------------------------------------------------ catalog data

// Models with their components, sizes and running locate jobs; datasets.
async function loadCatalog() {
  const [models, datasets] = await Promise.all([api("/models"), api("/datasets")]);
  await Promise.all(models.map(async (m) => {
    const [comps, size] = await Promise.all([
      api(`/models/${m.id}/components`),
      api(`/models/${m.id}/size`).catch(() => null),
    ]);
    m.components = comps;
    m.size = size;
    m.jobs = await Promise.all(comps.pending_job_ids.map((j) => api(`/jobs/${j}`)));
  }));
  return { models, datasets };
}

function brickShare(m, c) {
  if (!m.size) return [];
  return [h("span", { class: "share" }, `params ${pct(c.params, m.size.params)}`),
          h("span", { class: "share" }, `FLOPs ${pct(c.flops, m.size.flops)}`)];
}

function brickLabel(m, c) {
  const share = c && m.size
    ? `, component keeps ${pct(c.params, m.size.params)} of the parameters and ` +
      `${pct(c.flops, m.size.flops)} of the FLOPs`
    : "";
  return `class ${c ? c.class_name : ""} of model ${m.name}${share}`;
}

function brickContent(m, name, c) {
  return [h("span", { class: "name" }, name),
          c ? brickShare(m, c) : h("span", { class: "share" }, "not located")];
}

function locateStatus(m) {
  if (m.jobs.length) {
    const j = m.jobs[0];
    return h("div", { class: "locate-status", "data-state": "locating" },
      statusBadge("locating"), " ",
      h("progress", { max: 1, value: j.progress, "aria-label": `locating ${m.name}` }),
      h("span", { class: "small muted" }, ` ${Math.round(100 * j.progress)}% ${j.message || ""}`));
  }
  const sets = m.components.component_sets;
  if (sets.length) {
    const s = sets[0];
    return h("div", { class: "locate-status", "data-state": "located" },
      statusBadge("located"),
      h("span", { class: "small muted" },
        ` on dataset ${s.dataset_name || s.dataset_id} (component set ${s.id})`),
      checkNote(s.parameters && s.parameters.check, s.parameters));
  }
  return h("div", { class: "locate-status", "data-state": "none" },
    statusBadge("not located"), h("span", { class: "small muted" }, " locate to see its bricks"));
}

// What the check of the located components found (lego_core.fidelity).
function checkNote(check, params) {
  if (!check) return [];
  const failed = check.sets.filter((x) => !x.kept);
  if (failed.length) {
    const f = failed[0];
    return h("p", { class: "alert check-note", role: "status" },
      `Components do not keep this model's decisions: classes ${f.classes.join(", ")} score ` +
      `${f.component.toFixed(2)} against ${f.source.toFixed(2)} on their located images.`);
  }
  const scores = check.sets.map((x) => x.component.toFixed(2)).join(", ");
  const relaxed = check.relaxed
    ? ` Thresholds relaxed to keep them: beta ${JSON.stringify(params.beta)}.` : "";
  return h("p", { class: "small muted check-note" },
    `Checked on ${check.sets.length} class sets: components score ${scores} ` +
    `on their located images.${relaxed}`);
}

function locateForm(m, datasets) {
  if (!datasets.length) return h("p", { class: "small muted" }, "Upload a dataset to locate.");
  const id = `locate-ds-${m.id}`;
  const sel = h("select", { id }, datasets.map((d) => h("option", { value: d.id }, d.name)));
  const err = h("p", { class: "alert", role: "alert" });
  const form = h("form", { class: "row locate-form", "data-model": m.id },
    h("label", { for: id }, "Dataset"), sel,
    h("button", { type: "submit", class: "secondary", disabled: m.jobs.length > 0 },
      m.components.component_sets.length ? "Locate again" : "Locate"),
    err);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    err.textContent = "";
    try {
      await api(`/models/${m.id}/locate`, { method: "POST", json: { dataset_id: +sel.value } });
      toast(`Locating ${m.name}…`);
      await renderCatalog();
    } catch (e) { err.textContent = e.message; }
  });
  return form;
}

function modelCard(m, datasets) {
  const byClass = new Map(m.components.classes.map((c) => [c.class_name, c]));
  const color = modelColor(m.id);
  return h("article", { class: "card model", "data-model": m.id, "aria-label": `model ${m.name}` },
    h("div", { class: "model-head" },
      h("span", { class: "swatch", style: `--c:${color}`, "aria-hidden": "true" }),
      h("h3", {}, m.name),
      h("span", { class: "badge" }, `#${m.id} · ${m.arch}`)),
    h("p", { class: "small muted" },
      `${m.class_names.length} classes`,
      m.size ? ` · ${human(m.size.params)} params · ${human(m.size.flops)}FLOPs` : ""),
    h("ul", { class: "bricks", "aria-label": `classes of ${m.name}` },
      m.class_names.map((name) => {
        const c = byClass.get(name);
        return h("li", { class: `brick${c ? "" : " pending"}`, style: `--c:${color}`,
                         "aria-label": c ? brickLabel(m, c) : `class ${name}, not located` },
          brickContent(m, name, c));
      })),
    locateStatus(m),
    locateForm(m, datasets),
    routesDetails(m));
}

function routesDetails(m) {
  const sets = m.components.component_sets;
  if (!sets.length) return null;
  const details = h("details", { class: "routes" }, h("summary", {}, "Decision routes"));
  details.addEventListener("toggle", async () => {
    if (!details.open || details.dataset.loaded) return;
    details.dataset.loaded = "1";
    const src = { model_id: m.id, classes: m.components.classes.map((c) => c.class_name),
                  component_set_id: sets[0].id };
    details.append(await routesFigure(src, m.name));
  });
  return details;
}

function fileField(id, label, name, hint, accept) {
  return h("div", { class: "field" },
    h("label", { for: id }, label),
    h("input", { type: "file", id, name, required: true, accept }),
    hint ? h("span", { class: "hint" }, hint) : null);
}

function textField(id, label, name, opts = {}) {
  return h("div", { class: "field" },
    h("label", { for: id }, label),
    h("input", { type: "text", id, name, required: opts.required !== false,
                 value: opts.value, placeholder: opts.placeholder,
                 "aria-describedby": opts.hint ? `${id}-hint` : null }),
    opts.hint ? h("span", { class: "hint", id: `${id}-hint` }, opts.hint) : null);
}

const SPECS = {
  mnist: { channels: 1, height: 28, width: 28, mean: [0.1307], std: [0.3081] },
  cifar10: { channels: 3, height: 32, width: 32, mean: [0.4914, 0.4822, 0.4465],
             std: [0.247, 0.2435, 0.2616] },
};

// POST a form's data; on success a message and the catalog again, else the API's
// message next to the form (the submit button is off while the upload runs).
async function upload(form, err, path, fd, message) {
  const button = form.querySelector("button[type=submit]");
  button.disabled = true;
  try {
    toast(message(await api(path, { method: "POST", body: fd })));
    await renderCatalog();
  } catch (e) {
    err.textContent = `Upload failed: ${e.message}`;
    button.disabled = false;
  }
}

function modelUploadForm(datasets) {
  const err = h("p", { class: "alert", role: "alert", id: "model-upload-error" });
  const spec = h("textarea", { id: "mu-spec", name: "input_spec", rows: 2,
                               "aria-describedby": "mu-spec-hint" },
                 JSON.stringify(SPECS.mnist));
  const preset = h("select", { id: "mu-preset" },
    h("option", { value: "mnist" }, "MNIST-like: 1×28×28"),
    h("option", { value: "cifar10" }, "CIFAR-10-like: 3×32×32"));
  preset.addEventListener("change", () => { spec.value = JSON.stringify(SPECS[preset.value]); });
  const form = h("form", { class: "stack card", id: "model-upload", "aria-labelledby": "mu-title" },
    h("h3", { id: "mu-title" }, "Upload a model"),
    textField("mu-name", "Name", "name", { placeholder: "lenet-0-4" }),
    h("div", { class: "field" },
      h("label", { for: "mu-arch" }, "Architecture"),
      h("select", { id: "mu-arch", name: "arch" },
        config.arches.map((a) => h("option", { value: a }, a)))),
    fileField("mu-weights", "Weights file", "weights",
              "a state_dict .pt for the architecture, an ExportedProgram or TorchScript file"),
    textField("mu-classes", "Class names", "class_names",
              { placeholder: "0, 1, 2, 3, 4", hint: "comma-separated, in output order" }),
    h("div", { class: "field" },
      h("label", { for: "mu-preset" }, "Input"), preset,
      h("label", { for: "mu-spec", class: "hint" }, "Input spec (JSON)"), spec,
      h("span", { class: "hint", id: "mu-spec-hint" }, "channels, height, width, mean, std")),
    h("div", { class: "field" },
      h("label", { for: "mu-dataset" }, "Locate at once on"),
      h("select", { id: "mu-dataset", name: "dataset_id" },
        h("option", { value: "" }, "(later)"),
        datasets.map((d) => h("option", { value: d.id }, d.name)))),
    err,
    h("div", {}, h("button", { type: "submit" }, "Upload model")));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    err.textContent = "";
    const fd = new FormData();
    const v = (id) => form.querySelector(`#${id}`).value;
    fd.set("name", v("mu-name").trim());
    fd.set("arch", v("mu-arch"));
    fd.set("weights", form.querySelector("#mu-weights").files[0]);
    const names = v("mu-classes").split(",").map((s) => s.trim()).filter(Boolean);
    fd.set("class_names", JSON.stringify(names));
    fd.set("input_spec", spec.value);
    if (v("mu-dataset")) fd.set("dataset_id", v("mu-dataset"));
    await upload(form, err, "/models", fd, (m) => `Model ${m.name} uploaded (#${m.id})`);
  });
  return form;
}

function datasetUploadForm() {
  const err = h("p", { class: "alert", role: "alert", id: "dataset-upload-error" });
  const form = h("form", { class: "stack card", id: "dataset-upload",
                           "aria-labelledby": "du-title" },
    h("h3", { id: "du-title" }, "Upload a dataset"),
    textField("du-name", "Name", "name", { placeholder: "mnist-test" }),
    fileField("du-archive", "ImageFolder archive", "archive",
              "tar, tar.gz or zip of <class>/<image>", ".tar,.gz,.tgz,.zip"),
    err,
    h("div", {}, h("button", { type: "submit" }, "Upload dataset")));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    err.textContent = "";
    const fd = new FormData();
    fd.set("name", form.querySelector("#du-name").value.trim());
    fd.set("archive", form.querySelector("#du-archive").files[0]);
    await upload(form, err, "/datasets", fd, (d) => `Dataset ${d.name} uploaded: ${d.num_images} images`);
  });
  return form;
}

function datasetsTable(datasets) {
  if (!datasets.length) return h("p", { class: "muted" }, "No datasets yet.");
  return h("div", { class: "table-wrap card" }, h("table", { id: "datasets" },
    h("caption", { class: "sr-only" }, "Datasets"),
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Name"), h("th", { scope: "col" }, "Id"),
      h("th", { scope: "col" }, "Classes"), h("th", { scope: "col" }, "Images"))),
    h("tbody", {}, datasets.map((d) => h("tr", { "data-dataset": d.id },
      h("td", {}, d.name), h("td", {}, d.id),
      h("td", {}, Object.keys(d.classes).slice(0, 12).join(", ") +
                  (d.num_classes > 12 ? ` … (${d.num_classes})` : "")),
      h("td", {}, d.num_images))))));
}

async function renderCatalog(g = gen) {
  const { models, datasets } = await loadCatalog();
  const content = [
    h("section", { "aria-labelledby": "models-title" },
      h("h2", { id: "models-title" }, `Models (${models.length})`),
      models.length
        ? h("div", { class: "grid", id: "models" }, models.map((m) => modelCard(m, datasets)))
        : h("p", { class: "muted" }, "No models yet: upload one below.")),
    h("section", { "aria-labelledby": "datasets-title" },
      h("h2", { id: "datasets-title" }, `Datasets (${datasets.length})`),
      datasetsTable(datasets)),
    h("section", { "aria-labelledby": "upload-title" },
      h("h2", { id: "upload-title" }, "Add to the catalog"),
      h("div", { class: "two" }, modelUploadForm(datasets), datasetUploadForm())),
  ];
  setView(g, "Catalog", ...content);
  if (models.some((m) => m.jobs.length)) {
    every(1000, async () => {
      const running = models.filter((m) => m.jobs.length);
      const jobs = await Promise.all(running.map((m) => api(`/jobs/${m.jobs[0].id}`)));
      if (jobs.some((j) => j.status === "succeeded" || j.status === "failed")) {
        const failed = jobs.find((j) => j.status === "failed");
        if (failed) toast(`Locating failed: ${failed.error}`);
        if (location.hash.startsWith("#/catalog") || location.hash === "") await renderCatalog();
        return;
      }
      running.forEach((m, i) => {
        const card = main.querySelector(`article[data-model="${m.id}"] .locate-status`);
        if (!card) return;
        card.querySelector("progress").value = jobs[i].progress;
        card.querySelector("span.small").textContent =
          ` ${Math.round(100 * jobs[i].progress)}% ${jobs[i].message || ""}`;
      });
    });
  }
}

// ------------------------------------------------------------------ assemble

const board = { picks: [] }; // [{model, cls}] in the order picked

function orderedPicks() {
  // Classes of one model form one branch, so they stay together, in the order of
  // each model's first pick; within a model, in the order picked.
  const groups = new Map();
  for (const p of board.picks) {
    if (!groups.has(p.model.id)) groups.set(p.model.id, []);
    groups.get(p.model.id).push(p);
  }
  return [...groups.values()].flat();
}

function estimate(picks) {
  // Per model, the component of its chosen classes keeps at least the largest
  // single-class component and at most their sum (never more than the model).
  const per = new Map();
  for (const p of picks) {
    const e = per.get(p.model.id) || { m: p.model, lo: [0, 0], hi: [0, 0] };
    e.lo = [Math.max(e.lo[0], p.cls.params), Math.max(e.lo[1], p.cls.flops)];
    e.hi = [e.hi[0] + p.cls.params, e.hi[1] + p.cls.flops];
    per.set(p.model.id, e);
  }
  let lo = [0, 0], hi = [0, 0];
  for (const e of per.values()) {
    const cap = e.m.size ? [e.m.size.params, e.m.size.flops] : [Infinity, Infinity];
    lo = [lo[0] + e.lo[0], lo[1] + e.lo[1]];
    hi = [hi[0] + Math.min(e.hi[0], cap[0]), hi[1] + Math.min(e.hi[1], cap[1])];
  }
  return { lo, hi, models: per.size };
}

function pickedIndex(m, cls) {
  return board.picks.findIndex((p) => p.model.id === m.id && p.cls.class_name === cls.class_name);
}

function togglePick(m, cls) {
  const i = pickedIndex(m, cls);
  if (i >= 0) board.picks.splice(i, 1);
  else board.picks.push({ model: m, cls });
}

async function renderAssemble(g) {
  const [{ models, datasets }, cfg] = await Promise.all([loadCatalog(), loadConfig()]);
  // Keep picks whose model is still there (fresh objects from this load).
  const byId = new Map(models.map((m) => [m.id, m]));
  board.picks = board.picks.filter((p) => byId.has(p.model.id)).map((p) => {
    const m = byId.get(p.model.id);
    const cls = m.components.classes.find((c) => c.class_name === p.cls.class_name);
    return cls ? { model: m, cls } : null;
  }).filter(Boolean);

  const located = models.filter((m) => m.components.classes.length);
  const palette = h("section", { "aria-labelledby": "palette-title", class: "card" },
    h("h2", { id: "palette-title" }, "Bricks"),
    h("p", { class: "small muted" },
      "Click a brick (or press Enter or Space on it) to put it on the board, click again to " +
      "take it off; or drag it onto the board."),
    located.length ? null : h("p", { class: "muted" },
      "No located models yet: upload a model and locate it in the catalog."),
    located.map((m) => h("div", { class: "palette-model", "data-model": m.id },
      h("div", { class: "model-head" },
        h("span", { class: "swatch", style: `--c:${modelColor(m.id)}`, "aria-hidden": "true" }),
        h("h3", {}, m.name)),
      h("ul", { class: "bricks", "aria-label": `classes of ${m.name}` },
        m.components.classes.map((c) => {
          const b = h("button", { type: "button", class: "brick", draggable: "true",
                                  style: `--c:${modelColor(m.id)}`,
                                  "aria-pressed": pickedIndex(m, c) >= 0 ? "true" : "false",
                                  "aria-label": brickLabel(m, c),
                                  "data-model": m.id, "data-class": c.class_name },
            brickContent(m, c.class_name, c));
          b.addEventListener("click", () => { togglePick(m, c); refresh(); });
          b.addEventListener("dragstart", (ev) => {
            ev.dataTransfer.setData("text/plain", `${m.id}\n${c.class_name}`);
            ev.dataTransfer.effectAllowed = "copy";
          });
          return h("li", {}, b);
        })))));

  const list = h("ol", { class: "board", id: "board", "aria-label": "assembled class order",
                         "data-empty": "Drop or click bricks here" });
  list.addEventListener("dragover", (ev) => { ev.preventDefault(); list.classList.add("over"); });
  list.addEventListener("dragleave", () => list.classList.remove("over"));
  list.addEventListener("drop", (ev) => {
    ev.preventDefault();
    list.classList.remove("over");
    const [mid, name] = ev.dataTransfer.getData("text/plain").split("\n");
    const m = byId.get(+mid);
    const c = m && m.components.classes.find((x) => x.class_name === name);
    if (c && pickedIndex(m, c) < 0) { board.picks.push({ model: m, cls: c }); refresh(); }
  });
  const facts = h("dl", { class: "facts", id: "estimate", "aria-live": "polite" });
  const nameInput = h("input", { type: "text", id: "as-name", placeholder: "(automatic)" });
  const scaling = h("select", { id: "as-scaling" },
    cfg.scaling_methods.map((s) => h("option", { value: s }, s)));
  const form = h("select", { id: "as-form" }, cfg.forms.map((s) => h("option", { value: s }, s)));
  const evals = h("fieldset", { id: "as-eval" },
    h("legend", {}, "Evaluate on (accuracy against Base)"),
    datasets.length ? datasets.map((d, i) => h("label", { class: "check" },
      h("input", { type: "checkbox", value: d.id, checked: i === 0 }), d.name))
      : h("span", { class: "muted small" }, "no datasets"));
  const err = h("p", { class: "alert", role: "alert", id: "assemble-error" });
  const submit = h("button", { type: "submit", id: "assemble-submit" }, "Assemble");
  const options = h("form", { class: "stack", id: "assemble-form" },
    h("div", { class: "field" }, h("label", { for: "as-name" }, "Name"), nameInput),
    h("div", { class: "two" },
      h("div", { class: "field" }, h("label", { for: "as-scaling" }, "Scaling"), scaling),
      h("div", { class: "field" }, h("label", { for: "as-form" }, "Form"), form)),
    evals, err, h("div", {}, submit));
  options.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    err.textContent = "";
    const picks = orderedPicks();
    if (!picks.length) { err.textContent = "Put at least one brick on the board."; return; }
    const sources = [];
    for (const p of picks) {
      let s = sources.find((x) => x.model_id === p.model.id);
      if (!s) sources.push(s = { model_id: p.model.id, classes: [] });
      s.classes.push(p.cls.class_name);
    }
    const body = {
      source_classes: sources,
      eval_dataset_ids: [...evals.querySelectorAll("input:checked")].map((x) => +x.value),
      options: { scaling: scaling.value, form: form.value },
    };
    if (nameInput.value.trim()) body.name = nameInput.value.trim();
    submit.disabled = true;
    try {
      const a = await api("/assemblies", { method: "POST", json: body });
      board.picks = [];
      location.hash = `#/assemblies/${a.id}`;
    } catch (e) {
      err.textContent = `Could not assemble: ${e.message}`;
      submit.disabled = false;
    }
  });

  function move(p, delta) {
    const order = orderedPicks();
    const i = order.indexOf(p);
    const j = i + delta;
    if (j < 0 || j >= order.length || order[j].model.id !== p.model.id) return;
    [order[i], order[j]] = [order[j], order[i]];
    board.picks = order;
    refresh(`[data-move="${delta < 0 ? "up" : "down"}"][data-key="${p.model.id}:${p.cls.class_name}"]`);
  }

  function refresh(focusSel) {
    const picks = orderedPicks();
    list.replaceChildren(...picks.map((p, i) => {
      const key = `${p.model.id}:${p.cls.class_name}`;
      const same = (k) => picks[k] && picks[k].model.id === p.model.id;
      return h("li", { "data-key": key },
        h("span", { class: "order", "aria-hidden": "true" }, `${i + 1}.`),
        h("span", { class: "brick", style: `--c:${modelColor(p.model.id)}` },
          brickContent(p.model, p.cls.class_name, p.cls)),
        h("span", { class: "small muted" }, `from ${p.model.name}`),
        h("span", { class: "row nowrap" }, h("button", { type: "button", class: "secondary icon", "data-move": "up", "data-key": key,
                      "aria-label": `move ${p.cls.class_name} of ${p.model.name} up`,
                      disabled: !same(i - 1), onclick: () => move(p, -1) }, "↑"),
        h("button", { type: "button", class: "secondary icon", "data-move": "down",
                      "data-key": key, disabled: !same(i + 1),
                      "aria-label": `move ${p.cls.class_name} of ${p.model.name} down`,
                      onclick: () => move(p, +1) }, "↓"),
        h("button", { type: "button", class: "secondary icon", "data-remove": key,
                      "aria-label": `remove ${p.cls.class_name} of ${p.model.name}`,
                      onclick: () => { togglePick(p.model, p.cls); refresh(); } }, "✕")));
    }));
    for (const b of main.querySelectorAll("button.brick")) {
      const on = board.picks.some((p) => p.model.id === +b.dataset.model &&
                                         p.cls.class_name === b.dataset.class);
      b.setAttribute("aria-pressed", on ? "true" : "false");
    }
    const e = estimate(picks);
    const range = (a, b) => (a === b ? human(a) : `${human(a)} – ${human(b)}`);
    facts.replaceChildren(
      h("dt", {}, "Classes"), h("dd", { id: "est-classes" },
        picks.length ? `${picks.length} from ${e.models} model${e.models === 1 ? "" : "s"}: ` +
                       picks.map((p) => p.cls.class_name).join(", ") : "none yet"),
      h("dt", {}, "Parameters"), h("dd", { id: "est-params" }, picks.length ? range(e.lo[0], e.hi[0]) : "–"),
      h("dt", {}, "FLOPs"), h("dd", { id: "est-flops" }, picks.length ? range(e.lo[1], e.hi[1]) : "–"));
    if (focusSel) main.querySelector(focusSel)?.focus();
  }

  const side = h("section", { class: "card", "aria-labelledby": "board-title" },
    h("h2", { id: "board-title" }, "Board: the new model's classes, in order"),
    h("p", { class: "small muted" },
      "Classes of one model stay together (each model is one branch). Use ↑ ↓ to reorder."),
    list,
    h("h3", { style: "margin-top:12px" }, "Estimate"),
    facts,
    h("p", { class: "small muted" },
      "Branches form: the sum of each model's component (at least its largest class, at most " +
      "the sum of its classes). The padded form costs more."),
    h("h3", {}, "Options"),
    options);
  setView(g, "Assemble", h("div", { class: "board-layout" }, palette, side));
  refresh();
}

// ------------------------------------------------------------------ assemblies

async function renderAssemblies(g) {
  const rows = await api("/assemblies");
  setView(g, "Assemblies",
    rows.length ? h("div", { class: "table-wrap card" }, h("table", { id: "assemblies" },
      h("thead", {}, h("tr", {}, ["Name", "Status", "Classes", "Accuracy", "Base"].map(
        (t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, rows.slice().reverse().map((a) => h("tr", {},
        h("td", {}, h("a", { href: `#/assemblies/${a.id}` }, a.name)),
        h("td", {}, statusBadge(a.status)),
        h("td", {}, a.classes.map((c) => c.name).join(", ")),
        h("td", {}, a.metrics ? `${a.metrics.accuracy.toFixed(1)}%` : "–"),
        h("td", {}, a.metrics && a.metrics.base_accuracy != null
          ? `${a.metrics.base_accuracy.toFixed(1)}%` : "–"))))))
      : h("p", { class: "muted" }, "No assemblies yet: build one on the ", h("a", { href: "#/assemble" }, "board"), "."));
}

function filenameOf(res, fallback) {
  const cd = res.headers.get("Content-Disposition") || "";
  const m = /filename\*?=(?:UTF-8'')?"?([^";]+)"?/i.exec(cd);
  return m ? decodeURIComponent(m[1]) : fallback;
}

async function download(a, button) {
  button.disabled = true;
  try {
    const res = await api(`/assemblies/${a.id}/download`, { raw: true });
    const blob = await res.blob();
    const url = URL.createObjectURL(blob);
    const link = h("a", { href: url, download: filenameOf(res, `assembly-${a.id}.pt`) });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
    toast(`Downloaded ${link.download} (${human(blob.size)}B)`);
  } catch (e) { toast(`Download failed: ${e.message}`); }
  button.disabled = false;
}

// The decision-routes SVG of some classes of one model, fetched with the key and shown
// from a blob: URL (an <img> runs no script from it).
async function routesFigure(src, name) {
  const q = new URLSearchParams({ classes: src.classes.join(",") });
  if (src.component_set_id) q.set("component_set_id", src.component_set_id);
  const fig = h("figure", { "data-model": src.model_id });
  try {
    const res = await api(`/models/${src.model_id}/routes.svg?${q}`, { raw: true });
    const text = await res.text();
    const url = URL.createObjectURL(new Blob([text], { type: "image/svg+xml" }));
    const title = /<title[^>]*>([^<]*)<\/title>/.exec(text);
    fig.append(h("img", { src: url, alt: title ? title[1] : `decision routes of ${name}` }),
               h("figcaption", {}, `Decision routes of ${src.classes.join(", ")} in ${name}: ` +
                 "class colour = used by that class only; dark = shared; pale = removed. ",
                 h("a", { href: url, target: "_blank", rel: "noopener" }, "Open full size")));
  } catch (e) {
    fig.append(h("p", { class: "muted" }, `Routes of ${name}: ${e.message}`));
  }
  return fig;
}

function tryIt(a) {
  const err = h("p", { class: "alert", role: "alert", id: "predict-error" });
  const preview = h("img", { class: "preview", alt: "", hidden: true, id: "predict-preview" });
  const out = h("div", { id: "predictions", "aria-live": "polite" });
  const input = h("input", { type: "file", id: "predict-file", accept: "image/*" });
  const topk = Math.min(5, a.classes.length);
  async function run(file) {
    err.textContent = "";
    if (!file) return;
    preview.src = URL.createObjectURL(file);
    preview.alt = `the image to classify: ${file.name}`;
    preview.hidden = false;
    out.replaceChildren(h("p", { class: "muted" }, "Predicting…"));
    const fd = new FormData();
    fd.append("images", file, file.name || "image.png");
    try {
      const res = await api(`/assemblies/${a.id}/predict?top_k=${topk}`, { method: "POST", body: fd });
      const preds = res.predictions[0];
      const colorOf = (cls) => {
        const c = a.classes.find((x) => x.name === cls);
        return c && c.source_model_id ? modelColor(c.source_model_id) : null;
      };
      out.replaceChildren(
        h("p", { class: "top-class", id: "top-class" }, "Top class: ",
          h("strong", {}, preds[0].class), ` (${(100 * preds[0].probability).toFixed(1)}%)`),
        h("ol", { class: "preds", "aria-label": `top ${preds.length} classes` },
          preds.map((p) => h("li", { style: colorOf(p.class) ? `--c:${colorOf(p.class)}` : null },
            h("span", { class: "cls" }, p.class),
            h("span", { class: "bar", role: "img",
                        "aria-label": `${(100 * p.probability).toFixed(1)} percent` },
              h("span", { style: `width:${(100 * p.probability).toFixed(1)}%` })),
            h("span", { class: "prob" }, `${(100 * p.probability).toFixed(1)}%`)))));
    } catch (e) {
      out.replaceChildren();
      err.textContent = `Prediction failed: ${e.message}`;
    }
  }
  input.addEventListener("change", () => run(input.files[0]));
  const drop = h("div", { class: "drop", id: "drop-zone", role: "button", tabindex: "0",
                          "aria-describedby": "drop-hint" },
    h("strong", {}, "Drop an image here"),
    h("div", { class: "small muted", id: "drop-hint" },
      "or press Enter to choose a file; it is resized to the model's input"));
  drop.addEventListener("click", () => input.click());
  drop.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); input.click(); }
  });
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    run(ev.dataTransfer.files[0]);
  });
  return h("section", { class: "card", "aria-labelledby": "try-title" },
    h("h2", { id: "try-title" }, "Try it"),
    h("div", { class: "tryit" },
      h("div", {}, preview),
      h("div", {}, drop,
        h("div", { class: "field", style: "margin-top:8px" },
          h("label", { for: "predict-file" }, "Image file"), input),
        err, out)));
}

async function renderAssembly(id, g) {
  let a = await api(`/assemblies/${id}`);
  const progress = h("progress", { max: 1, value: a.progress, id: "job-progress",
                                   "aria-label": "assembly progress" });
  const statusLine = h("p", { id: "job-status", role: "status" });
  const detail = h("div", { id: "assembly-detail" });
  const head = h("section", { class: "card", "aria-labelledby": "status-title" },
    h("h2", { id: "status-title" }, "Job"), statusLine, progress);
  setView(g, a.name, head, detail);

  async function update() {
    let msg = "";
    if (a.job_id) {
      try { msg = (await api(`/jobs/${a.job_id}`)).message || ""; } catch { /* ignore */ }
    }
    progress.value = a.progress;
    statusLine.replaceChildren(statusBadge(a.status), " ",
      a.status === "failed" ? h("span", { class: "alert" }, a.error || "failed")
        : `${Math.round(100 * a.progress)}%${msg ? ` · ${msg}` : ""}`);
  }
  await update();
  if (a.status === "queued" || a.status === "running") {
    await new Promise((resolve) => {
      every(700, async () => {
        a = await api(`/assemblies/${id}`);
        await update();
        if (a.status !== "queued" && a.status !== "running") {
          timers.forEach(clearInterval);
          resolve();
        }
      });
    });
  }
  if (a.status !== "succeeded") return;
  progress.hidden = true;
  const models = new Map((await api("/models")).map((m) => [m.id, m]));
  const mt = a.metrics;
  const facts = h("dl", { class: "facts", id: "metrics" },
    h("dt", {}, "Classes"), h("dd", {}, a.classes.length),
    h("dt", {}, "Options"), h("dd", {}, Object.entries(a.options).map(([k, v]) => `${k} ${v}`).join(", ") || "defaults"),
    mt ? [
      h("dt", {}, "Accuracy"), h("dd", { id: "m-accuracy" }, `${mt.accuracy.toFixed(2)}%`),
      h("dt", {}, "Base"), h("dd", { id: "m-base" },
        mt.base_accuracy != null ? `${mt.base_accuracy.toFixed(2)}% (${(mt.accuracy - mt.base_accuracy >= 0 ? "+" : "")}${(mt.accuracy - mt.base_accuracy).toFixed(2)} points)` : "–"),
      h("dt", {}, "Test images"), h("dd", {}, mt.images ?? "–"),
      h("dt", {}, "Parameters"), h("dd", { id: "m-params" }, `${human(mt.params)} (${mt.params})`),
      h("dt", {}, "FLOPs"), h("dd", { id: "m-flops" }, `${human(mt.flops)} (${mt.flops})`),
    ] : [h("dt", {}, "Accuracy"), h("dd", {}, "not evaluated (no evaluation dataset was chosen)")]);
  const downloadBtn = h("button", { type: "button", id: "download" }, "Download .pt");
  downloadBtn.addEventListener("click", () => download(a, downloadBtn));
  const lineage = h("div", { class: "table-wrap" }, h("table", { id: "lineage" },
    h("caption", { class: "muted small", style: "text-align:left" },
      "Lineage: where each output class comes from"),
    h("thead", {}, h("tr", {}, ["#", "Class", "From model", "Source class"].map(
      (t) => h("th", { scope: "col" }, t)))),
    h("tbody", {}, a.classes.map((c) => h("tr", {},
      h("td", {}, c.index), h("td", {}, c.name),
      h("td", {}, h("span", { class: "row nowrap" },
        h("span", { class: "swatch", style: `--c:${modelColor(c.source_model_id)}`, "aria-hidden": "true" }),
        `${c.source_model_name} (#${c.source_model_id})`)),
      h("td", {}, `${c.source_class} (index ${c.source_class_index})`))))));
  const routes = h("section", { class: "card routes", "aria-labelledby": "routes-title" },
    h("h2", { id: "routes-title" }, "Decision routes"),
    ...(await Promise.all(a.sources.map((s) => routesFigure(
      s, models.get(s.model_id)?.name ?? `model ${s.model_id}`)))));
  detail.replaceChildren(
    h("div", { class: "two" },
      h("section", { class: "card", "aria-labelledby": "summary-title" },
        h("h2", { id: "summary-title" }, "Model"), facts, downloadBtn),
      h("section", { class: "card", "aria-labelledby": "lineage-title" },
        h("h2", { id: "lineage-title" }, "Lineage"), lineage)),
    tryIt(a),
    routes);
}

// ------------------------------------------------------------------ router

async function route() {
  const g = ++gen;
  timers.forEach(clearInterval);
  timers = [];
  const hash = location.hash || "#/catalog";
  if (!getKey()) {
    if (hash !== "#/signin") { location.hash = "#/signin"; return; }
    signInView();
    return;
  }
  if (hash === "#/signin") { location.hash = "#/catalog"; return; }
  nav.hidden = false;
  const view = hash.split("/")[1];
  for (const a of nav.querySelectorAll("a[data-view]")) {
    if (a.dataset.view === view) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  try {
    await loadConfig();
    if (view === "assemble") await renderAssemble(g);
    else if (view === "assemblies" && hash.split("/")[2]) await renderAssembly(+hash.split("/")[2], g);
    else if (view === "assemblies") await renderAssemblies(g);
    else await renderCatalog(g);
  } catch (e) {
    if (e instanceof Stale || e.status === 401 || g !== gen) return;
    setView(g, "Something went wrong", h("p", { class: "alert", role: "alert" }, e.message));
  }
}

document.getElementById("signout").addEventListener("click", () => {
  clearKey();
  location.hash = "#/signin";
});
window.addEventListener("hashchange", route);
route();
