"""BCCD "contains platelets?": train on the image-level yes/no label only, localize platelets.

Builds ``labels.csv`` (Platelets / none, the dataset's own train/val/test split) from the VOC files
-- only whether a platelet box exists is used for training, never a coordinate -- fine-tunes the
offline ImageNet EfficientNet-Lite0, then evaluates the maps of the positive test images against the
platelet boxes with the WSOL protocol, centre baseline beside.

    uv run python benchmarks/bccd_platelets.py --root ../shared/datasets/bccd --out runs/bccd
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import time
from pathlib import Path

import torch

from weakloc.data.annotations import read_voc
from weakloc.evaluate import evaluate_model
from weakloc.train import fine_tune


def write_labels(root: Path, out: Path) -> Path:
    """``out/labels.csv``: path, Platelets|none, split (from ImageSets/Main)."""
    voc = root / "BCCD"
    gt = read_voc(voc / "Annotations")
    split_of = {}
    for split in ("train", "val", "test"):
        for name in (voc / "ImageSets" / "Main" / f"{split}.txt").read_text().split():
            split_of[name] = split
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for img in sorted((voc / "JPEGImages").glob("*.jpg")):
        ann = gt.find(img.name)
        if ann is None or img.stem not in split_of:
            continue
        rows.append([str(img.resolve()), "Platelets" if "Platelets" in ann.labels else "none", split_of[img.stem]])
    with open(out / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    return out / "labels.csv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("../shared/datasets/bccd"))
    ap.add_argument("--out", type=Path, default=Path("runs/bccd"))
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=320)
    ap.add_argument("--output-stride", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--methods", default="cam,gradcam")
    ap.add_argument("--step", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--crop-scale", type=float, nargs=2, default=(0.35, 1.0),
                    help="random resized crop area range; crops that cut out the only platelet make the label wrong")
    args = ap.parse_args()
    t0 = time.perf_counter()
    labels = write_labels(args.root, args.out)
    result = fine_tune(labels, args.out / "run", backbone=args.backbone, input_size=args.image_size, output_stride=args.output_stride,
                       epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, monitor="val_auroc", crop_scale=tuple(args.crop_scale),
                       progress=False)
    rows = {}
    for method in args.methods.split(","):
        rep = evaluate_model(result.model, labels, args.root / "BCCD" / "Annotations", method=method, split="test", step=args.step)
        rows[method] = rep
    elapsed = time.perf_counter() - t0
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    first = next(iter(rows.values()))
    print(f"\nBCCD platelets, test split: {first['images']} images, {first['localization_samples']} with platelets; "
          f"{args.backbone} {args.image_size}px os{args.output_stride}, {args.epochs} epochs, crop scale {tuple(args.crop_scale)}; {device}; {elapsed:.0f} s")
    print(f"classification (test): " + ", ".join(f"{k} {v * 100:.1f}" for k, v in first["classification"].items()))
    print("| map | MaxBoxAccV2 | IoU30 | IoU50 | IoU70 | MaxBoxAcc | PxAP |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for method, rep in rows.items():
        L = rep["localization"]
        print(f"| {method} | {L['MaxBoxAccV2']:.1f} | {L['IoU30']:.1f} | {L['IoU50']:.1f} | {L['IoU70']:.1f} | {L['MaxBoxAcc']:.1f} | - |")
    B = first["centre_baseline"]
    print(f"| centre baseline | {B['MaxBoxAccV2']:.1f} | {B['IoU30']:.1f} | {B['IoU50']:.1f} | {B['IoU70']:.1f} | {B['MaxBoxAcc']:.1f} | - |")
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "device": device,
                                                       "seconds": elapsed, "training": result.metrics,
                                                       "evaluation": {m: rep.to_dict() for m, rep in rows.items()}}, indent=2))


if __name__ == "__main__":
    main()
