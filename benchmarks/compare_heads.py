"""Heads that look, side by side, with the same training budget: GAP + linear (CAM, Grad-CAM), the
trainable attention head, the TAP head, and a small ViT trained from scratch (rollout, token Grad-CAM).

    uv run python benchmarks/compare_heads.py --dataset synthetic --out runs/heads-synth
    uv run python benchmarks/compare_heads.py --dataset bccd --out runs/heads-bccd

Synthetic: the demo's data (600 single-label 128-px images, 3 shape classes, one object each; boxes
and masks for scoring). BCCD: "contains platelets?" with the dataset's own splits (see
``bccd_platelets.py``). The CNNs start from the offline ImageNet EfficientNet-Lite0; no pretrained
transformer installs offline, so the ViT starts from random weights -- its figures say what a ViT
learns from these few images alone, not what a pretrained one would do. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_name  # noqa: E402
from bccd_platelets import write_labels  # noqa: E402

from weakloc.data.synthetic import SyntheticConfig, write_synthetic  # noqa: E402
from weakloc.evaluate.run import evaluate_model  # noqa: E402
from weakloc.train import fine_tune  # noqa: E402

CONFIGS = {
    "gap": ({"head": "cam"}, ["cam", "gradcam"]),
    "attention": ({"head": "attention", "attention_stages": [-3, -2]}, ["attention", "cam"]),
    "tap": ({"head": "tap", "tap_threshold": 0.1}, ["cam", "cam+positive"]),
    "vit": ({"backbone": "vit_tiny_patch16_224", "pretrained": "none", "lr": 5e-4, "freeze_epochs": 0, "output_stride": None},
            ["rollout", "gradcam"]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=["synthetic", "bccd"], default="synthetic")
    ap.add_argument("--out", type=Path, default=Path("runs/heads"))
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=None, help="default: 160 (synthetic), 256 (bccd)")
    ap.add_argument("--bccd-root", type=Path, default=Path("../shared/datasets/bccd"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.dataset == "synthetic":
        data = args.out / "data"
        if not (data / "labels.csv").is_file():
            write_synthetic(data, SyntheticConfig(n_images=600, size=128, mode="single", val_fraction=0.2, seed=args.seed))
        labels, annotations, split, size, monitor = data, data / "annotations.json", "val", args.image_size or 160, "val_loss"
        crop = (0.35, 1.0)
    else:
        labels = write_labels(args.bccd_root, args.out)
        annotations, split, size, monitor = args.bccd_root / "BCCD" / "Annotations", "test", args.image_size or 256, "val_auroc"
        crop = (0.6, 1.0)
    results = {}
    for name in args.configs.split(","):
        train_kw, methods = CONFIGS[name]
        kw = {"output_stride": 16, "lr": 2e-3, "freeze_epochs": 1, **train_kw}
        t0 = time.perf_counter()
        res = fine_tune(labels, args.out / name, input_size=size, epochs=args.epochs, batch_size=32 if args.dataset == "synthetic" else 16,
                        seed=args.seed, monitor=monitor, crop_scale=crop, progress=False, **kw)
        train_s = time.perf_counter() - t0
        for method in methods:
            opts = {"positive_weights": True} if method == "cam+positive" else {}
            rep = evaluate_model(res.model, labels, annotations, method=method.split("+")[0], split=split, maps=opts).to_dict()
            results[f"{name}/{method}"] = {"train_seconds": train_s, "classification": rep["classification"],
                                           "localization": rep["localization"], "centre": rep["centre_baseline"],
                                           "images": rep["images"], "samples": rep["localization_samples"]}
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    device = machine_name()
    first = next(iter(results.values()))
    print(f"\n{args.dataset}, {split} split ({first['images']} images, {first['samples']} scored); {size} px, {args.epochs} epochs each; {device}")
    print("| model | map | accuracy | ROC-AUC | MaxBoxAccV2 | IoU30/50/70 | PxAP | train s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for key, r in results.items():
        c, loc = r["classification"], r["localization"]
        auroc = f"{c['auroc'] * 100:.1f}" if "auroc" in c else "-"
        pxap = f"{loc['PxAP']:.1f}" if "PxAP" in loc else "-"
        model, method = key.split("/")
        print(f"| {model} | {method} | {c['acc'] * 100:.1f} | {auroc} | {loc['MaxBoxAccV2']:.1f} | "
              f"{loc['IoU30']:.1f}/{loc['IoU50']:.1f}/{loc['IoU70']:.1f} | {pxap} | {r['train_seconds']:.0f} |")
    cb = first["centre"]
    print(f"| centre baseline | - | - | - | {cb['MaxBoxAccV2']:.1f} | {cb['IoU30']:.1f}/{cb['IoU50']:.1f}/{cb['IoU70']:.1f} | "
          f"{cb.get('PxAP', float('nan')):.1f} | - |")


if __name__ == "__main__":
    main()
