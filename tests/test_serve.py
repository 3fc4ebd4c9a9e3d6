"""`python -m latentdiff.serve`: A1111 API compatibility through the `webuiapi` client, same seed -> same image as
`generate`, the queue (merging, 503, interrupt), auth and exposure, and a real server process under load."""
import base64
import hashlib
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from latentdiff.cli import UsageError
from latentdiff.generate import main as generate_main
from latentdiff.io.files import file_hash
from latentdiff.io.images import parse_parameters
from latentdiff.serve.__main__ import load_config, main as serve_main
from latentdiff.serve.a1111 import ApiError, Txt2Img, resolve_sampler
from latentdiff.serve.app import create_app, is_loopback, make_job, progress_dict
from latentdiff.serve.worker import Checkpoint, ServeConfig, Task, Worker

webuiapi = pytest.importorskip("webuiapi")
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


def generated(tmp_path, name, *argv) -> Image.Image:
    """The image `python -m latentdiff.generate` writes for these arguments."""
    out = tmp_path / f"{name}.png"
    assert generate_main([str(a) for a in argv] + ["-o", str(out)]) == 0
    return Image.open(out)


class InProcess:
    """The app on uvicorn in a thread of this process, on a free loopback port."""

    def __init__(self, checkpoints, config=ServeConfig(), credentials=None, outdir=None):
        import uvicorn
        self.worker = Worker([Checkpoint(Path(c).resolve(), hashlib.sha256(Path(c).read_bytes()).hexdigest())
                              for c in checkpoints], config, device="cpu", outdir=outdir)
        self.worker.start()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.worker, credentials), host="127.0.0.1",
                                                    port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)

    def post(self, path, body, **kw):
        return requests.post(self.url + "/sdapi/v1/" + path, json=body, timeout=60, **kw)

    def get(self, path, **kw):
        return requests.get(self.url + "/sdapi/v1/" + path, timeout=60, **kw)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.worker.close()


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    s = InProcess([tiny_checkpoint])
    yield s
    s.close()


def api_for(server) -> "webuiapi.WebUIApi":
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler a", steps=2)


def wait_until(cond, timeout=20.0):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.01)


# ----------------------------------------------------------------------------------------------
# Compatibility: the calls webuiapi makes, and the images


def test_webuiapi_txt2img_is_generate_and_round_trips_from_png(server, tiny_checkpoint, tmp_path):
    api = api_for(server)
    r = api.txt2img(prompt="a red fox", negative_prompt="blurry", seed=7, steps=3, cfg_scale=5.0, width=64, height=64,
                    sampler_name="Euler a", batch_size=2)
    assert len(r.images) == 2 and r.images[0].size == (64, 64)
    assert r.info["all_seeds"] == [7, 8] and r.info["seed"] == 7 and r.info["sd_model_name"] == "tiny"
    assert r.info["sd_model_hash"] == file_hash(tiny_checkpoint) and len(r.info["infotexts"]) == 2
    assert r.parameters["prompt"] == "a red fox" and r.parameters["steps"] == 3 and r.parameters["seed"] == 7
    # The same batch through generate -n 2 gives the same pixels exactly: image i of the batch is seed + i.
    # (webuiapi sends scheduler "automatic": A1111's schedule for Euler a, Uniform.)
    assert generate_main(["a red fox", "--negative", "blurry", "--checkpoint", str(tiny_checkpoint), "--seed", "7",
                          "--steps", "3", "--guidance", "5.0", "--sampler", "Euler a Uniform", "-n", "2",
                          "-o", str(tmp_path / "ref.png")]) == 0
    for i in range(2):
        assert np.array_equal(pixels(r.images[i]), pixels(Image.open(tmp_path / f"ref-{i}.png")))
    # The PNG's parameters chunk regenerates the image through generate --from-png, alone rather than in a batch of
    # two: the same up to float rounding (BLAS picks its kernels by batch size, so the last bit may differ).
    params = parse_parameters(r.images[1].info["parameters"])
    assert (params["prompt"], params["negative"], params["Seed"], params["Sampler"]) == ("a red fox", "blurry", "8",
                                                                                        "Euler a Uniform")
    r.images[1].save(tmp_path / "served.png", pnginfo=_pnginfo(r.images[1]))
    again = generated(tmp_path, "again", "--from-png", tmp_path / "served.png", "--checkpoint", tiny_checkpoint)
    assert np.abs(pixels(again) - pixels(r.images[1])).max() <= 1


def _pnginfo(image):
    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", image.info["parameters"])
    return info


def test_webuiapi_img2img_is_generate_init_image(server, tiny_checkpoint, tmp_path):
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    init.save(tmp_path / "init.png")
    r = api_for(server).img2img(images=[init], prompt="a boat", seed=3, steps=4, denoising_strength=0.5,
                                width=64, height=64, sampler_name="DPM++ 2M", scheduler="karras", cfg_scale=6.0)
    assert r.parameters["init_images"] is None and r.info["denoising_strength"] == 0.5
    ref = generated(tmp_path, "ref", "a boat", "--checkpoint", tiny_checkpoint, "--seed", 3, "--steps", 4,
                    "--init-image", tmp_path / "init.png", "--strength", 0.5, "--sampler", "DPM++ 2M Karras",
                    "--guidance", 6.0)
    assert np.array_equal(pixels(r.image), pixels(ref))
    assert "Denoising strength: 0.5" in r.image.info["parameters"]


def test_samplers_schedulers_models_options_progress(server, tiny_checkpoint):
    api = api_for(server)
    samplers = api.get_samplers()
    assert {"Euler", "Euler a", "DPM++ 2M", "DPM++ 2M SDE", "DDIM"} <= {s["name"] for s in samplers}
    for s in samplers:  # every advertised name and alias is accepted, and means that sampler
        assert all(resolve_sampler(a, None, "x") == (s["name"], "default") for a in s["aliases"])
    assert {"automatic", "default", "uniform", "karras", "exponential", "polyexponential", "sgm_uniform",
            "kl_optimal", "align_your_steps", "simple", "normal", "ddim_uniform", "beta",
            "linear_quadratic"} == set(api.util_get_scheduler_names())
    names = {s["name"] for s in samplers}
    assert len(samplers) == 31 and {"UniPC", "LCM", "DPM++ SDE", "DDIM CFG++", "Restart"} <= names
    sha = hashlib.sha256(Path(tiny_checkpoint).read_bytes()).hexdigest()
    models = api.get_sd_models()
    assert models == [{"title": f"tiny [{sha[:10]}]", "model_name": "tiny", "hash": sha[:10], "sha256": sha,
                       "filename": "tiny.safetensors", "config": None}]
    options = api.get_options()
    assert api.util_get_current_model() == models[0]["title"] == options["sd_model_checkpoint"]
    assert api.set_options(options) is None  # the whole dict back: accepted (A1111 answers null), nothing changes
    api.util_set_model("tiny")  # webuiapi's closest-title match, then POST /options
    assert api.get_options() == options
    progress = api.get_progress()
    assert progress["progress"] == 0 and progress["state"]["job_count"] == 0 and progress["current_image"] is None


