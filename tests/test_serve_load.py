"""A bounded load on ``weakloc serve`` over loopback (the client of benchmarks/serve_load.py against
a server in this process, tiny model): no request gets a 5xx other than the queue's deliberate
503s (each with Retry-After), and memory stays flat from round to round. Correctness only: the
speed is the benchmark's (docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"


def _bench():
    spec = importlib.util.spec_from_file_location("serve_load", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_load_gives_no_5xx_but_deliberate_503s_and_memory_stays_flat():
    from weakloc.models import ModelConfig, WeaklocNet
    from weakloc.serve.app import BackgroundServer, create_app
    from weakloc.serve.service import Service

    bench = _bench()
    torch.manual_seed(0)
    model = WeaklocNet(ModelConfig(backbone="test_resnet", classes=["a", "b", "c"], input_size=48, output_stride=8), pretrained="none")
    service = Service(model.eval(), max_batch=4, window=0.01, max_queue=3, keep_results=8)
    images = bench.jpeg_images(6, (96, 72))
    statuses, retry, rss = Counter(), [], []
    try:
        with BackgroundServer(create_app(service)) as url:
            bench.run_load(url, images, 2, 4)  # warm-up: first allocations
            for _ in range(4):
                out = bench.run_load(url, images, clients=6, requests=12, timeout=120)
                statuses += out["statuses"]
                retry += out["retry_after"]
                rss.append(_rss_mib())
            info = __import__("httpx").get(f"{url}/api/model").json()
    finally:
        service.close()
    assert set(statuses) <= {200, 503}, statuses  # no other 5xx, no dropped connection (-1)
    assert statuses[200] >= 4 and sum(statuses.values()) == 48
    assert all(r is not None and int(r) >= 1 for r in retry)  # every 503 says when to come back
    assert info["queue"] == {"queued": 0, "running": 0, "max_queue": 3} and len(service.results) == 8  # bounded
    assert max(rss[1:]) - rss[0] < 48, rss  # flat: no growth with the number of requests served
