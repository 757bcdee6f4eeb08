"""Training throughput with 1 and 2 processes (torchrun, gloo on the CPU): images/s, epochs and the
validation metrics of the best epoch, on the same synthetic data and settings. On a 2-core machine
this checks that several processes train correctly, not that they are faster.

    uv run python benchmarks/ddp_throughput.py [--images 320 --size 64 --epochs 3 --processes 1 2 --threads N]

Each row runs ``torchrun --standalone --nproc-per-node N`` on this script's ``--worker`` mode,
where every rank calls ``fine_tune`` (the layout comes from torchrun) and rank zero times it:
from the call to its return, so data reading, DDP's start, training, validation and saving, but
not the processes' start-up (importing torch). ``--batch-size`` is per process, so 2 processes
take twice the effective batch and half the steps per epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def worker(args) -> None:
    """One rank: train, and on rank zero write the timing and the best epoch's metrics."""
    from weakloc.train import fine_tune

    start = time.perf_counter()
    result = fine_tune(args.data, args.out, backbone=args.backbone, pretrained="none", input_size=args.size,
                       batch_size=args.batch_size, epochs=args.epochs, freeze_epochs=0, accelerator="cpu", workers=0,
                       progress=False, seed=0)
    seconds = time.perf_counter() - start
    if result.rank == 0:
        m = result.metrics
        (Path(args.out) / "bench.json").write_text(json.dumps({
            "seconds": seconds, "train_images": m["train_images"], "val_images": m["val_images"], "epochs": args.epochs,
            "best_epoch": m["best_epoch"], "metrics": {k: v for k, v in m.items() if k.startswith("val_") and k != "val_images"},
            "training": result.training}))


THREADS: int | None = None  # --threads


def threads(processes: int) -> int:
    """Threads each of ``processes`` processes gets: ``--threads``, else the machine's cores shared out."""
    return THREADS or max(1, (os.cpu_count() or 1) // processes)


def run(processes: int, data: Path, out: Path, args) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), __file__,
               "--worker", "--data", str(data), "--out", str(out), "--backbone", args.backbone, "--size", str(args.size),
               "--batch-size", str(args.batch_size), "--epochs", str(args.epochs)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID")}
    # the cores shared out: torchrun itself sets 1 thread per process for several processes only
    env["OMP_NUM_THREADS"] = str(threads(processes))
    done = subprocess.run(command, check=False, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{processes} process(es) failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads((out / "bench.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data")
    ap.add_argument("--out")
    ap.add_argument("--images", type=int, default=320)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--backbone", default="test_resnet")
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, help="threads per process (default: the cores shared out)")
    args = ap.parse_args()
    global THREADS
    THREADS = args.threads
    if args.worker:
        worker(args)
        return
    from machine import machine_name

    from weakloc.data.synthetic import SyntheticConfig, write_synthetic

    with tempfile.TemporaryDirectory() as tmp:
        data = write_synthetic(Path(tmp) / "data", SyntheticConfig(n_images=args.images, size=args.size, mode="binary", seed=0))
        rows = [(n, run(n, data, Path(tmp) / f"out{n}", args)) for n in args.processes]
    print(f"{date.today()}, {machine_name()}, load average {os.getloadavg()[0]:.1f}; {args.backbone} at {args.size} px, "
          f"{args.images} synthetic yes/no images, batch {args.batch_size} per process, {args.epochs} epochs\n")
    print("| processes | threads each | effective batch | train images | epochs | seconds | images/s | best epoch | val_loss | val_acc | val_auroc |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n, r in rows:
        m = r["metrics"]
        speed = r["train_images"] * r["epochs"] / r["seconds"]
        print(f"| {n} | {threads(n)} | {r['training']['effective_batch_size']} | {r['train_images']} | {r['epochs']} | {r['seconds']:.1f} | "
              f"{speed:.1f} | {r['best_epoch']} | {m['val_loss']:.4f} | {m['val_acc']:.4f} | {m.get('val_auroc', float('nan')):.4f} |")


if __name__ == "__main__":
    main()