def test_sampler_names_split_into_sampler_and_schedule(server):
    base = {"prompt": "x", "steps": 1, "seed": 1, "width": 64, "height": 64}
    for name, scheduler, want in [("DPM++ 2M Karras", None, "DPM++ 2M Karras"), ("Euler", "Exponential", "Euler Exponential"),
                                  ("k_dpmpp_2m", "automatic", "DPM++ 2M Karras"),
                                  ("Euler a", "karras", "Euler a Karras"), ("UniPC", "automatic", "UniPC Automatic"),
                                  ("DPM++ SDE", "SGM Uniform", "DPM++ SDE SGM Uniform"), ("Euler", "default", "Euler")]:
        r = server.post("txt2img", dict(base, sampler_name=name, scheduler=scheduler)).json()
        assert parse_parameters(json.loads(r["info"])["infotexts"][0])["Sampler"] == want
    r = server.post("txt2img", dict(base, sampler_index="Heun"))  # A1111's older field
    assert json.loads(r.json()["info"])["sampler_name"] == "Heun"


def test_png_info(server):
    r = server.post("txt2img", {"prompt": "a tree", "negative_prompt": "fog", "steps": 1, "seed": 11, "width": 64})
    b64 = r.json()["images"][0]
    info = server.post("png-info", {"image": "data:image/png;base64," + b64}).json()
    assert info["info"].startswith("a tree\nNegative prompt: fog\nSteps: 1")
    p = info["parameters"]
    assert (p["Prompt"], p["Negative prompt"], p["Seed"], p["Size-1"], p["Size-2"]) == ("a tree", "fog", "11", "64", "64")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="JPEG")  # its base64 starts with "/9j/", like a path
    jpeg = base64.b64encode(buf.getvalue()).decode()
    assert jpeg.startswith("/") and server.post("png-info", {"image": jpeg}).json()["info"] == ""


def test_errors_have_a1111_shape_and_status(server):
    def check(r, status, fragment):
        body = r.json()
        assert r.status_code == status and {"error", "detail", "body", "errors"} <= set(body), body
        assert fragment in json.dumps(body["detail"]), body

    check(server.post("txt2img", {"prompt": "x", "steps": "many"}), 422, "steps")
    check(server.post("txt2img", {"prompt": "x", "steps": 151}), 422, "steps must be in 1..150")
    check(server.post("txt2img", {"prompt": "x", "width": 60}), 422, "multiples of 8")
    check(server.post("txt2img", {"prompt": "x", "width": 4096, "height": 64}), 422, "over this server's limit")
    check(server.post("txt2img", {"prompt": "x", "batch_size": 9, "n_iter": 2}), 422, "batch_size * n_iter")
    check(server.post("txt2img", {"prompt": "x", "enable_hr": True, "hr_scale": 8, "width": 512, "height": 512}), 422,
          "the hires size 4096x4096 is over this server's limit")
    check(server.post("txt2img", {"prompt": "x" * 10001}), 422, "at most 10000 characters")
    check(server.post("txt2img", {"prompt": "x", "alwayson_scripts": {"ControlNet": {"args": []}}}), 422, "alwayson")
    check(server.post("txt2img", {"prompt": "x", "sampler_name": "Magic 9000"}), 404, "Sampler not found")
    check(server.post("txt2img", {"prompt": "x", "scheduler": "Cubic"}), 404, "Scheduler not found")
    check(server.post("txt2img", {"prompt": "x", "override_settings": {"sd_model_checkpoint": "nope"}}), 404, "Model not found")
    check(server.post("img2img", {"prompt": "x", "init_images": ["bm90IGFuIGltYWdl"]}), 400, "Invalid encoded image")
    check(server.post("img2img", {"prompt": "x", "init_images": []}), 422, "init_images")
    check(server.get("no-such-route"), 404, "Not Found")


# ----------------------------------------------------------------------------------------------
# The queue: merging, interrupt, progress, 503


def test_waiting_requests_merge_into_one_batch_with_the_same_images(server, tiny_checkpoint, tmp_path):
    def request(prompt, seed, steps=2):
        return server.post("txt2img", {"prompt": prompt, "seed": seed, "steps": steps, "width": 64, "height": 64,
                                       "sampler_name": "Euler", "cfg_scale": 4.0})

    runs = len(server.worker.batches)
    with ThreadPoolExecutor(4) as pool:
        blocker = pool.submit(request, "slow", 0, 80)  # holds the worker while the others queue up
        wait_until(lambda: server.worker.running)
        futures = [pool.submit(request, p, s) for p, s in [("a cat", 1), ("a dog", 2), ("a cow", 3)]]
        wait_until(lambda: server.worker.queued() == 3 or blocker.done())
        assert not blocker.done(), "the blocking request finished before the others queued; make it longer"
        results = [f.result() for f in futures]
    assert list(server.worker.batches)[runs:] == [1, 3]  # the blocker alone, then the three waiting requests at once
    for (prompt, seed), r in zip([("a cat", 1), ("a dog", 2), ("a cow", 3)], results):
        image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
        ref = generated(tmp_path, prompt, prompt, "--checkpoint", tiny_checkpoint, "--seed", seed, "--steps", 2,
                        "--sampler", "Euler", "--guidance", 4.0)
        assert np.abs(pixels(image) - pixels(ref)).max() <= 1  # batch of 3 vs 1: equal up to float rounding


