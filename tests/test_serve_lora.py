"""The server's LoRA and embedding routes (A1111's /sdapi/v1/loras, refresh-loras, embeddings), <lora:...> in
txt2img prompts: the same images as `generate`, nothing left over for the next request, one adapter set per batch."""
import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from test_lora import tiny_lora
from test_serve import InProcess, generated, pixels, wait_until


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_checkpoint):
    from latentdiff.pipeline import Pipeline
    d = tmp_path_factory.mktemp("adapters")
    (d / "loras").mkdir()
    (d / "emb").mkdir()
    pipe = Pipeline.from_checkpoint(tiny_checkpoint, device="cpu")
    tiny_lora(d / "loras" / "style.safetensors", pipe, seed=1)
    tiny_lora(d / "loras" / "other.safetensors", pipe, seed=2)
    width = pipe.config.text.width
    save_file({"emb_params": torch.randn(2, width)}, str(d / "emb" / "shiny.safetensors"))
    save_file({"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)}, str(d / "emb" / "xl.safetensors"))
    return d


@pytest.fixture(scope="module")
def server(tiny_checkpoint, folders):
    s = InProcess([tiny_checkpoint])
    s.worker.lora_dirs = [folders / "loras"]
    s.worker.embeddings_dirs = [folders / "emb"]
    s.worker.pipe.loras.dirs = list(s.worker.lora_dirs)  # what Worker.load does for a model loaded after start
    s.worker.load_embeddings()
    yield s
    s.close()


def image_of(response):
    return Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))


BASE = {"steps": 2, "width": 64, "height": 64, "sampler_name": "Euler", "cfg_scale": 4.0}


def test_lists_loras_and_embeddings_without_paths(server, folders):
    loras = server.get("loras").json()
    assert sorted(x["name"] for x in loras) == ["other", "style"]
    assert all(x["path"] in ("other.safetensors", "style.safetensors") for x in loras)
    assert str(folders) not in server.get("loras").text
    (folders / "loras" / "late.safetensors").write_bytes((folders / "loras" / "style.safetensors").read_bytes())
    assert server.post("refresh-loras", {}).status_code == 200
    assert "late" in {x["name"] for x in server.get("loras").json()}
    emb = server.get("embeddings").json()
    assert set(emb["loaded"]) == {"shiny"} and emb["loaded"]["shiny"]["vectors"] == 2
    assert set(emb["skipped"]) == {"xl"} and str(folders) not in server.get("embeddings").text


def test_lora_prompts_give_generates_images_and_never_leak(server, tiny_checkpoint, folders, tmp_path):
    tagged = server.post("txt2img", dict(BASE, prompt="a cat <lora:style:0.9>", seed=4))
    assert tagged.status_code == 200
    ref = generated(tmp_path, "ref", "a cat <lora:style:0.9>", "--checkpoint", tiny_checkpoint, "--lora-dir",
                    folders / "loras", "--seed", 4, "--steps", 2, "--sampler", "Euler", "--guidance", 4.0)
    assert np.array_equal(pixels(image_of(tagged)), pixels(ref))
    assert 'Lora hashes: "style: ' in json.loads(tagged.json()["info"])["infotexts"][0]
    plain = server.post("txt2img", dict(BASE, prompt="a cat", seed=4))
    ref = generated(tmp_path, "plain", "a cat", "--checkpoint", tiny_checkpoint, "--seed", 4, "--steps", 2,
                    "--sampler", "Euler", "--guidance", 4.0)
    assert np.array_equal(pixels(image_of(plain)), pixels(ref))  # the previous request's LoRA is gone


def test_unknown_lora_is_422_naming_it(server, folders):
    r = server.post("txt2img", dict(BASE, prompt="a cat <lora:nope:1>", seed=1))
    assert r.status_code == 422 and "unknown LoRA 'nope'" in r.json()["detail"]
    assert str(folders) not in r.text


def test_merged_batches_hold_one_lora_set(server, tiny_checkpoint, folders, tmp_path):
    """Waiting requests merge only with those naming the same adapters (and multipliers); each image is the one it
    gives alone."""
    prompts = [("a cat <lora:style:0.5>", 1), ("a dog <lora:style:0.5>", 2), ("a cow <lora:other>", 3), ("a pig", 4)]
    runs = len(server.worker.batches)
    with ThreadPoolExecutor(5) as pool:
        blocker = pool.submit(server.post, "txt2img", dict(BASE, prompt="slow", seed=0, steps=80))
        wait_until(lambda: server.worker.running)
        futures = [pool.submit(server.post, "txt2img", dict(BASE, prompt=p, seed=s)) for p, s in prompts]
        wait_until(lambda: server.worker.queued() == 4 or blocker.done())
        assert not blocker.done(), "the blocking request finished before the others queued; make it longer"
        results = [f.result() for f in futures]
    # The blocker, then three batches in whatever order the four requests reached the queue: the two with the same
    # LoRA set together, the others alone (a wrong merge would also change their images, checked below).
    batches = list(server.worker.batches)[runs:]
    assert batches[0] == 1 and sorted(batches[1:]) == [1, 1, 2], batches
    for (prompt, seed), r in zip(prompts, results):
        ref = generated(tmp_path, f"alone{seed}", prompt, "--checkpoint", tiny_checkpoint, "--lora-dir",
                        folders / "loras", "--seed", seed, "--steps", 2, "--sampler", "Euler", "--guidance", 4.0)
        assert np.abs(pixels(image_of(r)) - pixels(ref)).max() <= 1, prompt
