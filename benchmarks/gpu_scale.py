"""The GPU figures of issue 22 in one prepared run: training throughput against a plain PyTorch AMP
loop, where the time of end-to-end localization goes, and the GPU rows of cam_speed.py.

    uv run python benchmarks/gpu_scale.py                      # on a GPU machine (about 5 minutes on one H200)
    uv run python benchmarks/gpu_scale.py --device cpu --images 64 --epochs 1 --size 96 --batch 8   # a check of the script itself

1. **Training**: EfficientNet-Lite0 on ``--images`` synthetic 128-px JPEGs at ``--size`` px, batch
   ``--batch``, ``--epochs`` epochs, bf16 autocast, channels_last (on a GPU). weakloc:
   :func:`weakloc.fine_tune` (``precision="bf16-mixed"``, its own augmentation, validation each
   epoch; the time of the whole call, so also building and saving the model). The plain loop: the same model
   class, dataset class and transforms, DataLoader settings and AdamW, ``torch.autocast(bfloat16)``,
   validation each epoch. Images/s of training images; the ratio weakloc / plain (target >= 0.95).
2. **Localize**: ``--photos`` JPEGs (Aquarium's test and valid photos repeated, else synthetic
   640x480) through ``localize_to_folder(pictures="none")`` with ``decode="cpu"`` (``--workers``
   processes) and ``decode="device"`` (nvJPEG), beside the stages alone: decoding and resizing
   only (the input pipeline), and maps + boxes only on one resident batch (the device's work). The
   slowest stage is the bottleneck.
3. **cam_speed.py** ``--device cuda --batch 64`` (its rows never measured on a GPU before).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from localize_scale import jpegs, photos  # noqa: E402
from machine import machine_name  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "gpu-scale"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def plain_loop(data: Path, args) -> float:
    """Images/s of a plain PyTorch AMP training loop (see the module docstring)."""
    from torch.utils.data import DataLoader

    from weakloc.data.dataset import ImageDataset, collate_skip_bad, eval_transform, train_transform
    from weakloc.data.labels import load_labels
    from weakloc.models import ModelConfig, WeaklocNet

    labels = load_labels(data)
    train = labels.subset([i for i, s in enumerate(labels.splits) if s == "train"])
    val = labels.subset([i for i, s in enumerate(labels.splits) if s == "val"])
    net = WeaklocNet(ModelConfig(backbone="tf_efficientnet_lite0", classes=labels.classes, input_size=args.size)).to(args.device)
    if args.device.startswith("cuda"):
        net = net.to(memory_format=torch.channels_last)
    cfg = net.config
    tl = DataLoader(ImageDataset.from_labels(train, train_transform(args.size, cfg.mean, cfg.std)), batch_size=args.batch, shuffle=True,
                    num_workers=args.workers, pin_memory=args.device.startswith("cuda"), collate_fn=collate_skip_bad, drop_last=True,
                    persistent_workers=args.workers > 0)
    vl = DataLoader(ImageDataset.from_labels(val, eval_transform(args.size, cfg.mean, cfg.std)), batch_size=args.batch,
                    num_workers=args.workers, pin_memory=args.device.startswith("cuda"), collate_fn=collate_skip_bad)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    dtype = torch.bfloat16
    seen = 0
    sync(args.device)
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        net.train()
        for batch in tl:
            x = batch["image"].to(args.device, non_blocking=True)
            if args.device.startswith("cuda"):
                x = x.contiguous(memory_format=torch.channels_last)
            y = batch["target"].to(args.device, non_blocking=True)
            with torch.autocast(args.device.split(":")[0], dtype=dtype):
                loss = loss_fn(net(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(x)
        net.eval()
        with torch.no_grad(), torch.autocast(args.device.split(":")[0], dtype=dtype):
            for batch in vl:
                net(batch["image"].to(args.device, non_blocking=True))
    sync(args.device)
    return seen / (time.perf_counter() - t0)


def weakloc_training(data: Path, args) -> float:
    from weakloc.train import fine_tune

    t0 = time.perf_counter()
    result = fine_tune(data, WORK / "weakloc-train", backbone="tf_efficientnet_lite0", input_size=args.size, epochs=args.epochs,
                       batch_size=args.batch, precision="bf16-mixed", workers=args.workers, progress=False, freeze_epochs=0,
                       accelerator="gpu" if args.device.startswith("cuda") else "cpu")
    seconds = time.perf_counter() - t0  # the whole call: also building the model, validating, saving
    return result.metrics["train_images"] * args.epochs / seconds


def training(args) -> list[tuple]:
    from weakloc.data.synthetic import SyntheticConfig, write_synthetic

    data = WORK / f"train-data-{args.images}"
    if not (data / "labels.csv").is_file():
        write_synthetic(data, SyntheticConfig(n_images=args.images, size=128, mode="single", val_fraction=0.2, seed=0))
    plain = plain_loop(data, args)
    ours = weakloc_training(data, args)
    return [("plain PyTorch AMP loop (bf16)", plain, 1.0), ("weakloc fine_tune (bf16-mixed)", ours, ours / plain)]


def localize(args) -> list[tuple]:
    from weakloc.data.images import list_images
    from weakloc.explain import pipeline
    from weakloc.explain.run import image_batches
    from weakloc.localize.regions import binarize, region_boxes
    from weakloc.models import ModelConfig, WeaklocNet
    from weakloc.report.localization import localize_to_folder

    found, source = photos(args.photos, WORK)
    paths = (found * (args.photos // max(1, len(found)) + 1))[: args.photos]
    listing = WORK / "photos.txt"
    listing.write_text("".join(f"{p}\n" for p in paths))
    net = WeaklocNet(ModelConfig(backbone="tf_efficientnet_lite0", classes=["fish", "jellyfish", "penguin"], input_size=args.size))
    net = net.to(args.device).eval()
    device = torch.device(args.device)
    rows = []
    for decode in ("cpu", "device"):
        t0 = time.perf_counter()
        n = 0
        for batch in image_batches(net, list_images(listing), args.size, args.batch, device, None, args.workers, decode):
            n += 0 if batch.x is None else len(batch.x)
        sync(args.device)
        rows.append((f"decode + resize only ({decode})", n / (time.perf_counter() - t0)))
    settings = pipeline.map_settings(net, {"dtype": "bf16"} if args.device.startswith("cuda") else None)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    for _ in range(2):
        heat = pipeline.make_maps(net, x, settings, "predicted")
    sync(args.device)
    t0 = time.perf_counter()
    reps = 10
    for _ in range(reps):
        heat = pipeline.make_maps(net, x, settings, "predicted")
        flat = heat.normalized.flatten(0, 1)
        region_boxes(binarize(flat, torch.full((len(flat),), 0.3, device=device)), flat)
    sync(args.device)
    rows.append(("maps + boxes only (CAM, one resident batch)", reps * args.batch / (time.perf_counter() - t0)))
    for decode in ("cpu", "device"):
        t0 = time.perf_counter()
        s = localize_to_folder(net, listing, WORK / f"localize-{decode}", batch_size=args.batch, pictures="none", workers=args.workers,
                               decode=decode, restart=True, device=args.device, threshold=0.3,
                               maps={"dtype": "bf16"} if args.device.startswith("cuda") else None)
        rows.append((f"end to end, decode {decode} (records to JSON Lines)", s.images / (time.perf_counter() - t0)))
    print(f"localize input: {len(paths)} images ({source}, repeated), {args.size} px, batch {args.batch}, {args.workers} workers")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--photos", type=int, default=2000)
    ap.add_argument("--skip-cam-speed", action="store_true")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    head = f"{machine_name() if args.device.startswith('cuda') else 'CPU'}; {time.strftime('%Y-%m-%d')}"
    train_rows = training(args)
    print(f"\n### Training throughput ({head}; {args.images} synthetic images, {args.size} px, batch {args.batch}, {args.epochs} epochs)\n")
    print("| loop | images/s | vs plain |\n|---|---:|---:|")
    for name, ips, ratio in train_rows:
        print(f"| {name} | {ips:.1f} | {ratio:.2f} |")
    loc_rows = localize(args)
    print(f"\n### Where localize's time goes ({head})\n\n| stage | images/s |\n|---|---:|")
    for name, ips in loc_rows:
        print(f"| {name} | {ips:.1f} |")
    (WORK / "results.json").write_text(json.dumps({"training": train_rows, "localize": loc_rows}, indent=1))
    if not args.skip_cam_speed and args.device.startswith("cuda"):
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cam_speed.py"), "--device", "cuda", "--batch", "64"], check=False)


if __name__ == "__main__":
    main()