def test_interrupt_stops_the_job_and_progress_shows_steps_and_preview(server):
    body = {"prompt": "long", "seed": 5, "steps": 150, "width": 64, "height": 64, "sampler_name": "Euler"}
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(server.post, "txt2img", body)
        seen = []

        def stepped():
            p = server.get("progress").json()
            seen.append(p)
            return p["state"]["sampling_step"] >= 3 and p["current_image"]
        wait_until(stepped)
        assert server.post("interrupt", {}).json() == {}
        r = job.result(timeout=30)
    info = json.loads(r.json()["info"])
    assert r.status_code == 200 and info["interrupted"] is True and len(r.json()["images"]) == 1
    last = seen[-1]
    assert last["state"]["job_count"] == 1 and last["state"]["sampling_steps"] == 150 and 0 < last["progress"] < 0.5
    assert Image.open(io.BytesIO(base64.b64decode(last["current_image"]))).size == (64, 64)
    assert server.worker.progress.sampling_step == 0 and server.get("progress").json()["progress"] == 0
    # The next job is not affected by the interrupt.
    r = server.post("txt2img", dict(body, steps=2))
    assert json.loads(r.json()["info"])["interrupted"] is False


def test_models_selectable_by_title_and_save_images(tiny_config, tiny_checkpoint, tmp_path):
    from conftest import build_models
    from latentdiff.io.checkpoint import save_models
    other = tmp_path / "other.safetensors"
    models = build_models(tiny_config, seed=1)
    save_models(other, models.config, models.unet, models.vae, models.text)
    s = InProcess([tiny_checkpoint, other], outdir=tmp_path / "out")
    try:
        titles = [m["title"] for m in s.get("sd-models").json()]
        assert [t.split(" [")[0] for t in titles] == ["tiny", "other"]
        body = {"prompt": "a kite", "seed": 9, "steps": 2, "width": 64, "height": 64}

        def image(r):
            assert r.status_code == 200, r.text
            return pixels(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))))

        first = s.post("txt2img", body)
        once = s.post("txt2img", dict(body, override_settings={"sd_model_checkpoint": titles[1]}, save_images=True))
        assert json.loads(once.json()["info"])["sd_model_name"] == "other"
        assert not np.array_equal(image(first), image(once))
        assert s.get("options").json()["sd_model_checkpoint"] == titles[0]  # an override lasts one request
        assert s.post("options", {"sd_model_checkpoint": "other.safetensors"}).status_code == 200  # A1111's aliases
        assert s.get("options").json()["sd_model_checkpoint"] == titles[1]
        assert np.array_equal(image(s.post("txt2img", body)), image(once))
        saved = sorted((tmp_path / "out").iterdir())  # save_images=true writes into the server's --outdir only
        assert [p.name for p in saved] == ["a-kite-9.png"]
        assert np.array_equal(pixels(Image.open(saved[0])), image(once))
        assert "Model: other" in Image.open(saved[0]).info["parameters"]
    finally:
        s.close()


def test_limits_from_a_config_file(tmp_path):
    (tmp_path / "serve.yaml").write_text("serve:\n  max_steps: 10\n  max_queue: 2\n")
    c = load_config(str(tmp_path / "serve.yaml"), ["--serve.max_queue=5"])
    assert (c.max_steps, c.max_queue, c.max_images) == (10, 5, ServeConfig().max_images)
    (tmp_path / "bad.yaml").write_text("serve:\n  max_step: 10\n")
    with pytest.raises(UsageError, match="unknown config key.*serve.max_step.*valid keys"):
        load_config(str(tmp_path / "bad.yaml"), [])


def test_full_queue_answers_503_at_once(tiny_checkpoint):
    s = InProcess([tiny_checkpoint], ServeConfig(max_queue=0))
    try:
        t = time.time()
        r = s.post("txt2img", {"prompt": "x", "steps": 1})
        assert r.status_code == 503 and "Queue is full" in r.json()["detail"] and time.time() - t < 2
    finally:
        s.close()


# ----------------------------------------------------------------------------------------------
# Security: auth on every route, no paths read or shown, refused binds


ROUTES = [("GET", "/"), ("GET", "/static/app.js"), ("GET", "/static/style.css"), ("GET", "/static/missing"),
          ("GET", "/openapi.json"), ("GET", "/no-such-route"), ("POST", "/sdapi/v1/txt2img"),
          ("POST", "/sdapi/v1/img2img"), ("GET", "/sdapi/v1/samplers"), ("GET", "/sdapi/v1/schedulers"),
          ("GET", "/sdapi/v1/sd-models"), ("GET", "/sdapi/v1/options"), ("POST", "/sdapi/v1/options"),
          ("GET", "/sdapi/v1/progress"), ("POST", "/sdapi/v1/interrupt"), ("POST", "/sdapi/v1/png-info"),
          ("GET", "/sdapi/v1/cmd-flags")]


def test_basic_auth_on_every_route(tiny_checkpoint):
    s = InProcess([tiny_checkpoint], credentials=[("ann", "s3cret:pw"), ("bob", "hunter2")])
    try:
        for method, path in ROUTES:
            for auth in [None, ("ann", "wrong"), ("bob", "s3cret:pw"), ("", ""), ("ann", "s3cret:p")]:
                r = requests.request(method, s.url + path, auth=auth, json={}, timeout=30)
                assert r.status_code == 401, (method, path, auth, r.status_code)
                assert r.headers["www-authenticate"].startswith("Basic") and "s3cret" not in r.text
                assert r.json()["detail"] == "Incorrect username or password"
            r = requests.request(method, s.url + path, auth=("ann", "s3cret:pw"), timeout=30)
            assert r.status_code != 401, (method, path)
        r = requests.get(s.url + "/", headers={"Authorization": "Basic %%%"}, timeout=30)
        assert r.status_code == 401
        api = webuiapi.WebUIApi(port=s.port, username="bob", password="hunter2", sampler="Euler a", steps=1)
        assert api.txt2img(prompt="x", width=64, height=64).image.size == (64, 64)
        # Open WebUI's calls, in its order: options, the whole dict back with a model title, sd-models, txt2img.
        auth = {"authorization": "Basic " + base64.b64encode(b"ann:s3cret:pw").decode()}
        options = requests.get(s.url + "/sdapi/v1/options", headers=auth, timeout=30).json()
        models = requests.get(s.url + "/sdapi/v1/sd-models", headers=auth, timeout=30).json()
        options["sd_model_checkpoint"] = models[0]["title"]
        assert requests.post(s.url + "/sdapi/v1/options", json=options, headers=auth, timeout=30).status_code == 200
        r = requests.post(s.url + "/sdapi/v1/txt2img", headers=auth, timeout=60, json={
            "prompt": "a fox", "batch_size": 2, "width": 64, "height": 64, "steps": 2, "negative_prompt": "",
            "cfg_scale": 7.0, "sampler_name": "Euler a", "scheduler": "Karras"}).json()
        assert [Image.open(io.BytesIO(base64.b64decode(b))).size for b in r["images"]] == [(64, 64)] * 2
    finally:
        s.close()


