// The page: A1111's /sdapi/v1 routes on the same origin (the browser sends the Basic auth it was asked for).
"use strict";
const $ = (id) => document.getElementById(id);
const api = async (path, body) => {
  const r = await fetch("/sdapi/v1/" + path, body === undefined ? {} :
    { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) {
    const d = data.detail;
    throw new Error(typeof d === "string" ? d : Array.isArray(d) ? d.map((e) => e.loc.slice(-1) + ": " + e.msg).join("; ") : r.statusText);
  }
  return data;
};
const FIELDS = ["prompt", "negative_prompt", "sampler_name", "scheduler", "steps", "cfg_scale", "seed", "width", "height", "batch_size"];
const NUMBERS = new Set(["steps", "cfg_scale", "seed", "width", "height", "batch_size"]);

function option(select, value, label) {
  const o = document.createElement("option");
  o.value = value; o.textContent = label || value; select.appendChild(o);
}

async function setup() {
  const [samplers, schedulers, options] = await Promise.all([api("samplers"), api("schedulers"), api("options")]);
  samplers.forEach((s) => option($("sampler_name"), s.name));
  schedulers.forEach((s) => option($("scheduler"), s.name, s.label));
  const d = options.latentdiff_defaults || {};
  for (const k of ["sampler_name", "scheduler", "steps", "cfg_scale", "width", "height"]) if (d[k] !== undefined) $(k).value = d[k];
  for (const k of ["width", "height"]) $(k).step = d.size_multiple || 8;
  $("model").textContent = options.sd_model_checkpoint || "";
}

function request() {
  const body = {};
  for (const k of FIELDS) body[k] = NUMBERS.has(k) ? Number($(k).value) : $(k).value;
  return body;
}

function reuse(params) {
  for (const k of FIELDS) if (params[k] !== undefined && params[k] !== null) $(k).value = params[k];
  window.scrollTo(0, 0);
}

function addResult(b64, infotext, params) {
  const card = $("card").content.firstElementChild.cloneNode(true);
  card.querySelector("img").src = "data:image/png;base64," + b64;
  card.querySelector("pre").textContent = infotext;
  card.querySelector(".reuse").addEventListener("click", () => reuse(params));
  $("gallery").prepend(card);
}

let polling = null;
async function poll() {
  try {
    const p = await api("progress");
    $("bar").style.width = (100 * p.progress).toFixed(1) + "%";
    if (p.state.job_count) $("status").textContent = `step ${p.state.sampling_step} / ${p.state.sampling_steps}` +
      (p.eta_relative > 0 ? `, about ${p.eta_relative.toFixed(1)} s left` : "");
    else if (p.state.queued) $("status").textContent = "waiting in the queue";
    if (p.current_image) { $("preview").src = "data:image/png;base64," + p.current_image; $("preview").hidden = false; }
  } catch (e) { /* the next poll tries again */ }
}

async function generate(ev) {
  ev.preventDefault();
  const body = request();
  $("generate").disabled = true; $("interrupt").disabled = false;
  $("bar").style.width = "0"; $("status").textContent = "starting"; $("preview").hidden = true;
  polling = setInterval(poll, 250);
  try {
    const r = await api("txt2img", body);
    const info = JSON.parse(r.info);
    for (let i = r.images.length - 1; i >= 0; i--)  // prepended last first, so a batch reads in seed order
      addResult(r.images[i], info.infotexts[i], Object.assign({}, r.parameters, { seed: info.all_seeds[i], batch_size: 1 }));
    $("bar").style.width = "100%";
    $("status").textContent = (info.interrupted ? "interrupted: " : "done: ") + `seed ${info.seed}`;
  } catch (e) {
    $("status").textContent = "error: " + e.message;
  } finally {
    clearInterval(polling);
    $("generate").disabled = false; $("interrupt").disabled = true; $("preview").hidden = true;
  }
}

$("form").addEventListener("submit", generate);
$("interrupt").addEventListener("click", () => api("interrupt", {}));
setup().catch((e) => { $("status").textContent = "error: " + e.message; });
