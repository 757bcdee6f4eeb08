"""Localization at scale (issue 22): end-to-end throughput against a pytorch-grad-cam script, and
memory that stays flat however many images.

    uv run python benchmarks/localize_scale.py throughput [--images N] [--size S]
    uv run python benchmarks/localize_scale.py memory [--counts 1000,20000]

``throughput``: decode -> maps -> boxes -> records on disk, the same model (EfficientNet-Lite0,
3 classes, the packaged ImageNet weights) and the same JPEGs (Aquarium's test and valid photos
from ../shared/datasets when present, else synthetic 640x480 JPEGs), timed in one run:

- *pytorch-grad-cam script*: what its users write (the popular ``grad_cam.py --image-dir``):
  per image PIL load, resize, ``preprocess_image``, ``GradCAM`` on the last feature layer for the
  predicted class (one ``GradCAM`` object for the run), map resized to the photo, OpenCV threshold
  at 0.3 and ``findContours`` + ``boundingRect``, the records written with ``json`` at the end;
- *weakloc localize*: :func:`weakloc.report.localization.localize_to_folder` with ``pictures="none"``
  (records only, like the script), Grad-CAM and CAM, ``--workers`` decoding processes.

The pipelines take turns, ``--chunk`` images each, so that other work on a shared machine slows
each about as much.

``memory``: ``weakloc localize`` in a fresh process over ``counts`` synthetic JPEGs (written once
by the benchmark, 96x96) with ``pictures=none``; the peak resident memory (``ru_maxrss``) of each.
Flat means the largest within 10 % of the smallest.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_name  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
AQUARIUM = ROOT.parent / "shared" / "datasets" / "aquarium"
CLASSES = ["fish", "jellyfish", "penguin"]


def model(size: int):
    from weakloc.models import ModelConfig, WeaklocNet

    torch.manual_seed(0)
    return WeaklocNet(ModelConfig(backbone="tf_efficientnet_lite0", classes=CLASSES, input_size=size)).eval()


def jpegs(out: Path, n: int, size: tuple[int, int]) -> list[Path]:
    """``n`` synthetic JPEGs of ``size`` (w, h) in ``out`` (written once)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"img{i:06d}.jpg" for i in range(n)]
    if not all(p.is_file() for p in paths[-1:]):
        g = np.random.default_rng(0)
        base = (g.random((size[1], size[0], 3)) * 255).astype(np.uint8)
        for i, p in enumerate(paths):
            if not p.is_file():
                Image.fromarray(np.roll(base, i * 7, axis=1)).save(p, quality=90)
    return paths


def photos(limit: int, work: Path) -> tuple[list[Path], str]:
    found = sorted(p for split in ("test", "valid") for p in (AQUARIUM / split / "images").glob("*.jpg")) if AQUARIUM.is_dir() else []
    if found:
        return found[:limit], f"{min(limit, len(found))} Aquarium photos"
    return jpegs(work / "jpegs", limit, (640, 480)), f"{limit} synthetic 640x480 JPEGs"


def grad_cam_script(net, paths: list[Path], size: int, out: Path) -> None:
    """The pytorch-grad-cam user's pipeline (see the module docstring)."""
    import cv2
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import preprocess_image

    layer = net.backbone.bn2
    results = []
    with GradCAM(model=net, target_layers=[layer]) as cam:
        for p in paths:
            img = Image.open(p).convert("RGB")
            w, h = img.size
            rgb = np.float32(img.resize((size, size))) / 255
            x = preprocess_image(rgb, mean=list(net.config.mean), std=list(net.config.std))
            gray = cam(input_tensor=x, targets=None)[0]
            full = cv2.resize(gray, (w, h))
            _, mask = cv2.threshold(np.uint8(full * 255), int(0.3 * 255), 255, cv2.THRESH_BINARY)
            contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            boxes = [list(cv2.boundingRect(c)) for c in contours]
            results.append({"file": str(p), "width": w, "height": h, "boxes": boxes})
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results))