def test_no_route_reads_or_reveals_a_path(server, tiny_checkpoint, tmp_path):
    folder = str(Path(tiny_checkpoint).resolve().parent)
    for image in ["/etc/passwd", "file:///etc/passwd", "http://127.0.0.1:1/a.png", "https://example.com/a.png",
                  str(tiny_checkpoint)]:
        r = server.post("img2img", {"prompt": "x", "init_images": [image]})
        detail = r.json()["detail"]
        assert r.status_code == 400 and ("Images must be base64" in detail or "Invalid encoded image" in detail)
        assert server.post("png-info", {"image": image}).status_code == 400
    for path in ["/static/../app.py", "/static/..%2fapp.py", "/static/%2e%2e%2f__init__.py", "/static/index.html/..",
                 "/static//etc/passwd", "/../../etc/passwd"]:
        r = requests.get(server.url + path, timeout=30)
        assert r.status_code == 404 and "import" not in r.text and "root:" not in r.text, path
    # Bodies are bounded: a declared length over the cap, or no length at all, is refused before reading.
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:  # requests would fix the length
        sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n{" % (60 * 2**20))
        assert sock.recv(4096).startswith(b"HTTP/1.1 413 ")
    r = requests.post(server.url + "/sdapi/v1/txt2img", data=iter([b'{"prompt": "x"}']), timeout=30,
                      headers={"Content-Type": "application/json"})  # a generator body is sent chunked
    assert r.status_code == 411
    # Without auth on loopback, only requests that name a loopback host are answered (no DNS rebinding).
    for host, status in [("evil.example", 400), ("evil.example:80", 400), ("127.0.0.1.evil.example", 400),
                         (f"localhost:{server.port}", 200), (f"[::1]:{server.port}", 200), ("127.0.0.1", 200)]:
        assert requests.get(server.url + "/sdapi/v1/options", headers={"Host": host}, timeout=30).status_code == status
    # A path where a model title belongs is not a model, and unknown options (A1111's output folders) are ignored.
    r = server.post("options", {"sd_model_checkpoint": str(tiny_checkpoint)})
    assert r.status_code == 404
    before = server.get("options").json()
    assert server.post("options", {"outdir_samples": str(tmp_path / "x"), "samples_format": "../x"}).status_code == 200
    assert server.get("options").json() == before and not (tmp_path / "x").exists()
    # Nothing any GET route answers names the model folder, the home folder or an environment value.
    secrets = [folder, str(Path.home()), os.environ.get("PATH", "/usr/bin:"), sys.executable]
    for method, path in ROUTES:
        if method == "GET":
            text = requests.get(server.url + path, timeout=30).text
            assert not any(s in text for s in secrets), path
    text = server.post("txt2img", {"prompt": "x", "steps": 1}).text
    assert not any(s in text for s in secrets)


def test_bind_without_auth_refused_and_missing_model_one_line(tiny_checkpoint, capsys, monkeypatch):
    assert serve_main(["--host", "0.0.0.0", "--checkpoint", str(tiny_checkpoint)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refusing to serve on 0.0.0.0 without authentication" in err
    assert serve_main(["--host", "::", "--api-auth", "nopassword"]) == 2
    assert "--api-auth must look like USER:PASSWORD" in capsys.readouterr().err
    monkeypatch.setattr("latentdiff.io.checkpoint.BUNDLED", Path("/nonexistent/emoji.safetensors"))
    assert serve_main([]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no model to serve" in err and "--checkpoint" in err
    assert serve_main(["--checkpoint", str(tiny_checkpoint), "--serve.max_stepz=3"]) == 2
    assert "unknown config key(s) serve.max_stepz" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert serve_main(["--checkpoint", str(tiny_checkpoint), "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot listen on 127.0.0.1:" in err and "in use" in err
    assert [is_loopback(h) for h in ["127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost", "0.0.0.0", "::",
                                     "192.168.1.2", "example.com"]] == [True] * 5 + [False] * 4


# ----------------------------------------------------------------------------------------------
# A real server process: webuiapi against it, concurrent clients, 503s, memory back to baseline


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start_process(checkpoint, *extra, port=None):
    """`python -m latentdiff.serve` as a child process on a free loopback port; returns (process, url)."""
    port = port or free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "latentdiff.serve", "--checkpoint", str(checkpoint),
                             "--port", str(port), "--device", "cpu", *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            requests.get(url + "/sdapi/v1/progress", timeout=2)
            return proc, url
        except requests.ConnectionError:
            assert time.time() < deadline, "server process did not start"
            time.sleep(0.2)


@pytest.mark.slow  # a server process start and ~60 requests: ~15 s on 2 cores
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's RSS from /proc")
def test_real_process_concurrent_clients_queue_limit_and_memory(tiny_checkpoint, tmp_path):
    proc, url = start_process(tiny_checkpoint, "--serve.max_queue=3", "--serve.merge_images=4")
    try:
        port = int(url.rsplit(":", 1)[1])
        api = webuiapi.WebUIApi(port=port, sampler="Euler", steps=2)

        def one(seed):
            return api.txt2img(prompt=f"image {seed % 3}", seed=seed, steps=2, width=64, height=64, cfg_scale=3.0)

        with ThreadPoolExecutor(3) as pool:  # warm-up under the same load: allocator caches reach their steady state
            list(pool.map(one, range(12)))
        baseline = rss_mb(proc.pid)
        t = time.time()
        with ThreadPoolExecutor(3) as pool:  # 3 clients: never more than the 3 the queue holds
            results = list(pool.map(one, range(100, 124)))
        assert time.time() - t < 120
        for seed, r in zip(range(100, 124), results):
            assert r.info["all_seeds"] == [seed] and r.images[0].size == (64, 64)
        # Same request, same image, whether it ran merged into a batch or alone.
        alone = one(107)
        assert np.abs(pixels(alone.image) - pixels(results[7].image)).max() <= 1
        assert not np.array_equal(pixels(results[0].image), pixels(results[3].image))  # seeds differ
        # The rest of webuiapi's calls against the process: img2img, png-info, samplers, models, options, progress.
        r = api.img2img(images=[results[0].image], prompt="again", seed=5, steps=2, width=64, height=64,
                        denoising_strength=0.6)
        assert r.image.size == (64, 64) and r.info["all_seeds"] == [5]
        assert api.png_info(r.image).info.startswith("again\nSteps: 2")
        assert "Euler a" in api.util_get_sampler_names() and "karras" in api.util_get_scheduler_names()
        assert api.util_get_model_names() == [api.util_get_current_model()]
        assert api.get_progress()["state"]["job_count"] == 0
        grown = rss_mb(proc.pid) - baseline
        print(f"server RSS: baseline {baseline:.0f} MB, +{grown:.1f} MB after 24 requests from 3 clients")
        assert grown < 40, f"server RSS grew {grown:.1f} MB over its baseline of {baseline:.0f} MB"

        # Many more clients than the queue holds: some 503 at once, the rest succeed, the server stays up.
        def raw(seed):
            return requests.post(url + "/sdapi/v1/txt2img", json={"prompt": "q", "seed": seed, "steps": 8,
                                                                  "width": 64, "height": 64}, timeout=120)
        with ThreadPoolExecutor(12) as pool:
            codes = [r.status_code for r in pool.map(raw, range(12))]
        assert set(codes) == {200, 503} and codes.count(200) >= 4, codes
        assert requests.get(url + "/sdapi/v1/progress", timeout=10).json()["state"]["job_count"] == 0
        assert rss_mb(proc.pid) - baseline < 40
    finally:
        proc.terminate()
        proc.wait(30)


# ----------------------------------------------------------------------------------------------
# Hardening: what a hostile client tried (issue 20)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encoded(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return b64(buf.getvalue())


def decoded_image(b64text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64text)))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header says width x height, with a few bytes of pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


@pytest.fixture
def decoded(monkeypatch):
    """Every image the process decodes (or hands to Ghostscript), as (reader, size)."""
    from PIL import EpsImagePlugin, ImageFile
    calls = []

    def spy(original):
        def load(self):
            calls.append((type(self).__name__, self.size))
            return original(self)
        return load
    monkeypatch.setattr(ImageFile.ImageFile, "load", spy(ImageFile.ImageFile.load))
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "load", spy(EpsImagePlugin.EpsImageFile.load))
    return calls


def test_only_png_jpeg_and_webp_are_decoded_and_only_after_their_size_is_read(server, decoded):
    big = io.BytesIO()
    Image.new("1", (3000, 3000)).save(big, format="PNG")
    png = big.getvalue()
    # An icon whose directory says 16x16 around a 3000x3000 PNG: Pillow's ICO reader decodes the PNG while opening
    # the file, before a size can be checked (the review's 12000x12000 one took 550 MB).
    ico = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 22) + png
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\nshowpage\n"  # Ghostscript would run it
    bmp = base64.b64decode(encoded(Image.new("RGB", (8, 8)), "BMP"))
    refused = [(ico, "send a base64 PNG, JPEG or WebP"), (eps, "send a base64 PNG, JPEG or WebP"),
               (bmp, "send a base64 PNG, JPEG or WebP"), (png, "3000x3000 is too large"),
               (png_claiming(5000, 5000), "5000x5000 is too large"), (png_claiming(10**5, 10**5), "too large")]
    for data, fragment in refused:
        small = encoded(Image.new("RGB", (8, 8)), "PNG")
        for path, body, status in [  # a bad mask is one of the request's field problems, answered together: 422
                ("img2img", {"prompt": "x", "init_images": [b64(data)]}, 400), ("png-info", {"image": b64(data)}, 400),
                ("img2img", {"prompt": "x", "init_images": [small], "mask": b64(data)}, 422)]:
            r = server.post(path, body)
            assert r.status_code == status and fragment in r.json()["detail"], (path, fragment, r.text)
    assert {size for _, size in decoded} <= {(8, 8)}  # refused from the header alone (8x8: the masks' init image)
    decoded.clear()
    for fmt in ["PNG", "JPEG", "WEBP"]:  # what clients send still works
        assert server.post("png-info", {"image": encoded(Image.new("RGB", (8, 8), "red"), fmt)}).status_code == 200
    assert [size for _, size in decoded] == [(8, 8)] * 3


def test_validation_errors_stay_few_and_small(server):
    """pydantic reports every bad item: a long list of them drew an answer 60x the request's size."""
    fields = ["steps", "seed", "width", "height", "batch_size", "n_iter", "cfg_scale", "subseed", "subseed_strength",
              "enable_hr", "send_images", "save_images", "restore_faces", "tiling"]
    for path, body, fragment in [
            ("txt2img", {"styles": [0] * 200_000}, "at most 64 items"),
            ("img2img", {"init_images": [0] * 200_000}, "at most 64 items"),
            ("txt2img", {"styles": ["a"] * 65}, "at most 64 items"),
            ("txt2img", {"override_settings": {str(i): i for i in range(100_000)}}, "at most 1024 items"),
            ("txt2img", {k: "x" for k in fields}, "and 4 more errors")]:
        r = server.post(path, body)
        body = r.json()
        assert r.status_code == 422 and {"error", "detail", "body", "errors"} <= set(body), r.text[:200]
        assert len(r.content) < 8000 and len(body["detail"]) <= 11, (path, len(r.content), len(body["detail"]))
        assert fragment in json.dumps(body["detail"]), body["detail"]


def test_cross_site_requests_are_refused_and_the_page_s_own_are_not(server):
    own = f"http://127.0.0.1:{server.port}"
    body = {"prompt": "long", "seed": 5, "steps": 150, "width": 64, "height": 64, "sampler_name": "Euler"}
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(server.post, "txt2img", body)
        wait_until(lambda: server.get("progress").json()["state"]["sampling_step"] >= 2)
        for headers in [{"Origin": "https://evil.example"}, {"Origin": "null"}, {"Origin": "http://127.0.0.1"},
                        {"Origin": f"http://127.0.0.1:{server.port + 1}"}, {"Origin": f"https://127.0.0.1:{server.port}"},
                        {"Origin": f"http://localhost:{server.port}"}, {"Origin": "http://[::1"},
                        {"Sec-Fetch-Site": "cross-site"}, {"Origin": own, "Sec-Fetch-Site": "cross-site"}]:
            r = requests.post(server.url + "/sdapi/v1/interrupt", headers=headers, timeout=30)
            assert r.status_code == 403 and "Cross-origin request refused" in r.json()["detail"], headers
        assert not job.done() and not server.worker.progress.interrupted  # the job goes on
        r = server.post("options", {"CLIP_stop_at_last_layers": 2}, headers={"Origin": "https://evil.example"})
        assert r.status_code == 403 and server.get("options").json()["CLIP_stop_at_last_layers"] == 1
        # The page's own requests (same origin, as a browser sends them) stop it.
        r = requests.post(server.url + "/sdapi/v1/interrupt", json={}, timeout=30,
                          headers={"Origin": own, "Sec-Fetch-Site": "same-origin"})
        assert r.status_code == 200
        assert json.loads(job.result(timeout=30).json()["info"])["interrupted"] is True
    # Bodies a page can send anywhere without asking (forms, text/plain) are not JSON: refused.
    text = json.dumps({"prompt": "x", "steps": 1})
    for headers, data in [({"Content-Type": "text/plain"}, text), ({}, text),
                          ({"Content-Type": "application/x-www-form-urlencoded"}, "prompt=x"),
                          ({"Content-Type": "multipart/form-data; boundary=b"}, "--b--")]:
        r = requests.post(server.url + "/sdapi/v1/txt2img", data=data, headers=headers, timeout=30)
        assert r.status_code == 415 and "Content-Type: application/json" in r.json()["detail"], headers
    r = requests.post(server.url + "/sdapi/v1/txt2img", data=text, timeout=60,
                      headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200
    assert requests.post(server.url + "/sdapi/v1/interrupt", timeout=30).status_code == 200  # webuiapi: no body


def test_a_request_cancelled_while_waiting_leaves_the_worker_running(tiny_checkpoint):
    """asyncio cancels the future of a request whose client went away (uvicorn at shutdown, other servers on a
    disconnect); answering it used to raise in the worker thread and end it, and every later request hung."""
    s = InProcess([tiny_checkpoint])
    try:
        gate = threading.Event()
        s.worker.submit(Task(lambda: gate.wait(30)))
        wait_until(lambda: s.worker.running)
        gone = s.worker.submit(make_job(s.worker, Txt2Img(prompt="gone", steps=1)))
        assert gone.cancel()
        gate.set()
        r = requests.post(s.url + "/sdapi/v1/txt2img", json={"prompt": "next", "steps": 1}, timeout=20)
        assert r.status_code == 200 and s.worker.thread.is_alive()
    finally:
        s.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread's end, on purpose
def test_a_dead_worker_answers_503_everywhere(tiny_checkpoint):
    s = InProcess([tiny_checkpoint])
    try:
        def escape():
            raise SystemExit  # stands for any error that gets past the worker loop's handlers
        lost = s.worker.submit(Task(escape))
        wait_until(lambda: not s.worker.thread.is_alive())
        with pytest.raises(ApiError) as e:
            lost.result(timeout=5)  # the request that was running is answered, not left waiting
        assert e.value.status == 503
        for method, path in [("GET", "/sdapi/v1/options"), ("GET", "/"), ("POST", "/sdapi/v1/txt2img")]:
            r = requests.request(method, s.url + path, json={"prompt": "x", "steps": 1}, timeout=20)
            assert r.status_code == 503 and "restart the server" in r.json()["detail"], (path, r.text)
    finally:
        s.close()


def test_a_short_prompt_merged_with_a_long_one_gives_the_image_it_gives_alone(server, tiny_checkpoint, tmp_path):
    """A batch encodes every prompt to its longest one's 75-token chunks; a short prompt padded with empty chunks
    draws another image, so prompts of different chunk counts do not share a batch."""
    long = "a lighthouse on a cliff at dusk, " * 12  # 96 tokens: two chunks
    base = {"steps": 2, "width": 64, "height": 64, "sampler_name": "Euler", "cfg_scale": 4.0}
    with ThreadPoolExecutor(3) as pool:
        blocker = pool.submit(server.post, "txt2img", dict(base, prompt="slow", seed=0, steps=80))
        wait_until(lambda: server.worker.running)
        futures = [pool.submit(server.post, "txt2img", dict(base, prompt=p, seed=s)) for p, s in [("a cat", 1), (long, 2)]]
        wait_until(lambda: server.worker.queued() == 2 or blocker.done())
        assert not blocker.done(), "the blocking request finished before the others queued; make it longer"
        results = [f.result().json() for f in futures]
    for (prompt, seed), r in zip([("a cat", 1), (long, 2)], results):
        ref = generated(tmp_path, f"alone{seed}", prompt, "--checkpoint", tiny_checkpoint, "--seed", seed, "--steps", 2,
                        "--sampler", "Euler", "--guidance", 4.0)
        assert np.abs(pixels(decoded_image(r["images"][0])) - pixels(ref)).max() <= 1, prompt[:20]


def test_an_interrupt_in_a_split_batch_keeps_finished_images_and_deals_each_job_its_own(server, monkeypatch):
    """A batch larger than the device holds runs in parts; an interrupt in the second part must keep the first
    part's finished images and give each merged job the images of its own seeds."""
    import torch
    from latentdiff.io.images import to_pil
    worker, pipe = server.worker, server.worker.pipe
    monkeypatch.setattr(pipe, "max_batch", lambda *a, **k: 1)  # a device that holds one image at a time
    sample = pipe._sample

    def interrupt_at_job_b(prompts, *args, **kw):
        if prompts[0] == "job b":
            worker.interrupt()  # it stops at its first step
        return sample(prompts, *args, **kw)
    monkeypatch.setattr(pipe, "_sample", interrupt_at_job_b)
    base = {"steps": 3, "width": 64, "height": 64, "sampler_name": "Euler", "cfg_scale": 4.0}
    with ThreadPoolExecutor(3) as pool:
        blocker = pool.submit(server.post, "txt2img", dict(base, prompt="slow", seed=0, steps=80))
        wait_until(lambda: worker.running)
        a = pool.submit(server.post, "txt2img", dict(base, prompt="job a", seed=1))
        wait_until(lambda: worker.queued() == 1 or blocker.done())  # a first: the batch is [a, b]
        b = pool.submit(server.post, "txt2img", dict(base, prompt="job b", seed=2))
        wait_until(lambda: worker.queued() == 2 or blocker.done())
        assert not blocker.done(), "the blocking request finished before the others queued; make it longer"
        runs = len(worker.batches)
        blocker.result()
        a, b = a.result().json(), b.result().json()
    assert list(worker.batches)[runs:] == [2]  # one batch of both, which the pipeline split in two
    info_a, info_b = json.loads(a["info"]), json.loads(b["info"])
    assert len(a["images"]) == len(b["images"]) == 1 and info_b["interrupted"] is True
    assert (info_a["all_seeds"], info_b["all_seeds"]) == ([1], [2])
    assert parse_parameters(info_b["infotexts"][0])["prompt"] == "job b"
    monkeypatch.setattr(pipe, "_sample", sample)
    alone = server.post("txt2img", dict(base, prompt="job a", seed=1)).json()  # a finished: the image it gives alone
    assert np.abs(pixels(decoded_image(a["images"][0])) - pixels(decoded_image(alone["images"][0]))).max() <= 1
    first = []  # b: its predicted x0 after its first step, as A1111 answers an interrupted job
    pipe(["job b"], [""], seed=2, generators=[torch.Generator().manual_seed(2)], steps=3, sampler="Euler",
         guidance=4.0, height=64, width=64, progress=False, callback=lambda info: first.append(info["denoised"]))
    ref = to_pil(pipe.decode(first[0]))[0]
    assert np.abs(pixels(decoded_image(b["images"][0])) - pixels(ref)).max() <= 1


def test_img2img_progress_runs_to_one_without_going_back(server, monkeypatch):
    worker, pipe = server.worker, server.worker.pipe
    monkeypatch.setattr(pipe, "max_batch", lambda *a, **k: 1)  # the two images run one after the other
    seen, make = [], worker._step_callback

    def recording(p):
        inner = make(p)

        def on_step(info):
            inner(info)
            seen.append(progress_dict(worker, True)["progress"])
        return on_step
    monkeypatch.setattr(worker, "_step_callback", recording)
    init = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    r = server.post("img2img", {"prompt": "x", "init_images": [init], "steps": 10, "denoising_strength": 0.5,
                                "batch_size": 2, "seed": 1, "width": 64, "height": 64})
    assert r.status_code == 200
    assert seen == pytest.approx([i / 10 for i in range(1, 11)])  # 5 steps (0.5 of 10) for each of the two images


def test_prompts_are_limited_in_tokens_before_any_work(server):
    runs = len(server.worker.batches)
    long = "\u0d9e" * 1000  # 1000 characters, 2000 tokens: 27 chunks of context, each a CUDA graph shape of its own
    for body in [{"prompt": long}, {"prompt": "x", "negative_prompt": long}, {"prompt": "a " * 1501}]:
        r = server.post("txt2img", dict(body, steps=1))
        assert r.status_code == 422 and "at most 1500 tokens (20 chunks of 75); got" in r.json()["detail"], r.text
    assert len(server.worker.batches) == runs  # refused before the queue
    r = server.post("txt2img", {"prompt": "\u0d9e" * 750, "steps": 1, "width": 64, "height": 64})  # 1500: the limit
    assert r.status_code == 200, r.text
    assert load_config(None, ["--serve.max_prompt_chunks=4"]).max_prompt_chunks == 4


def test_clip_skip_and_seed_ranges_are_the_model_s_and_their_messages_say_so(server):
    base = {"prompt": "x", "steps": 1, "width": 64, "height": 64}
    for value in [3, 99, 0, True, 1.5, "2"]:  # the tiny model's text encoder has 2 layers
        r = server.post("txt2img", dict(base, override_settings={"CLIP_stop_at_last_layers": value}))
        assert r.status_code == 422 and "CLIP_stop_at_last_layers must be an integer in 1..2" in r.json()["detail"]
        r = server.post("options", {"CLIP_stop_at_last_layers": value})
        assert r.status_code == 422 and "CLIP_stop_at_last_layers must be an integer in 1..2" in r.json()["detail"]
    assert server.get("options").json()["CLIP_stop_at_last_layers"] == 1  # refused settings change nothing
    r = server.post("txt2img", dict(base, override_settings={"CLIP_stop_at_last_layers": 2}))
    assert r.status_code == 200 and json.loads(r.json()["info"])["clip_skip"] == 2
    try:
        assert server.post("options", {"CLIP_stop_at_last_layers": 2}).status_code == 200
        assert json.loads(server.post("txt2img", base).json()["info"])["clip_skip"] == 2
    finally:
        assert server.post("options", {"CLIP_stop_at_last_layers": 1}).status_code == 200
    for seed, n, top in [(-2, 1, 2**63 - 1), (2**63, 1, 2**63 - 1), (2**63 - 1, 2, 2**63 - 2)]:
        r = server.post("txt2img", dict(base, seed=seed, batch_size=n))
        assert r.status_code == 422 and f"seed must be -1 (random) or in 0..{top} for {n} image(s)" in r.json()["detail"]
    assert json.loads(server.post("txt2img", dict(base, seed=2**63 - 2, batch_size=2)).json()["info"])["all_seeds"] \
        == [2**63 - 2, 2**63 - 1]


def test_options_read_booleans_as_a1111_clients_send_them_and_zero_sizes_are_refused(server):
    try:
        for value, want in [("false", False), ("true", True), (0, False), ("off", False), ("1", True)]:
            assert server.post("options", {"live_previews_enable": value}).status_code == 200
            assert server.get("options").json()["live_previews_enable"] is want, value
        r = server.post("options", {"live_previews_enable": "maybe"})
        assert r.status_code == 422 and "live_previews_enable must be true or false" in r.json()["detail"]
    finally:
        server.post("options", {"live_previews_enable": True})
    for field in ("width", "height"):  # 0 is a mistake, not "the model's default"
        r = server.post("txt2img", {"prompt": "x", "steps": 1, field: 0})
        assert r.status_code == 422 and "positive multiples of 8" in r.json()["detail"]


def test_img2img_resize_modes_are_a1111_s(server, tiny_checkpoint, tmp_path):
    init = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 128, 3), dtype=np.uint8))  # 128 wide
    fitted = np.asarray(init.resize((64, 32), Image.LANCZOS))
    filled = np.concatenate([fitted[:1].repeat(16, 0), fitted, fitted[-1:].repeat(16, 0)])
    references = {0: init,  # just resize: stretched to 64x64, as generate --init-image does
                  1: init.crop((32, 0, 96, 64)),  # crop and resize: 64 high already, the middle 64 columns
                  2: Image.fromarray(filled)}  # resize and fill: 64x32 in the middle, its edge rows drawn out
    body = {"prompt": "a boat", "init_images": [encoded(init)], "seed": 3, "steps": 4, "denoising_strength": 0.5,
            "width": 64, "height": 64, "sampler_name": "Euler", "cfg_scale": 6.0}
    for mode, reference in references.items():
        reference.save(tmp_path / f"init{mode}.png")
        r = server.post("img2img", dict(body, resize_mode=mode))
        assert r.status_code == 200, r.text
        ref = generated(tmp_path, f"ref{mode}", "a boat", "--checkpoint", tiny_checkpoint, "--seed", 3, "--steps", 4,
                        "--init-image", tmp_path / f"init{mode}.png", "--strength", 0.5, "--sampler", "Euler",
                        "--guidance", 6.0, "-W", 64, "-H", 64)
        assert np.array_equal(pixels(decoded_image(r.json()["images"][0])), pixels(ref)), mode
    for mode in (3, 7, -1):  # 3 is A1111's latent upscale: refused rather than silently done another way
        r = server.post("img2img", dict(body, resize_mode=mode))
        assert r.status_code == 422 and "resize_mode must be one of 0 (just resize)" in r.json()["detail"]


