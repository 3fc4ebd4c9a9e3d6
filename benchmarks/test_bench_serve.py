"""Server throughput on the CPU: requests/s and p50/p95 latency of /sdapi/v1/txt2img for the tiny model, with one
client, and with concurrent clients with and without merging waiting requests into one U-Net batch (the same run).

Loopback only, a bounded number of requests. Reported, not asserted, except a floor that cannot flake: every
request succeeds.
"""
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch

from latentdiff import serve
from latentdiff.checkpoint import build_models, save_models
from latentdiff.config import CONFIG_DIR, load_model_config
from latentdiff.generate import file_sha256

REQUESTS, CLIENTS, STEPS = 24, 4, 20


def start(checkpoint: Path, merge_images: int):
    import socket
    import uvicorn
    worker = serve.Worker([serve.Checkpoint(checkpoint, file_sha256(checkpoint))],
                          serve.ServeConfig(merge_images=merge_images), device="cpu")
    worker.start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(serve.create_app(worker), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return worker, server, thread, f"http://127.0.0.1:{port}/sdapi/v1/txt2img"


def measure(url: str, clients: int) -> dict:
    def one(i):
        t = time.perf_counter()
        r = requests.post(url, json={"prompt": f"prompt {i % 5}", "seed": i, "steps": STEPS, "width": 64,
                                     "height": 64, "sampler_name": "DPM++ 2M", "cfg_scale": 7.5}, timeout=300)
        assert r.status_code == 200, r.text
        return time.perf_counter() - t

    for i in range(2):  # warm-up
        one(i)
    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = sorted(pool.map(one, range(REQUESTS)))
    wall = time.perf_counter() - t
    return {"clients": clients, "requests": REQUESTS, "requests_per_s": REQUESTS / wall,
            "p50_s": statistics.median(latencies), "p95_s": latencies[int(0.95 * (len(latencies) - 1))]}


def test_serve_throughput(tmp_path, bench, cpu_threads):
    config = load_model_config(CONFIG_DIR / "tiny.yaml")
    torch.manual_seed(0)
    models = build_models(config)
    checkpoint = tmp_path / "tiny.safetensors"
    save_models(checkpoint, config, models.unet, models.vae, models.text)
    rows = []
    for label, clients, merge in [("1 client", 1, 1), (f"{CLIENTS} clients, no merging", CLIENTS, 1),
                                  (f"{CLIENTS} clients, merged batches", CLIENTS, 8)]:
        worker, server, thread, url = start(checkpoint, merge)
        try:
            row = measure(url, clients)
            merged = list(worker.batches)[2:]  # after the warm-up
            row.update(case=label, merge_images=merge, mean_batch=sum(merged) / len(merged))
            rows.append(row)
        finally:
            server.should_exit = True
            thread.join(10)
            worker.close()
    base = rows[1]["requests_per_s"]
    print(f"\nserve, tiny model on CPU ({cpu_threads} threads), 64x64, {STEPS} steps DPM++ 2M with CFG, "
          f"{REQUESTS} requests per case")
    print(f"{'case':<30}{'req/s':>8}{'p50 s':>8}{'p95 s':>8}{'mean batch':>12}{'vs no merging':>15}")
    for r in rows:
        r["vs_no_merging"] = r["requests_per_s"] / base
        print(f"{r['case']:<30}{r['requests_per_s']:>8.2f}{r['p50_s']:>8.3f}{r['p95_s']:>8.3f}{r['mean_batch']:>12.2f}"
              f"{r['vs_no_merging']:>15.2f}")
    path = bench.write_json("serve", {"machine": bench.machine("cpu"), "steps": STEPS, "size": 64, "rows": rows})
    print(f"results: {path}")
    assert all(r["requests_per_s"] > 0 for r in rows)
