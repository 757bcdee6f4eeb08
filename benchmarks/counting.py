"""Counting from image-level counts: count head vs density head, same training budget.

    uv run python benchmarks/counting.py --dataset synthetic --out runs/count-synth
    uv run python benchmarks/counting.py --dataset bccd --out runs/count-bccd
    uv run python benchmarks/counting.py --dataset aquarium --out runs/count-aquarium


Synthetic: 3 shape classes, 0..8 instances of each per image (several classes per image), small
objects; counts from ``counts.csv``. BCCD: RBC, WBC and Platelets counted from the VOC boxes of each
image (the boxes' coordinates are never used for training; only to score instances). RBC boxes in
BCCD are incomplete (many red cells are not annotated), so RBC counts are a noisy label. Aquarium
(../shared/datasets/aquarium, 7 classes, schools of fish: 10-50 objects in many photos): per-class
counts of the YOLO boxes are the only training label (``--counts-from``), the dataset's splits;
before training, ``crowding`` prints how many objects share a density-map cell with another
object's centre at each input size and stride (a cell holding two centres can carry their summed
density, but its single peak is one instance point).

Rows: ``count`` -- the pooled count head, instances from CAM peaks; ``density`` -- the density head,
instances from its peaks. ``--box-sizes-from K`` adds rows whose instance boxes have each class's
size calibrated on K annotated train images per class (``weakloc calibrate``). The mean-count baseline (mean training count per class) is beside them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_name  # noqa: E402
from bccd_platelets import write_labels  # noqa: E402

from weakloc.data.annotations import read_annotations  # noqa: E402
from weakloc.data.counts import load_count_labels  # noqa: E402
from weakloc.data.labels import select_split  # noqa: E402
from weakloc.data.synthetic import SyntheticConfig, write_synthetic  # noqa: E402
from weakloc.evaluate.calibrate import calibrate_box_sizes  # noqa: E402
from weakloc.evaluate.counting import evaluate_counts  # noqa: E402
from weakloc.models import load_model  # noqa: E402
from weakloc.train import fine_tune  # noqa: E402


def crowding(labels, gt, size: int, stride: int) -> tuple[int, int, int]:
    """Over ``labels``' training images resized to ``size x size``: (objects, objects whose box centre
    shares a ``stride``-pixel map cell with another object of its class, the most centres of one class in
    one cell)."""
    total = shared = most = 0
    for path, split in zip(labels.paths, labels.splits):
        ann = gt.find(path)
        if split != "train" or ann is None or not len(ann.boxes):
            continue
        cx = ((ann.boxes[:, 0] + ann.boxes[:, 2]) / 2 * size / ann.width // stride).long()
        cy = ((ann.boxes[:, 1] + ann.boxes[:, 3]) / 2 * size / ann.height // stride).long()
        names = {c: i for i, c in enumerate(sorted(set(ann.labels)))}
        key = torch.tensor([names[c] for c in ann.labels]) * 1_000_000 + cy * 1000 + cx
        _, inverse, counts = torch.unique(key, return_inverse=True, return_counts=True)
        total += len(key)
        shared += int((counts[inverse] > 1).sum())
        most = max(most, int(counts.max()))
    return total, shared, most


def print_crowding(labels, gt, sizes, strides) -> None:
    print("\nObjects sharing a density-map cell with another of their class (training images):")
    print("| input px | " + " | ".join(f"stride {s}" for s in strides) + " |")
    print("|---:|" + "---:|" * len(strides))
    for size in sizes:
        cells = []
        for stride in strides:
            total, shared, most = crowding(labels, gt, size, stride)
            cells.append(f"{100 * shared / max(total, 1):.1f} % (max {most})")
        print(f"| {size} | " + " | ".join(cells) + " |")
    print(f"({total} objects)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=["synthetic", "bccd", "aquarium"], default="synthetic")
    ap.add_argument("--out", type=Path, default=Path("runs/count"))
    ap.add_argument("--heads", default="count,density")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--images", type=int, default=800, help="synthetic images")
    ap.add_argument("--image-size", type=int, default=None, help="default: 160 (synthetic), 320 (bccd), 320 (aquarium)")
    ap.add_argument("--render-size", type=int, default=128, help="synthetic images' side in pixels (same scenes at any size)")
    ap.add_argument("--dihedral", action="store_true", help="train with flips both ways and right-angle rotations")
    ap.add_argument("--train-on", choices=["train", "trainval"], default="train",
                    help="trainval: train on the train and val splits (the epoch kept is then chosen on val images it trained on)")
    ap.add_argument("--balanced", action="store_true", help="draw images with rare counts more often")
    ap.add_argument("--output-stride", type=int, default=None)
    ap.add_argument("--count-loss", default="poisson")
    ap.add_argument("--density-stage", default="-3", help="feature_info index, or 'last'")
    ap.add_argument("--density-hidden", type=int, default=64)
    ap.add_argument("--no-density-context", action="store_true", help="the density head reads its stage alone")
    ap.add_argument("--density-l1", type=float, default=0.0)
    ap.add_argument("--density-tv", type=float, default=0.0)
    ap.add_argument("--density-gather", type=float, default=0.0, help="weight of the density maps' L1/2 sparsity")
    ap.add_argument("--crop-consistency", type=float, default=0.0, help="weight of the crop-consistency loss")
    ap.add_argument("--ema-decay", type=float, default=0.0, help="moving average of the weights, decay per step (0: off)")
    ap.add_argument("--swa", type=float, default=0.0, help="stochastic weight averaging over this last fraction of the steps (0: off)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--backbone-lr", default=None, help="earliest,latest backbone LR multipliers (default: fine_tune's)")
    ap.add_argument("--bccd-root", type=Path, default=Path("../shared/datasets/bccd"))
    ap.add_argument("--bccd-classes", default="RBC,WBC,Platelets", help="BCCD classes counted (RBC counts are noisy)")
    ap.add_argument("--aquarium-root", type=Path, default=Path("../shared/datasets/aquarium"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reevaluate", action="store_true", help="score the heads already trained (OUT/<head>/model) again")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted training from OUT/<head>/checkpoints")
    ap.add_argument("--box-sizes-from", type=int, default=0,
                    help="also score each head with instance box sizes calibrated on this many annotated train images per class, as extra rows")
    ap.add_argument("--region-scales", default=None,
                    help="also print the val split's box F1 of half-peak region boxes widened by each of these factors (e.g. 1,1.5,2,2.5,3)")
    ap.add_argument("--count-tta", default=None, help="also score each head with these test-time views (none | flip | dihedral), as extra rows")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.dataset == "synthetic":
        data = args.out / "data"
        if not (data / "counts.csv").is_file():
            write_synthetic(data, SyntheticConfig(n_images=args.images, size=args.render_size, mode="multi", max_instances=8, radius=(0.05, 0.09),
                                                  val_fraction=0.15, test_fraction=0.15, seed=args.seed))
        labels, annotations = load_count_labels(data), data / "annotations.json"
        size = args.image_size or 160
    elif args.dataset == "bccd":
        annotations = args.bccd_root / "BCCD" / "Annotations"
        labels = load_count_labels(write_labels(args.bccd_root, args.out), annotations=annotations, classes=args.bccd_classes.split(","))
        size = args.image_size or 320
    else:
        from whole_objects import aquarium_labels

        csv, annotations = aquarium_labels(args.aquarium_root, args.out)
        labels = load_count_labels(csv, annotations=annotations)
        size = args.image_size or 320  # at 320 px under 1 % of the objects share a stride-8 cell (print_crowding)
        print_crowding(labels, read_annotations(annotations), sizes=sorted({320, 512, size}), strides=(4, 8, 16))
    train_data, val_data, train_counts = labels, None, None
    if args.train_on == "trainval":
        keep = [i for i, s in enumerate(labels.splits) if s in ("train", "val")]
        train_data = labels.subset(keep)
        val_data = select_split(labels, "val")
        train_counts = train_data.counts  # the mean-count baseline sees the same images
    cache = args.out / "results.json"
    results = json.loads(cache.read_text()) if cache.is_file() else {}  # heads already measured are kept

    def record(key: str, model, train_seconds: float, views: str | None = None) -> None:
        """Score ``model`` on the test split (counts averaged over ``views``; default: the model's
        stored ones) into ``results[key]`` and save the cache."""
        rep = evaluate_counts(model, labels, annotations, split="test", count_views=views, train_counts=train_counts)
        results[key] = {**rep.to_dict(), "train_seconds": train_seconds}
        cache.write_text(json.dumps(results, indent=2))

    for head in args.heads.split(","):
        if head in results and args.reevaluate:
            record(head, load_model(args.out / head / "model"), results[head]["train_seconds"])
        if head in results:
            continue
        t0 = time.perf_counter()
        res = fine_tune(train_data, args.out / head, val=val_data, input_size=size, output_stride=args.output_stride, epochs=args.epochs, batch_size=16,
                        seed=args.seed, monitor="val_count_mae", dihedral=args.dihedral, balanced=args.balanced, progress=False, counting=head,
                        count_loss=args.count_loss, density_stage=None if args.density_stage == "last" else int(args.density_stage), density_hidden=args.density_hidden,
                        density_context=not args.no_density_context,
                        density_l1=args.density_l1, density_tv=args.density_tv, density_gather=args.density_gather, crop_consistency=args.crop_consistency, ema_decay=args.ema_decay, swa=args.swa, lr=args.lr, resume=args.resume,
                        backbone_lr=tuple(float(v) for v in args.backbone_lr.split(",")) if args.backbone_lr else None)
        record(head, res.model, time.perf_counter() - t0)
    for head in args.heads.split(",") if args.count_tta else []:
        key = f"{head}, {args.count_tta} views"
        if key not in results or args.reevaluate:
            record(key, load_model(args.out / head / "model"), results[head]["train_seconds"], args.count_tta)
    for head in args.heads.split(",") if args.box_sizes_from else []:
        key = f"{head}, box sizes from {args.box_sizes_from}"
        if key not in results or args.reevaluate:
            model = load_model(args.out / head / "model")
            calibrate_box_sizes(model, labels, annotations, per_class=args.box_sizes_from, split="train", seed=args.seed)
            record(key, model, results[head]["train_seconds"])
    if args.region_scales:
        scales = [float(v) for v in args.region_scales.split(",")]
        print("\nBox F1 @0.5 of the half-peak region widened by each factor, val split, one view:")
        print("| model | " + " | ".join(f"x{v:g}" for v in scales) + " |")
        print("|---|" + "---:|" * len(scales))
        for head in args.heads.split(","):
            model = load_model(args.out / head / "model")
            f1 = [evaluate_counts(model, labels, annotations, split="val", count_views="none", box_scale=v).boxes.f1 for v in scales]
            print(f"| {head} | " + " | ".join(f"{v:.3f}" for v in f1) + " |")
    device = machine_name()
    results = {h: r for h, r in results.items() if h.split(",")[0] in args.heads.split(",")}
    first = next(iter(results.values()))
    classes = list(first["counting"]["per_class"])
    print(f"\n{args.dataset} counting, test split ({first['images']} images); {size} px, output stride {args.output_stride}, "
          f"{args.epochs} epochs, {args.count_loss} loss{', dihedral' if args.dihedral else ''}{', count-balanced sampling' if args.balanced else ''}{', trained on train+val' if args.train_on == 'trainval' else ''}; {device}")
    print("Whole counts as ILC scores them (rounded; 0 where the classifier says absent); 'raw MAE' is the unrounded count's.")
    print("| model | views | " + " | ".join(f"MAE {c}" for c in classes) + " | MAE mean | raw MAE | mRMSE | mRMSE-nz | m-relRMSE | m-relRMSE-nz | point F1 | box F1 @0.5 | train s |")
    print("|---|---|" + "---:|" * (len(classes) + 9))
    rows = [(h, r["counting"], r) for h, r in results.items()]
    rows += [("mean-count baseline", first["baseline"], None), ("rounded mean-count baseline", first["baseline_rounded"], None)]
    for name, m, r in rows:
        per = " | ".join(f"{m['per_class'][c]['MAE']:.3f}" for c in classes)
        raw = f"{r['counting_raw']['MAE']:.3f}" if r else "-"
        views = r.get("tta", "none") if r else "-"
        extra = f"{r['points']['F1']:.3f} | {r['boxes']['F1']:.3f} | {r['train_seconds']:.0f}" if r else "- | - | -"
        print(f"| {name} | {views} | {per} | {m['MAE']:.3f} | {raw} | {m['mRMSE']:.3f} | {m['mRMSE-nz']:.3f} | {m['m-relRMSE']:.3f} | {m['m-relRMSE-nz']:.3f} | {extra} |")


if __name__ == "__main__":
    main()
