"""Server throughput on the CPU: requests/s and p50/p95 latency of /sdapi/v1/txt2img for the tiny model, with one
client, and with concurrent clients with and without merging waiting requests into one U-Net batch (the same run).

Loopback only, a bounded number of requests. Reported, not asserted, except a floor that cannot flake: every
request succeeds.
"""
import dataclasses
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch

from latentdiff.io.checkpoint import build_models, save_models
from latentdiff.io.config import CONFIG_DIR, load_model_config
from latentdiff.io.files import file_sha256
from latentdiff.serve.app import create_app
from latentdiff.serve.worker import Checkpoint, ServeConfig, Worker

REQUESTS, CLIENTS, STEPS, ROUNDS = 16, 4, 20, 3


def start(checkpoint: Path):
    import socket
    import uvicorn
    worker = Worker([Checkpoint(checkpoint, file_sha256(checkpoint))], ServeConfig(), device="cpu")
    worker.start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(worker), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return worker, server, thread, f"http://127.0.0.1:{port}/sdapi/v1/txt2img"


def body(i: int) -> dict:
    return {"prompt": f"prompt {i % 5}", "seed": i, "steps": STEPS, "width": 64, "height": 64,
            "sampler_name": "DPM++ 2M", "cfg_scale": 7.5}


def measure(url: str, clients: int) -> dict:
    def one(i):
        t = time.perf_counter()
        r = requests.post(url, json=body(i), timeout=300)
        assert r.status_code == 200, r.text
        return time.perf_counter() - t

    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = sorted(pool.map(one, range(REQUESTS)))
    wall = time.perf_counter() - t
    return {"requests_per_s": REQUESTS / wall, "p50_s": statistics.median(latencies),
            "p95_s": latencies[round(0.95 * (len(latencies) - 1))]}


def test_serve_throughput(tmp_path, bench, cpu_threads):
    config = load_model_config(CONFIG_DIR / "tiny.yaml")
    torch.manual_seed(0)
    models = build_models(config)
    checkpoint = tmp_path / "tiny.safetensors"
    save_models(checkpoint, config, models.unet, models.vae, models.text)
    cases = [("1 client", 1, 1), (f"{CLIENTS} clients, no merging", CLIENTS, 1),
             (f"{CLIENTS} clients, merged batches", CLIENTS, 8)]
    worker, server, thread, url = start(checkpoint)
    runs = {label: [] for label, _, _ in cases}
    try:
        requests.post(url, json=body(0), timeout=300)  # warm-up
        # The cases take turns, ROUNDS times, so a burst of load from elsewhere on the machine hits them all alike;
        # each case reports its best round (the least disturbed one) and the median of its rounds.
        for _ in range(ROUNDS):
            for label, clients, merge in cases:
                worker.config = dataclasses.replace(worker.config, merge_images=merge)
                start_batches = len(worker.batches)
                row = measure(url, clients)
                merged = list(worker.batches)[start_batches:]
                row["mean_batch"] = sum(merged) / len(merged)
                runs[label].append(row)

        # The effect underneath, without HTTP: one pipeline call of CLIENTS images vs CLIENTS calls of one.
        pipe = worker.pipe

        def call(n):
            gens = [torch.Generator().manual_seed(i) for i in range(n)]
            pipe(["a cat"] * n, [""] * n, num_images=1, generators=gens, steps=STEPS, sampler="DPM++ 2M",
                 guidance=7.5, width=64, height=64, progress=False)
        one_s = bench.median_seconds(lambda: call(1), "cpu", min_run_time=2.0)
        batch_s = bench.median_seconds(lambda: call(CLIENTS), "cpu", min_run_time=2.0)
    finally:
        server.should_exit = True
        thread.join(10)
        worker.close()
    rows = []
    for label, clients, merge in cases:
        best = max(runs[label], key=lambda r: r["requests_per_s"])
        rows.append(dict(best, case=label, clients=clients, merge_images=merge, requests=REQUESTS,
                         median_requests_per_s=statistics.median(r["requests_per_s"] for r in runs[label])))
    base = rows[1]["requests_per_s"]
    print(f"\nserve, tiny model on CPU ({cpu_threads} threads), 64x64, {STEPS} steps DPM++ 2M with CFG, "
          f"{REQUESTS} requests per round, best of {ROUNDS} interleaved rounds")
    print(f"{'case':<30}{'req/s':>8}{'median':>8}{'p50 s':>8}{'p95 s':>8}{'mean batch':>12}{'vs no merging':>15}")
    for r in rows:
        r["vs_no_merging"] = r["requests_per_s"] / base
        print(f"{r['case']:<30}{r['requests_per_s']:>8.2f}{r['median_requests_per_s']:>8.2f}{r['p50_s']:>8.3f}"
              f"{r['p95_s']:>8.3f}{r['mean_batch']:>12.2f}{r['vs_no_merging']:>15.2f}")
    print(f"pipeline alone: {CLIENTS} images in one call {batch_s:.3f} s, one image {one_s:.3f} s: "
          f"{CLIENTS * one_s / batch_s:.2f}x the images per second")
    path = bench.write_json("serve", {"machine": bench.machine("cpu"), "steps": STEPS, "size": 64, "rows": rows,
                                      "rounds": runs, "pipeline_one_image_s": one_s,
                                      f"pipeline_{CLIENTS}_images_s": batch_s,
                                      "pipeline_batch_speedup": CLIENTS * one_s / batch_s})
    print(f"results: {path}")
    assert all(r["requests_per_s"] > 0 for r in rows)
