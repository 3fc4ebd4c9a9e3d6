"""LoRA on the CPU: reading, applying and removing one kohya LoRA (rank 32 on every transformer Linear and proj, the
layers kohya's default network wraps) on the full-size SDXL U-Net in bf16; and the server switching between two
LoRAs on the bundled model, request by request, against the same requests with none.

The issue's targets: apply and remove <= 2 s each; switching adds <= 10% to a request. Reported, not asserted (the
machine is shared); the one assert is that removal gives back the original weights exactly. The first apply in a
process also takes the memory that keeps the originals (first touch of 4.6 GB); later ones reuse it, as a server
switching adapters does: both are reported.
"""
import os
import statistics
import time

import pytest
import requests
import torch

from latentdiff.io.checkpoint import BUNDLED, _meta_models
from latentdiff.io.config import CONFIG_DIR, load_model_config
from latentdiff.models.lora import Patcher, family, name_table, read_adapter
from latentdiff.pipeline import available_memory

RANK, SAMPLES = 32, 6


def sdxl_unet_lora(unet, rank=RANK):
    """kohya's SDXL spelling (the sgm U-Net's names) for every Linear / 1x1 conv inside the transformers."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, m in unet.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and (".transformer_blocks." in name or "proj_" in name):
            key = "lora_unet_" + name.replace(".", "_")
            out_dim, in_dim = m.weight.shape[:2]
            state[f"{key}.lora_down.weight"] = (torch.randn(rank, in_dim, generator=g) * 0.01).half()
            state[f"{key}.lora_up.weight"] = (torch.randn(out_dim, rank, generator=g) * 0.01).half()
            state[f"{key}.alpha"] = torch.tensor(rank / 2.0)
    return state


@pytest.mark.skipif(os.environ.get("LATENTDIFF_FULL_SIZE") != "1",
                    reason="full-size SDXL (about 3.5 minutes on 2 CPU cores): set LATENTDIFF_FULL_SIZE=1")
def test_apply_and_remove_a_lora_on_the_sdxl_unet(bench, cpu_threads):
    need = 14 * 2**30  # the bf16 U-Net (5.1 GiB), the originals kept (about 4 GiB), the LoRA and headroom
    have = available_memory(torch.device("cpu"))
    if have is not None and have < need:
        pytest.skip(f"the full-size SDXL U-Net needs about {need / 2**30:.0f} GiB here, {have / 2**30:.1f} available")
    t = time.perf_counter()
    models = _meta_models(load_model_config(CONFIG_DIR / "sdxl-base.yaml"))
    unet = models.unet.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.02)
    text = models.text  # stays on meta: the LoRA has U-Net keys only, and the table needs names and shapes alone
    build_s = time.perf_counter() - t
    state = sdxl_unet_lora(unet)
    t = time.perf_counter()
    table = name_table(unet, text)
    adapter = read_adapter(state, {"ss_base_model_version": "sdxl_base_v1-0"}, table, family(unet, text))
    read_s = time.perf_counter() - t
    patcher = Patcher(unet, text)
    probe = adapter.patches[0].target.weight
    original = unet.get_parameter(probe).detach().clone()
    apply_s, remove_s = [], []
    for _ in range(SAMPLES):
        t = time.perf_counter()
        patcher.apply([(adapter, 1.0, 1.0)])
        apply_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        patcher.apply([])
        remove_s.append(time.perf_counter() - t)
    assert torch.equal(unet.get_parameter(probe), original)
    covered = sum(unet.get_parameter(p.target.weight).numel() for p in adapter.patches)
    row = {"modules": len(adapter.patches), "rank": RANK, "weights_changed": covered, "build_unet_s": build_s,
           "read_and_check_s": read_s, "first_apply_s": apply_s[0], "apply_s": statistics.median(apply_s[1:]),
           "remove_s": statistics.median(remove_s), "apply_samples": apply_s, "remove_samples": remove_s}
    print(f"\nSDXL U-Net (bf16, CPU, {cpu_threads} threads): LoRA rank {RANK} on {row['modules']} modules "
          f"({covered / 1e9:.2f} B weights)")
    print(f"{'read + check':>14}{'first apply':>13}{'apply':>10}{'remove':>10}   (median of the later {SAMPLES - 1} "
          f"applies, of all {SAMPLES} removals; target <= 2 s each)")
    print(f"{read_s:>13.2f}s{row['first_apply_s']:>12.2f}s{row['apply_s']:>9.2f}s{row['remove_s']:>9.2f}s")
    path = bench.write_json("lora_sdxl_apply", {"machine": bench.machine("cpu"), **row})
    print(f"results: {path}")


def test_server_switching_loras_costs_little(tmp_path, bench, cpu_threads):
    """Requests alternating between two LoRAs on the bundled model, against the same requests without LoRAs."""
    from safetensors.torch import save_file
    from test_bench_serve import start
    worker, server, thread, url = start(BUNDLED)
    unet = worker.pipe.unet
    for k in range(2):
        g = torch.Generator().manual_seed(k)
        state = {}
        for name, m in unet.named_modules():
            if isinstance(m, torch.nn.Linear) and ".transformer_blocks." in name:
                key = "lora_unet_" + name.replace(".", "_")
                state[f"{key}.lora_down.weight"] = torch.randn(8, m.in_features, generator=g) * 0.01
                state[f"{key}.lora_up.weight"] = torch.randn(m.out_features, 8, generator=g) * 0.01
        save_file(state, str(tmp_path / f"style{k}.safetensors"))
    worker.lora_dirs = [tmp_path]
    worker.pipe.loras.dirs = [tmp_path]
    worker.refresh_loras()
    defaults = worker.defaults()
    body = {"seed": 1, "steps": defaults["steps"], "width": defaults["width"], "height": defaults["height"]}

    def timed(prompts):
        out = []
        for p in prompts:
            t = time.perf_counter()
            r = requests.post(url, json=dict(body, prompt=p), timeout=600)
            assert r.status_code == 200, r.text
            out.append(time.perf_counter() - t)
        return out
    try:
        timed(["warm-up", "warm-up <lora:style0:0.8>"])
        plain, switching = [], []
        for _ in range(SAMPLES):  # interleaved, so load from elsewhere hits both alike
            plain += timed(["a cat", "a dog"])
            switching += timed(["a cat <lora:style0:0.8>", "a dog <lora:style1:0.8>"])
    finally:
        server.should_exit = True
        thread.join(10)
        worker.close()
    base, switch = statistics.median(plain), statistics.median(switching)
    print(f"\nserver, bundled model on CPU ({cpu_threads} threads), {body['width']}x{body['height']}, "
          f"{body['steps']} steps: a request {base:.3f} s without LoRAs, {switch:.3f} s switching between two "
          f"({100 * (switch / base - 1):+.1f}%; target <= +10%)")
    path = bench.write_json("lora_serve_switch", {"machine": bench.machine("cpu"), "plain_s": plain,
                                                  "switching_s": switching, "overhead": switch / base - 1})
    print(f"results: {path}")