def test_png_info_answers_a_bounded_amount_of_text(server):
    """zTXt chunks compress 1 MB of text into 1 KB: a 66 KB PNG of 64 of them drew a 64 MB answer."""
    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\nSteps: 2, Seed: 1")
    for k in range(64):
        info.add_text(f"chunk{k}", "a" * (2**20 - 1), zip=True)
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG", pnginfo=info)
    assert len(buf.getvalue()) < 100_000
    r = server.post("png-info", {"image": b64(buf.getvalue())})
    assert r.status_code == 200 and len(r.content) < 2.1 * 2**20
    answer = r.json()
    assert answer["info"] == "a cat\nSteps: 2, Seed: 1" and answer["parameters"]["Seed"] == "1"
    assert list(answer["items"]) == ["chunk0"]  # the first chunk fits; the rest are left out


def test_the_prompt_limit_counts_the_chunks_the_encoder_makes_hires_prompts_too(server):
    """Each BREAK starts a chunk: 740 of them are 740 chunks (56,980 tokens of context) in 1480 BPE tokens. The
    hires pass's prompts are encoded too, and limited the same way."""
    runs = len(server.worker.batches)
    base = {"prompt": "x", "steps": 1, "width": 64, "height": 64}
    over = "x BREAK " * 21  # 42 BPE tokens, 21 chunks
    for extra, field, chunks in [({"prompt": "x BREAK " * 740}, "prompt", 740),
                                 ({"negative_prompt": "x BREAK " * 740}, "negative_prompt", 740),
                                 ({"prompt": over}, "prompt", 21),
                                 ({"enable_hr": True, "hr_prompt": over}, "hr_prompt", 21),
                                 ({"enable_hr": True, "hr_negative_prompt": over}, "hr_negative_prompt", 21)]:
        r = server.post("txt2img", dict(base, **extra))
        assert r.status_code == 422, (field, r.text[:200])
        detail = r.json()["detail"]
        assert "(20 chunks of 75" in detail and f"got {chunks} chunks in {field}" in detail, detail
    assert len(server.worker.batches) == runs  # refused before the queue
    r = server.post("txt2img", dict(base, prompt="x BREAK " * 20, enable_hr=True, hr_prompt="x BREAK " * 20,
                                    hr_scale=1.0))  # 20 chunks: the limit
    assert r.status_code == 200, r.text