def throughput(args) -> None:
    from weakloc.report.localization import localize_to_folder

    work = ROOT / "runs" / "localize-scale"
    paths, source = photos(args.images, work)
    net = model(args.size)
    pipelines = [("pytorch-grad-cam script (batch 1)", lambda chunk, k: grad_cam_script(net, chunk, args.size, work / f"gradcam-script-{k}"))]
    for method in ("gradcam", "cam"):
        for workers in sorted({0, args.workers}):
            pipelines.append((f"weakloc localize, {method}, batch {args.batch_size}, {workers} worker(s)",
                              lambda chunk, k, m=method, w=workers: localize_to_folder(
                                  net, chunk, work / f"weakloc-{m}-{w}-{k}", method=m, threshold=0.3, batch_size=args.batch_size,
                                  pictures="none", workers=w, restart=True, device="cpu")))
    grad_cam_script(net, paths[:2], args.size, work / "warm")  # first-call costs out of the timing
    # the pipelines take turns on each chunk of the images, so other work on a shared machine slows them alike
    seconds = [0.0] * len(pipelines)
    chunks = [paths[i:i + args.chunk] for i in range(0, len(paths), args.chunk)]
    for k, chunk in enumerate(chunks):
        for j, (_, run) in enumerate(pipelines):
            t0 = time.perf_counter()
            run(chunk, k)
            seconds[j] += time.perf_counter() - t0
        print(f"chunk {k + 1}/{len(chunks)}: " + ", ".join(f"{len(paths[: (k + 1) * args.chunk]) / s:.2f}" for s in seconds), flush=True)
    rows = [(name, len(paths) / s, s) for (name, _), s in zip(pipelines, seconds)]
    base = rows[0][1]
    print(f"\n{source}, input {args.size} px, EfficientNet-Lite0; {machine_name()}; {time.strftime('%Y-%m-%d')}\n")
    print("| pipeline | images/s | seconds | vs pytorch-grad-cam script |\n|---|---:|---:|---:|")
    for name, ips, s in rows:
        print(f"| {name} | {ips:.2f} | {s:.1f} | {ips / base:.2f}x |")


def memory(args) -> None:
    work = ROOT / "runs" / "localize-scale"
    counts = [int(c) for c in args.counts.split(",")]
    paths = jpegs(work / "small-jpegs", max(counts), (96, 96))
    from weakloc.models import save_model

    net_dir = work / "mem-model"
    if not (net_dir / "config.json").is_file():
        save_model(model(96), net_dir)
    rows = []
    for n in counts:
        listing = work / f"list-{n}.txt"
        listing.write_text("\n".join(str(p) for p in paths[:n]) + "\n")
        code = ("import resource, sys, time; from weakloc.models import load_model; from weakloc.report.localization import localize_to_folder; "
                f"t = time.perf_counter(); s = localize_to_folder(load_model({str(net_dir)!r}), {str(listing)!r}, {str(work / f'mem-out-{n}')!r}, "
                f"batch_size=32, pictures='none', workers={args.workers}, restart=True, threshold=0.3); "
                "print(s.images, round(time.perf_counter() - t, 1), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
                "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        images, seconds, own, children = done.stdout.split()[-4:]
        rows.append((n, int(images), float(seconds), int(own) / 1024, int(children) / 1024))
        print(f"{n} images: {rows[-1]}", flush=True)
    low = min(r[3] for r in rows)
    print(f"\npeak resident memory of weakloc localize (pictures none, batch 32, {args.workers} worker(s)); {machine_name()}; "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| images | results | seconds | peak RSS, MiB (main process) | peak RSS of a worker, MiB | vs smallest |\n|---:|---:|---:|---:|---:|---:|")
    for n, images, seconds, own, children in rows:
        print(f"| {n} | {images} | {seconds:.0f} | {own:.0f} | {children:.0f} | {own / low * 100 - 100:+.1f} % |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--images", type=int, default=200)
    t.add_argument("--size", type=int, default=224)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--workers", type=int, default=1)
    t.add_argument("--chunk", type=int, default=38, help="images per turn: the pipelines alternate chunk by chunk")
    m = sub.add_parser("memory")
    m.add_argument("--counts", default="1000,20000")
    m.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    throughput(args) if args.what == "throughput" else memory(args)


if __name__ == "__main__":
    main()
