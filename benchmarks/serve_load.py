"""Load on ``weakloc serve`` over loopback: N concurrent clients, a fixed number of requests.

    uv run python benchmarks/serve_load.py                                  # CPU: EfficientNet-Lite0, 224 px
    uv run python benchmarks/serve_load.py --clients 16 --requests 400 --queue-size 16
    uv run python benchmarks/serve_load.py --device cuda --clients 32 --requests 2000

Starts the real command (``python -m weakloc.cli serve MODEL``) in a child process on a free port,
with a model of random weights (speed only; 3 classes), then ``--clients`` threads send
``--requests`` requests in all (in ``--rounds`` rounds), each ``POST /api/localize`` with one 640x480 JPEG. Prints
requests/s (answered 200), p50/p95 latency of those, how many got 503 (the bounded queue
refusing: deliberate) or another 5xx (a bug), and the server's resident memory: at start, after
each round, and its peak (``VmHWM``).

:func:`run_load` is the client side alone (tests/test_serve_load.py runs it against a server in
the test process).
"""

from __future__ import annotations

import argparse
import io
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


def jpeg_images(n: int, size: tuple[int, int] = (640, 480), seed: int = 0) -> list[bytes]:
    """``n`` different JPEG files of smooth random colour blobs (``size`` is width, height)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (size[1] // 32, size[0] // 32, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize(size, Image.BILINEAR)
        buffer = io.BytesIO()
        img.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def run_load(url: str, images: list[bytes], clients: int, requests: int, timeout: float = 300.0, data: dict | None = None) -> dict:
    """Send ``requests`` ``POST /api/localize`` (one image each, cycling through ``images``) from
    ``clients`` threads at once.

    Returns:
        ``{"statuses": Counter(status -> n), "latencies": [s of each 200], "seconds": wall time,
        "retry_after": [the Retry-After values of the 503s]}``.
    """
    lock = threading.Lock()
    statuses: Counter = Counter()
    latencies: list[float] = []
    retry_after: list[str] = []
    counter = iter(range(requests))

    def client() -> None:
        with httpx.Client(base_url=url, timeout=timeout) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t = time.perf_counter()
                try:
                    r = http.post("/api/localize", files={"files": (f"im{i}.jpg", images[i % len(images)], "image/jpeg")}, data=data or {})
                    status = r.status_code
                except httpx.HTTPError:
                    status = -1  # no answer at all
                    r = None
                dt = time.perf_counter() - t
                with lock:
                    statuses[status] += 1
                    if status == 200:
                        latencies.append(dt)
                    elif status == 503 and r is not None:
                        retry_after.append(r.headers.get("retry-after"))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return {"statuses": statuses, "latencies": latencies, "seconds": time.perf_counter() - t0, "retry_after": retry_after}


def summary(result: dict) -> dict:
    """requests/s (of the 200s), p50/p95 latency (s), and the status counts."""
    lat = np.array(result["latencies"]) if result["latencies"] else np.array([float("nan")])
    ok = result["statuses"].get(200, 0)
    return {"ok": ok, "rps": ok / result["seconds"], "p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
            "503": result["statuses"].get(503, 0),
            "other_5xx": sum(n for s, n in result["statuses"].items() if s >= 500 and s != 503),
            "other": {s: n for s, n in result["statuses"].items() if s not in (200, 503) and s < 500}}


def memory_kib(pid: int) -> dict:
    """``VmRSS`` and ``VmHWM`` (peak) of a process, in KiB (Linux)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="a model folder (default: a random-weight one, built here)")
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--size", type=int, default=224, help="input size of the built model")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--window-ms", type=float, default=20.0)
    p.add_argument("--queue-size", type=int, default=64)
    p.add_argument("--keep-results", type=int, default=256)
    p.add_argument("--rounds", type=int, default=4, help="the requests are sent in this many rounds (memory is read after each)")
    p.add_argument("--method", default=None)
    a = p.parse_args()

    import torch

    from weakloc.models import ModelConfig, WeaklocNet, save_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = a.model
        if model_dir is None:
            torch.manual_seed(0)
            model_dir = save_model(WeaklocNet(ModelConfig(backbone=a.backbone, classes=["a", "b", "c"], input_size=a.size), pretrained="none"),
                                   Path(tmp) / "model")
        port = _free_port()
        cmd = [sys.executable, "-m", "weakloc.cli", "serve", str(model_dir), "--port", str(port), "--device", a.device,
               "--max-batch", str(a.max_batch), "--batch-window-ms", str(a.window_ms), "--queue-size", str(a.queue_size),
               "--keep-results", str(a.keep_results)]
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"{url}/api/model", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server did not start: {server.stderr.read() if server.stderr else ''}")
                time.sleep(0.2)
            images = jpeg_images(16)
            data = {"method": a.method} if a.method else None
            run_load(url, images, 1, 2, data=data)  # warm-up
            start = memory_kib(server.pid)
            rounds, after = [], []
            for k in range(a.rounds):  # memory after each round: flat once the kept results are full
                rounds.append(run_load(url, images, a.clients, a.requests // a.rounds + (k < a.requests % a.rounds), data=data))
                after.append(memory_kib(server.pid)["VmRSS"])
            end = memory_kib(server.pid)
            result = {"statuses": sum((r["statuses"] for r in rounds), Counter()), "latencies": [x for r in rounds for x in r["latencies"]],
                      "seconds": sum(r["seconds"] for r in rounds), "retry_after": [x for r in rounds for x in r["retry_after"]]}
        finally:
            server.terminate()
            server.wait(30)
    s = summary(result)
    device = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"CPU {platform.machine()}, {torch.get_num_threads()} threads"
    print(f"weakloc serve, {a.backbone if a.model is None else a.model} at {a.size} px, {a.device} ({device}); "
          f"{a.clients} clients, {a.requests} requests of one 640x480 JPEG; max batch {a.max_batch}, "
          f"window {a.window_ms:g} ms, queue {a.queue_size}, {a.keep_results} results kept")
    print("| requests/s | p50 latency | p95 latency | 200 | 503 (queue full) | other 5xx | server RSS start -> end | peak RSS |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {s['rps']:.1f} | {s['p50'] * 1000:.0f} ms | {s['p95'] * 1000:.0f} ms | {s['ok']} | {s['503']} | {s['other_5xx']} | "
          f"{start['VmRSS'] / 1024:.0f} -> {end['VmRSS'] / 1024:.0f} MiB | {end['VmHWM'] / 1024:.0f} MiB |")
    print(f"server RSS after each of {a.rounds} rounds: {', '.join(f'{v / 1024:.0f}' for v in after)} MiB")
    if s["other"]:
        print(f"other answers: {s['other']}")


if __name__ == "__main__":
    main()