def test_prompts_encoded_to_different_chunk_counts_are_not_merged(server):
    """"a BREAK b" is 3 BPE tokens but two chunks: in a batch with "a cat", "a cat" would be padded with an empty
    chunk and draw another image. The same for the hires pass: two jobs with the same hr_prompt whose first passes
    have two chunks each, one of them with a two-chunk negative prompt that the hires pass encodes too."""
    long = "a lighthouse on a cliff at dusk, " * 12  # 96 tokens: two chunks
    base = {"steps": 2, "width": 64, "height": 64, "sampler_name": "Euler", "cfg_scale": 4.0}
    hires = dict(base, enable_hr=True, hr_scale=2.0, hr_second_pass_steps=1, hr_prompt="a tower")
    bodies = [dict(base, prompt="a cat", seed=1), dict(base, prompt="a BREAK b", seed=2),
              dict(hires, prompt=long, seed=3), dict(hires, prompt="a tower", negative_prompt=long, seed=4)]
    runs = len(server.worker.batches)
    with ThreadPoolExecutor(len(bodies) + 1) as pool:
        blocker = pool.submit(server.post, "txt2img", dict(base, prompt="slow", seed=0, steps=80))
        wait_until(lambda: server.worker.running)
        futures = []
        for k, body in enumerate(bodies):  # one at a time, so that they queue in this order
            futures.append(pool.submit(server.post, "txt2img", body))
            wait_until(lambda: server.worker.queued() == k + 1 or blocker.done())
        assert not blocker.done(), "the blocking request finished before the others queued; make it longer"
        results = [f.result().json() for f in futures]
    assert list(server.worker.batches)[runs:] == [1, 1, 1, 1, 1]  # the blocker, then each request alone
    for body, r in zip(bodies, results):
        alone = server.post("txt2img", body).json()
        assert np.abs(pixels(decoded_image(r["images"][0])) - pixels(decoded_image(alone["images"][0]))).max() <= 1
