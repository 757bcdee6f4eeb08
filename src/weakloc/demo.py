"""``weakloc demo``: the whole path, offline, on synthetic shapes.

1. synthesise images whose classes differ by shape (exact boxes and masks kept for scoring only);
2. fine-tune the offline ImageNet EfficientNet-Lite0 on the image-level labels alone;
3. choose the box threshold on the boxes of 100 training images (the protocol's "few annotated
   images" calibration), then evaluate the validation images with the WSOL protocol, centre
   baseline beside;
4. localize the validation images and write ``report.html`` and ``metrics.json``.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path

from weakloc.data.labels import load_labels
from weakloc.data.synthetic import SyntheticConfig, write_synthetic
from weakloc.evaluate.calibrate import calibrate
from weakloc.evaluate.run import evaluate_model, summary_rows
from weakloc.models.checkpoint import save_model
from weakloc.report.html import gallery_cards, metrics_table, write_page
from weakloc.report.localization import localize_images
from weakloc.train import fine_tune

DEMO_IMAGE_SIZE = 160
DEMO_OUTPUT_STRIDE = 16
CALIBRATION_IMAGES = 100
DEMO_FROZEN_STAGES = 0


def run_demo(out: str | Path = "weakloc-demo", n_images: int = 600, epochs: int = 8, seed: int = 0,
             frozen_stages: int = DEMO_FROZEN_STAGES, console=None, progress_bar=None, print_report=None, methods: tuple[str, ...] = ("cam", "gradcam")) -> dict:
    """Run the demo; returns the metrics written to ``out/metrics.json``."""
    import os

    import torch

    # Same seed, same machine, same figures: deterministic kernels where PyTorch has them (a warning,
    # not an error, where it has none), and cuBLAS told to use a fixed workspace on a GPU.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _run_demo(Path(out), n_images, epochs, seed, frozen_stages, console, progress_bar, print_report, methods)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _run_demo(out: Path, n_images: int, epochs: int, seed: int, frozen_stages: int, console, progress_bar, print_report, methods) -> dict:
    say = console.print if console is not None else print
    bar = progress_bar or (lambda _d: nullcontext(None))
    t0 = time.perf_counter()
    data = out / "data"
    say(f"[1/4] synthesising {n_images} images (triangle / square / star, random colour, clutter) in {data}")
    with bar("synthesising") as update:
        write_synthetic(data, SyntheticConfig(n_images=n_images, size=128, mode="single", val_fraction=0.2, seed=seed), progress=update)
    say(f"[2/4] fine-tuning tf_efficientnet_lite0 (offline ImageNet weights) on image labels only, {epochs} epochs")
    result = fine_tune(data, out / "run", input_size=DEMO_IMAGE_SIZE, output_stride=DEMO_OUTPUT_STRIDE, epochs=epochs,
                       batch_size=32, seed=seed, frozen_stages=frozen_stages, progress=console is not None)
    model = result.model
    say(f"[3/4] calibrating the box threshold on {CALIBRATION_IMAGES} training images' boxes, then evaluating "
        f"the validation images ({', '.join(methods)}; centre baseline beside)")
    labels = load_labels(data)
    train_idx = [i for i, s in enumerate(labels.splits) if s == "train"][:CALIBRATION_IMAGES]
    # the one calibration route, on every one of these training images (per_class covers them all)
    calibrate(model, labels.subset(train_idx), data / "annotations.json", per_class=CALIBRATION_IMAGES, methods=(methods[0],),
              split="all", seed=seed)
    save_model(model, result.model_dir)
    reports = {}
    for m in methods:
        with bar(f"evaluating {m}") as update:
            reports[m] = evaluate_model(model, data, data / "annotations.json", method=m, split="val", progress=update)
        if print_report is not None:
            print_report(reports[m], title=f"Evaluation ({m})")
    main = reports[methods[0]]
    say("[4/4] localizing the validation images -> overlays, detections.json, report.html")
    val_images = [data / p for p in _val_paths(data)]
    with bar("localizing") as update:
        det = localize_images(model, val_images[:48], out / "localize", method=methods[0], threshold="calibrated", progress=update)
    elapsed = time.perf_counter() - t0
    metrics = {"training": result.metrics, "evaluation": {m: r.to_dict() for m, r in reports.items()}, "seconds": round(elapsed, 1)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    rows = [r | {"method": m} for m in methods for r in summary_rows(reports[m])[:1]] + [summary_rows(main)[1] | {"method": "-"}]
    cols = ["map", "MaxBoxAccV2", "IoU30", "IoU50", "IoU70", "MaxBoxAcc", "GT-known Loc", "Top-1 Loc", "PxAP"]
    cls = main["classification"]
    intro = (f"<p class='note'>{n_images} synthetic images (128 px, shapes differ by class, colours random); "
             f"{result.metrics['train_images']} trained on with image-level labels only; {main['images']} validation images. "
             f"Validation accuracy {cls['acc'] * 100:.1f}%. Localization follows the WSOL protocol (Choe et al. CVPR 2020): "
             f"GT-known maps, threshold step {main['localization']['step']}; GT-known and Top-1 Loc at the threshold "
             f"{model.config.maps.threshold:.2f} calibrated on {CALIBRATION_IMAGES} training images' boxes. Run time {elapsed:.0f} s.</p>")
    cards = gallery_cards([{"image": (out / "localize" / "overlays" / Path(c)).resolve(), "title": Path(c).name, "lines": []}
                           for c in sorted(p.name for p in (out / "localize" / "overlays").glob("*.png"))], out.resolve())
    write_page(out / "report.html", "weakloc demo — where is it?", [
        ("", intro), ("Localization (%)", metrics_table(rows, cols)),
        (f"Validation overlays ({len(det['images'])}; boxes at the threshold calibrated on training images)", cards),
    ])
    say(f"done in {elapsed:.0f} s: {out / 'report.html'}, {out / 'metrics.json'}")
    loc, base = main["localization"], main["centre_baseline"]
    say(f"MaxBoxAccV2 {loc['MaxBoxAccV2']:.1f} (centre baseline {base['MaxBoxAccV2']:.1f}, "
        f"{loc['MaxBoxAccV2'] - base['MaxBoxAccV2']:+.1f} points)")
    say(f"see it live (heatmaps, boxes, a threshold slider): uv run weakloc serve {result.model_dir} --images {data / 'images'}")
    return metrics


def _val_paths(data: Path) -> list[str]:
    import csv

    with open(data / "labels.csv", newline="") as f:
        return [r["path"] for r in csv.DictReader(f) if r["split"] == "val"]
