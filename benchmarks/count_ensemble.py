"""Counting: how much of a model's count error is run-to-run noise? Score several trained counting
models alone and with their counts averaged (an ensemble), on one split.

    uv run python benchmarks/count_ensemble.py runs/count-bccd-wp256tv runs/count-bccd-tv-s1 \
        --labels runs/count-bccd-wp256tv/labels.csv --annotations ../shared/datasets/bccd/BCCD/Annotations \
        --baseline-splits train,val

Each RUN is a ``benchmarks/counting.py`` output folder (its ``density/model``) or a model folder. The
ensemble averages the models' counts and presence logits (each over its stored test-time views)
before rounding and gating, as ``evaluate`` makes whole counts. Every model must count the same
classes. An ensemble of N runs costs N trainings and N forward passes per image.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_name  # noqa: E402

from weakloc.data.counts import load_count_labels  # noqa: E402
from weakloc.data.dataset import ImageDataset, collate_skip_bad, eval_transform  # noqa: E402
from weakloc.data.labels import select_split  # noqa: E402
from weakloc.evaluate.counting import count_metrics  # noqa: E402
from weakloc.explain import pipeline  # noqa: E402
from weakloc.localize.instances import counting_forward, predicted_counts  # noqa: E402
from weakloc.models import load_model  # noqa: E402
from weakloc.models.classifier import ModelOutput  # noqa: E402


def model_dir(run: Path) -> Path:
    """A run folder's density model, or the folder itself when it is a model."""
    return run if (run / "config.json").is_file() else run / "density" / "model"


def counts_and_logits(model, labeled, batch_size: int = 16, test_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(N, K)`` counts and logits averaged over the model's stored views, and the ``(N, K)`` true counts;
    images at ``test_size`` (default: the model's stored test-time size, as ``evaluate`` counts)."""
    cfg = model.config
    settings = pipeline.map_settings(model, {"test_size": test_size} if test_size else None)
    loader = DataLoader(ImageDataset.from_labels(labeled, eval_transform(settings.test_size, cfg.mean, cfg.std)),
                        batch_size=batch_size, collate_fn=collate_skip_bad)
    k = len(cfg.classes)
    counts, logits, truth = [], [], []
    for batch in loader:
        if batch["image"] is None:
            continue
        with torch.no_grad():
            out = counting_forward(model, batch["image"], settings.count_views)
        counts.append(out.counts.float())
        logits.append(out.logits.float())
        truth.append(batch["target"][:, k:].float())
    return torch.cat(counts), torch.cat(logits), torch.cat(truth)


def whole(counts: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Whole counts as ``evaluate`` makes them (rounded, 0 where the class is called absent)."""
    return predicted_counts(ModelOutput(logits=logits, class_maps=None, features=None, counts=counts), "multi")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--labels", type=Path, required=True, help="counts CSV (or a labels source with --annotations)")
    ap.add_argument("--annotations", type=Path, default=None, help="count the annotated objects (labels without counts)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--baseline-splits", default="train", help="splits whose mean count is the baseline, comma-separated")
    ap.add_argument("--input-sizes", default=None,
                    help="also score each model alone at these input sizes (comma-separated), with its mean raw count: "
                         "a count that grows with the input's area comes from a map spread over the image, not from objects")
    args = ap.parse_args()
    models = [load_model(model_dir(r)).eval() for r in args.runs]
    classes = models[0].config.classes
    if any(m.config.classes != classes for m in models):
        raise SystemExit("every model must count the same classes")
    labels = load_count_labels(args.labels, annotations=args.annotations, classes=classes)
    test = select_split(labels, args.split)
    scored = [counts_and_logits(m, test) for m in models]
    truth = scored[0][2]
    base = torch.cat([select_split(labels, s).counts.float() for s in args.baseline_splits.split(",")]).mean(0, keepdim=True)

    def row(name: str, pred: torch.Tensor) -> str:
        m = count_metrics(pred, truth, classes)
        return f"| {name} | " + " | ".join(f"{m['per_class'][c]['MAE']:.3f}" for c in classes) + f" | {m['MAE']:.3f} | {m['mRMSE']:.3f} |"

    print(f"\nCounting ensembles, {args.split} split ({len(truth)} images); {machine_name()}")
    print("| models | " + " | ".join(f"MAE {c}" for c in classes) + " | MAE mean | mRMSE |")
    print("|---|" + "---:|" * (len(classes) + 2))
    for run, (c, lg, _) in zip(args.runs, scored):
        print(row(run.name, whole(c, lg)))
    everything = whole(torch.stack([s[0] for s in scored]).mean(0), torch.stack([s[1] for s in scored]).mean(0))
    print(row(f"all {len(scored)} averaged", everything))
    print(row("mean-count baseline", base.expand_as(truth)))
    print(row("rounded mean-count baseline", base.round().expand_as(truth)))
    print("true mean count: " + ", ".join(f"{n} {v:.2f}" for n, v in zip(classes, truth.mean(0).tolist())))
    for run, model in zip(args.runs, models) if args.input_sizes else []:
        trained = model.config.input_size
        for size in (int(v) for v in args.input_sizes.split(",")):
            c, lg, _ = counts_and_logits(model, test, test_size=size)  # the side the images are resized to
            print(row(f"{run.name} at {size} px (trained at {trained}); mean raw count "
                      + ", ".join(f"{n} {v:.2f}" for n, v in zip(classes, c.mean(0).tolist())), whole(c, lg)))
    for n in range(2, len(scored)):
        maes = [count_metrics(whole(torch.stack([scored[i][0] for i in combo]).mean(0), torch.stack([scored[i][1] for i in combo]).mean(0)),
                              truth, classes)["per_class"] for combo in itertools.combinations(range(len(scored)), n)]
        print(f"{n} of {len(scored)} averaged ({len(maes)} choices), MAE min / median / max: "
              + "; ".join(f"{c} {min(x[c]['MAE'] for x in maes):.3f} / {statistics.median(x[c]['MAE'] for x in maes):.3f} / "
                          f"{max(x[c]['MAE'] for x in maes):.3f}" for c in classes))


if __name__ == "__main__":
    main()
