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
const HIRES = ["hr_upscaler", "hr_scale", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y"];  // + its strength

function option(select, value, label) {
  const o = document.createElement("option");
  o.value = value; o.textContent = label || value; select.appendChild(o);
}

async function setup() {
  const [samplers, schedulers, options, latents, upscalers] = await Promise.all(
    ["samplers", "schedulers", "options", "latent-upscale-modes", "upscalers"].map((path) => api(path)));
  samplers.forEach((s) => option($("sampler_name"), s.name));
  schedulers.forEach((s) => option($("scheduler"), s.name, s.label));
  [...latents, ...upscalers].forEach((u) => option($("hr_upscaler"), u.name));  // as A1111: "Latent" first
  const d = options.latentdiff_defaults || {};
  for (const k of ["sampler_name", "scheduler", "steps", "cfg_scale", "width", "height"]) if (d[k] !== undefined) $(k).value = d[k];
  for (const k of ["width", "height"]) $(k).step = d.size_multiple || 8;
  $("model").textContent = options.sd_model_checkpoint || "";
  hiresSize();
}

// The hires fix: txt2img only (A1111's img2img has none), so it is off while a picture is loaded.
function hires() {
  const box = $("enable_hr"), on = box.checked && !picture.data;
  box.disabled = Boolean(picture.data);
  $("hires").hidden = $("hires").disabled = !on;  // disabled: its fields are neither sent nor validated
}

function hiresSize() {  // the second pass's size, as the server works it out (pipeline.Hires.sizes)
  const w = Number($("width").value), h = Number($("height").value), m = Number($("width").step) || 8;
  const s = Number($("hr_scale").value), rx = Number($("hr_resize_x").value), ry = Number($("hr_resize_y").value);
  const to = !rx && !ry ? [Math.trunc(w * s), Math.trunc(h * s)] : !ry ? [rx, Math.floor(rx * h / w)]
    : !rx ? [Math.floor(ry * w / h), ry] : [rx, ry];
  const down = (v) => Math.max(m, Math.floor(v / m) * m);
  $("hr_size").textContent = w > 0 && h > 0 ? `from ${w}x${h} to ${down(to[0])}x${down(to[1])}` : "";
}

function request() {
  const body = {};
  for (const k of FIELDS) body[k] = NUMBERS.has(k) ? Number($(k).value) : $(k).value;
  if (picture.data) {  // img2img, and inpainting where the mask is painted
    Object.assign(body, { init_images: [picture.data], denoising_strength: Number($("denoising_strength").value) });
    if (picture.painted) Object.assign(body, {
      mask: $("mask").toDataURL("image/png"), mask_blur: Number($("mask_blur").value),
      inpainting_fill: Number($("inpainting_fill").value), inpaint_full_res: $("inpaint_full_res").checked,
      inpaint_full_res_padding: 32 });
  } else if ($("enable_hr").checked) {
    body.enable_hr = true;
    for (const k of HIRES) body[k] = k === "hr_upscaler" ? $(k).value : Number($(k).value);
    body.denoising_strength = Number($("hr_denoising_strength").value);
  }
  return body;
}

// The picture to start from and its mask: painted white (opaque) where the picture is to change; the server reads a
// transparent PNG's alpha as the mask, as A1111 does.
const picture = { data: null, painted: false };

function loadPicture(file) {
  const reader = new FileReader();
  reader.onload = () => {
    const img = new Image();
    img.onload = () => {
      for (const id of ["picture", "mask"]) { $(id).width = img.naturalWidth; $(id).height = img.naturalHeight; }
      $("picture").getContext("2d").drawImage(img, 0, 0);
      picture.data = reader.result; picture.painted = false;
      $("canvas_box").hidden = false;
      const m = Number($("width").step) || 8;  // the picture's size, in the model's multiples
      $("width").value = Math.max(m, Math.floor(img.naturalWidth / m) * m);
      $("height").value = Math.max(m, Math.floor(img.naturalHeight / m) * m);
      hires(); hiresSize();
    };
    img.src = reader.result;
  };
  reader.readAsDataURL(file);
}

function brush() {
  const canvas = $("mask"), ctx = canvas.getContext("2d");
  let last = null;
  const at = (e) => {
    const r = canvas.getBoundingClientRect();
    return [(e.clientX - r.left) * canvas.width / r.width, (e.clientY - r.top) * canvas.height / r.height];
  };
  const stroke = (to) => {
    const scale = canvas.width / canvas.getBoundingClientRect().width;
    ctx.globalCompositeOperation = $("erase").checked ? "destination-out" : "source-over";
    ctx.strokeStyle = ctx.fillStyle = "#fff";
    ctx.lineWidth = Number($("brush").value) * scale; ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath(); ctx.moveTo(...(last || to)); ctx.lineTo(...to); ctx.stroke();
    last = to; picture.painted = true;
  };
  canvas.addEventListener("pointerdown", (e) => { canvas.setPointerCapture(e.pointerId); last = null; stroke(at(e)); });
  canvas.addEventListener("pointermove", (e) => { if (last) stroke(at(e)); });
  for (const ev of ["pointerup", "pointercancel"]) canvas.addEventListener(ev, () => { last = null; });
  $("clear_mask").addEventListener("click", () => {
    ctx.clearRect(0, 0, canvas.width, canvas.height); picture.painted = false;
  });
  $("clear_picture").addEventListener("click", () => {
    picture.data = null; picture.painted = false; $("init_file").value = ""; $("canvas_box").hidden = true;
    hires();
  });
  $("init_file").addEventListener("change", (e) => { if (e.target.files[0]) loadPicture(e.target.files[0]); });
}

function reuse(params) {
  for (const k of FIELDS) if (params[k] !== undefined && params[k] !== null) $(k).value = params[k];
  if (!("init_images" in params)) {  // a txt2img answer: its hires fix, on or off
    $("enable_hr").checked = Boolean(params.enable_hr);
    if (params.enable_hr) {
      for (const k of HIRES) if (params[k] !== undefined && params[k] !== null) $(k).value = params[k];
      $("hr_denoising_strength").value = params.denoising_strength;
    }
    hires();
  }
  hiresSize();
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
    const r = await api(body.init_images ? "img2img" : "txt2img", body);
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
brush();
$("enable_hr").addEventListener("change", hires);
for (const k of ["width", "height", "hr_scale", "hr_resize_x", "hr_resize_y"])
  $(k).addEventListener("input", hiresSize);
$("interrupt").addEventListener("click", () => api("interrupt", {}));
setup().catch((e) => { $("status").textContent = "error: " + e.message; });
