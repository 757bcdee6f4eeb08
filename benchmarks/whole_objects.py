"""Whole objects, not parts: the ablation table of localization levers on real photos (issue 6).

    uv run python benchmarks/whole_objects.py --dataset aquarium --out runs/whole-aquarium
    uv run python benchmarks/whole_objects.py --dataset bccd --out runs/whole-bccd
    uv run python benchmarks/whole_objects.py --dataset synthetic --out runs/whole-synthetic
    uv run python benchmarks/whole_objects.py --dataset all --rows cam,default,refine,ddt,cam+ddt,cam+ddt-refine   # one table per set
    uv run python benchmarks/whole_objects.py --dataset all --seeds 0,1,2 --out runs/whole-seeds --rows ...   # + mean and spread

Aquarium (../shared/datasets/aquarium): 7 classes, multi-label presence from the YOLO files as the
only training label; the boxes of each present class score its map (MaxBoxAccV2, the protocol's
GT-known setting), on the dataset's own test split. BCCD: "contains platelets?" (see
``bccd_platelets.py``), scored on the platelet boxes of the positive test images. Synthetic: the
demo's data (600 shapes, ``backbones.py``'s), 160 px, scored on its val split.

Every row is one lever added to the base (or a named combination); models are trained once and
shared by the rows that only change the map. The centre baseline and plain CAM (the same backbone at
its native stride, min-max maps) are beside every figure. K = 0 is the row's own map and the
customary threshold (0.2; 0.5 for maps refined with the image, ``REFINED_THRESHOLD``); K = 5 and K = 10 calibrate the threshold (``weakloc calibrate --per-class K``)
on K annotated *train* images per class and report GT-known Loc at it (MaxBoxAccV2 takes the best
threshold, so calibration does not change it). The ``k5-*`` rows let five annotated train images per
class choose the test-time size (and normalisation). ``--rows`` picks rows; results are cached in OUT.

``--seeds S1,S2,...`` runs the whole table once per seed (in OUT/<dataset>/seed-S: each seed trains
its own models, and on the synthetic set draws its own images) and then prints every cell as the
mean over the seeds with the sample standard deviation and the range.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_name  # noqa: E402
from bccd_platelets import write_labels as write_bccd_labels  # noqa: E402

from weakloc.config import DEFAULT_BACKBONE, MapConfig, upgrade_v1  # noqa: E402
from weakloc.data.annotations import read_annotations  # noqa: E402
from weakloc.data.labels import load_labels, select_split  # noqa: E402
from weakloc.errors import WeaklocError  # noqa: E402
from weakloc.evaluate.calibrate import calibrate  # noqa: E402
from weakloc.evaluate.run import evaluate_model  # noqa: E402
from weakloc.explain.ddt import fit_directions  # noqa: E402
from weakloc.models import load_model  # noqa: E402
from weakloc.models.colocalization import load_directions, save_directions  # noqa: E402
from weakloc.train import fine_tune  # noqa: E402

#: trained models: name -> fine_tune keyword arguments (a ``teacher`` names another model here)
MODELS: dict[str, dict] = {
    "stride32": {},
    "stride16": {"output_stride": 16},
    "has": {"output_stride": 16, "hide_prob": 0.25},
    "cutmix": {"output_stride": 16, "cutmix_alpha": 1.0},
    "align": {"output_stride": 16, "align_weight": 1.0, "consistency_weight": 1.0},
    "tap": {"output_stride": 16, "head": "tap"},
    "attention": {"output_stride": 16, "head": "attention", "attention_stages": [-3, -2]},
    "psol": {"output_stride": 16, "teacher": "stride16"},
    "align-psol": {"output_stride": 16, "align_weight": 1.0, "consistency_weight": 1.0, "teacher": "align"},
    # PSOL's layout: the box head on its own backbone beside a frozen copy of the default model
    "psol-sep": {"teacher": "stride32", "box_backbone": DEFAULT_BACKBONE},
}

#: rows: name -> (model, map method, map overrides, what the row adds). The overrides are ``maps=`` of
#: ``evaluate_model`` / ``calibrate`` (``test_size``, ``normalization``, ``tta``, method options), plus
#: ``input_scale`` (the test-time size as a multiple of the training size) and ``choose`` (a K-shot row)
ROWS: dict[str, tuple[str, str, dict, str]] = {
    "cam": ("stride32", "cam", {}, "plain CAM, native stride 32"),
    "stride16": ("stride16", "cam", {}, "denser maps: output_stride 16"),
    "fuse": ("stride16", "gradcam", {"layer": "backbone.blocks.5,backbone.bn2"}, "Grad-CAM of the last two stages fused"),
    "pas": ("stride16", "cam", {"normalization": "pas"}, "percentile normalisation (Bae et al. 2020)"),
    "ivr": ("stride16", "cam", {"normalization": "ivr"}, "IVR normalisation (Kim et al. 2021)"),
    "positive": ("stride16", "cam", {"positive_weights": True}, "negative class weights clamped"),
    "tta": ("stride16", "cam", {"tta": True}, "test-time augmentation (flips, scales)"),
    "eigencam": ("stride16", "eigencam", {}, "first principal component of the features"),
    "has": ("has", "cam", {}, "Hide-and-Seek training (p = 0.25)"),
    "cutmix": ("cutmix", "cam", {}, "CutMix training (alpha = 1)"),
    "align": ("align", "cam", {}, "alignment + consistency losses (Kim et al. 2022)"),
    "tap": ("tap", "cam", {}, "thresholded average pooling head"),
    "attention": ("attention", "attention", {}, "trainable attention head's maps"),
    "psol": ("psol", "localizer", {}, "second stage on the stride-16 model's pseudo-masks"),
    "align-psol": ("align-psol", "localizer", {}, "second stage on the aligned model's pseudo-masks"),
    "align-tta": ("align", "cam", {"tta": True}, "alignment + consistency, with TTA"),
    # test-time resolution: the fully convolutional model run on a larger input than it was trained on
    "cam-640": ("stride32", "cam", {"test_size": 640}, "plain CAM, input 640 px at test time"),
    "hires-448": ("stride16", "cam", {"test_size": 448}, "stride 16, input 448 px at test time"),
    "hires-640": ("stride16", "cam", {"test_size": 640}, "stride 16, input 640 px at test time"),
    "hires-640-positive": ("stride16", "cam", {"test_size": 640, "positive_weights": True}, "... and negative weights clamped"),
    "hires-640-eigencam": ("stride16", "eigencam", {"test_size": 640}, "... Eigen-CAM instead of CAM"),
    "hires-640-tta": ("stride16", "cam", {"test_size": 640, "tta": True}, "... with TTA"),
    "cam-640-positive": ("stride32", "cam", {"test_size": 640, "positive_weights": True}, "plain CAM at 640 px, negative weights clamped"),
    "hires-640-positive-pas": ("stride16", "cam", {"test_size": 640, "positive_weights": True, "normalization": "pas"},
                               "stride 16, 640 px, clamped weights, percentile normalisation"),
    "hires-640-positive-tta": ("stride16", "cam", {"test_size": 640, "positive_weights": True, "tta": True},
                               "stride 16, 640 px, clamped weights, TTA"),
    "cam-640-positive-pas": ("stride32", "cam", {"test_size": 640, "positive_weights": True, "normalization": "pas"},
                             "plain CAM at 640 px, clamped weights, percentile normalisation"),
    "hires-800-positive": ("stride16", "cam", {"test_size": 800, "positive_weights": True}, "stride 16, 800 px, clamped weights"),
    "has-640": ("has", "cam", {"test_size": 640}, "Hide-and-Seek, input 640 px at test time"),
    "psol-640": ("psol", "localizer", {"test_size": 640}, "second stage, input 640 px at test time"),
    "box-x2": ("psol", "box", {"input_scale": 2}, "second stage's class-agnostic box regressor (PSOL), 2x test-time size"),
    "align-640": ("align", "cam", {"test_size": 640}, "alignment + consistency, input 640 px at test time"),
    "x2": ("stride16", "cam", {"input_scale": 2}, "stride 16, input twice the training size at test time"),
    "x2-eigencam": ("stride16", "eigencam", {"input_scale": 2}, "... Eigen-CAM instead of CAM"),
    "attention-x2": ("attention", "attention", {"input_scale": 2}, "attention head's maps, input twice the training size"),
    # what `weakloc train` stores by default: twice the training size at test time, CAM with clamped weights
    "default": ("stride32", "cam", {"input_scale": 2, "positive_weights": True}, "weakloc train's defaults: 2x test-time size, clamped weights"),
    # K = 5 chooses: five annotated train images per class pick the map and the test-time size
    "k5-size": ("stride16", "cam", {"positive_weights": True, "choose": {"methods": ("cam",), "scales": (1, 2, 3)}},
                "K = 5 picks the test-time size (1-3x the training size); CAM, clamped weights"),
    "k5-size-norm": ("stride16", "cam", {"positive_weights": True, "choose": {"methods": ("cam",), "scales": (1, 2, 3),
                                                                             "normalizations": ("minmax", "pas")}},
                     "K = 5 picks the test-time size (1-3x) and the normalisation (min-max or PaS); CAM, clamped weights"),
    # issue 18: evidence of objects the classifier does not need, and maps that follow the image's edges
    "refine": ("stride32", "cam", {"input_scale": 2, "positive_weights": True, "refine": "guided"},
               "weakloc train's defaults + guided filter with the image (refine)"),
    "ddt": ("stride32", "ddt", {"input_scale": 2}, "class co-localization of the backbone's features (DDT), 2x size"),
    # cam+ddt takes no positive_weights: it clamps the CAM at 0 itself before blending
    "cam+ddt": ("stride32", "cam+ddt", {"input_scale": 2}, "CAM blended with DDT (weight 0.5), 2x size"),
    "cam+ddt-refine": ("stride32", "cam+ddt", {"input_scale": 2, "refine": "guided"},
                       "CAM + DDT, then the guided filter"),
    "attention-refine": ("attention", "attention", {"refine": "guided"}, "attention head's maps, then the guided filter"),
    "box": ("psol", "box", {}, "second stage's box regressor sharing the stride-16 classifier's backbone"),
    "box-sep": ("psol-sep", "box", {}, "box regressor on its own backbone, the default model its frozen teacher (PSOL)"),
    "box-sep-refine": ("psol-sep", "box", {"refine": "guided"}, "... then the guided filter"),
    "k5-size-norm-s32": ("stride32", "cam", {"positive_weights": True, "choose": {"methods": ("cam",), "scales": (1, 2, 3),
                                                                                 "normalizations": ("minmax", "pas")}},
                         "... the same choice for the plain stride-32 model"),
}


def aquarium_labels(root: Path, out: Path) -> tuple[Path, Path]:
    """``out/labels.csv`` of multi-label presence (``fish;shark``) with the dataset's splits, from the
    YOLO files; the annotations are the YOLO dataset itself."""
    gt = read_annotations(root)
    rows = []
    for folder, split in (("train", "train"), ("valid", "val"), ("test", "test")):
        for img in sorted((root / folder / "images").glob("*.jpg")):
            ann = gt.find(img.relative_to(root).as_posix())
            if ann is None:
                continue
            rows.append([str(img.resolve()), ";".join(sorted(set(ann.labels))), split])
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    return out / "labels.csv", root


def train(name: str, labels: Path, args, cfg: dict) -> Path:
    folder = args.out / name
    if (folder / "model").is_dir():
        return folder / "model"
    kw = dict(MODELS[name])
    if "teacher" in kw:
        kw["teacher"] = train(kw["teacher"], labels, args, cfg)
    t0 = time.perf_counter()
    fine_tune(labels, folder, input_size=cfg["size"], epochs=args.epochs, batch_size=16, seed=args.seed, monitor=cfg["monitor"],
              crop_scale=cfg["crop"], progress=False, **kw)
    (folder / "train_seconds.txt").write_text(f"{time.perf_counter() - t0:.0f}\n")
    return folder / "model"


#: K of the rows that choose their size / normalisation from annotated train images
CHOICE_K = 5


def prepare(row: str, labels: Path, gt, args, cfg: dict, chosen: dict | None = None):
    """The row's model (trained if needed) with no stored test-time size or map options; its map
    method, the method's label in the table and the row's map overrides (``maps=`` of
    ``evaluate_model`` / ``calibrate``). ``chosen``: the model's ``config.maps`` (``to_dict()``) after
    a K-shot row's choice, cached, so filling a later column does not choose again."""
    model_name, method, options, _ = ROWS[row]
    model = load_model(train(model_name, labels, args, cfg))
    options = dict(options)
    # rows state their test-time size (default: the training size), map options and refinement; fine_tune stores defaults of all
    stored = model.config.maps
    model.config.maps = dataclasses.replace(stored, test_size=None, options={}, refine=None,
                                            sources={k: v for k, v in stored.sources.items() if k not in ("test_size", "options", "refine")})
    if method in ("ddt", "cam+ddt") and getattr(model, "colocalization", None) is None:  # the statistics, once per model
        folder = args.out / model_name / "ddt"
        model.colocalization = load_directions(folder, len(model.config.classes)) if (folder / "ddt.safetensors").is_file() else None
        if model.colocalization is None:
            model.colocalization = fit_directions(model, select_split(load_labels(labels), "train"))
            save_directions(model.colocalization, folder)
    if "input_scale" in options:  # test-time resolution (`--test-size` of evaluate / localize)
        options["test_size"] = int(round(model.config.input_size * options.pop("input_scale") / 32) * 32)
    label = method
    choose = options.pop("choose", None)
    if choose and chosen:
        model.config.maps = cached_maps(chosen)
        method = model.config.maps.method
    elif choose:  # a K-shot row: calibration picks the method, the size (and the normalisation); the test split is scored with them
        sizes = tuple(int(round(model.config.input_size * f / 32) * 32) for f in choose["scales"])
        picked = calibrate(model, labels, gt, per_class=CHOICE_K, methods=choose["methods"], test_sizes=sizes,
                           maps=options, seed=args.seed, normalizations=choose.get("normalizations"))
        method = picked.method  # calibrate stored the picked size (and normalisation) in model.config.maps
        label = f"{method} @ {picked.test_size} px" + (f", {picked.normalization}" if picked.normalization else "")
    return model, method, label, options


def cached_maps(chosen: dict) -> MapConfig:
    """A K-shot row's cached map settings; caches written before ``config.maps`` hold the old
    ``localization`` dict (``input_size``, ...), read as a format-1 model's."""
    if set(chosen) <= {f.name for f in dataclasses.fields(MapConfig)}:
        return MapConfig(**chosen)
    return MapConfig(**upgrade_v1({"localization": chosen})["maps"])


def calibrated(res: dict) -> dict[str, dict]:
    """K -> {"tau", "gt_known"} of a cached row (older caches hold K = 5 as ``k5_*``)."""
    out = dict(res.get("calibrated", {}))
    if "k5_tau" in res:
        out.setdefault("5", {"tau": res["k5_tau"], "gt_known": res["k5_gt_known"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=["aquarium", "bccd", "synthetic", "all"], default="aquarium")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--image-size", type=int, default=None, help="default: 320 (aquarium), 256 (bccd), 160 (synthetic)")
    ap.add_argument("--root", type=Path, default=None, help="dataset folder (default: ../shared/datasets/<dataset>)")
    ap.add_argument("--per-class", default="5,10", help="K of the calibrated columns (annotated train images per class)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", default=None, help="comma-separated seeds: the table once per seed (OUT/<dataset>/seed-S), "
                                                 "then each cell's mean, standard deviation and range")
    args = ap.parse_args()
    datasets = ("synthetic", "aquarium", "bccd") if args.dataset == "all" else (args.dataset,)
    out = args.out
    if args.seeds is None:
        for dataset in datasets:
            args.out = out / dataset if out and args.dataset == "all" else out
            table(dataset, args)
        return
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    for dataset in datasets:
        runs = []
        for seed in seeds:
            args.seed, args.out = seed, (out or Path("runs/whole-seeds")) / dataset / f"seed-{seed}"
            runs.append(table(dataset, args))
        spread_table(dataset, seeds, runs, args)


def per_class(args) -> list[int]:
    """K of the calibrated columns, from ``--per-class``."""
    return [int(k) for k in args.per_class.split(",") if k.strip()]


def spread(values: list[float | None], digits: int = 1) -> str:
    """``mean (sd; min-max)`` of the values present; the mean alone for one value, '-' for none."""
    v = [x for x in values if x is not None]
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.{digits}f} (1 seed)"
    return f"{statistics.mean(v):.{digits}f} ({statistics.stdev(v):.{digits}f}; {min(v):.{digits}f}-{max(v):.{digits}f})"


def spread_table(dataset: str, seeds: list[int], runs: list[dict], args) -> None:
    """Every row's cells over the seeds: mean (sample standard deviation; min-max)."""
    ks = per_class(args)
    rows = [r for r in args.rows.split(",") if any(r in run for run in runs)]
    print(f"\n{dataset}: mean (sd; min-max) over seeds {','.join(map(str, seeds))}; {args.epochs} epochs per model; {machine_name()}")
    print("| row | adds | seeds | acc | MaxBoxAccV2 | vs centre | vs plain CAM | IoU50 | GT-known (K=0) | "
          + " | ".join(f"GT-known @K={k}" for k in ks) + " | instance F1 (K=0) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * (len(ks) + 1))

    def cells(row: str, get) -> list[float | None]:
        out = []
        for run in runs:
            try:
                out.append(get(run[row], run))
            except (KeyError, TypeError):
                out.append(None)
        return out

    for r in rows:
        calib = [spread(cells(r, lambda res, run, k=k: calibrated(res)[str(k)]["gt_known"])) for k in ks]
        print(f"| {r} | {ROWS[r][3]} | {sum(r in run for run in runs)} | {spread(cells(r, lambda res, run: res['classification']['acc'] * 100))} | "
              f"{spread(cells(r, lambda res, run: res['localization']['MaxBoxAccV2']))} | "
              f"{spread(cells(r, lambda res, run: res['localization']['MaxBoxAccV2'] - res['centre']['MaxBoxAccV2']))} | "
              f"{spread(cells(r, lambda res, run: res['localization']['MaxBoxAccV2'] - run['cam']['localization']['MaxBoxAccV2']))} | "
              f"{spread(cells(r, lambda res, run: res['localization']['IoU50']))} | "
              f"{spread(cells(r, lambda res, run: res['localization']['GT-known Loc']))} | " + " | ".join(calib) + " | "
              f"{spread(cells(r, lambda res, run: res['instances']['F1'] * 100))} |")
    centre = [next(iter(run.values()))["centre"]["MaxBoxAccV2"] for run in runs if run]
    print(f"| centre baseline | a centred Gaussian | {len(centre)} | - | {spread(centre)} | 0.0 | - | - | - | " + " | ".join("-" for _ in ks) + " | - |")


def table(dataset: str, args) -> dict:
    """Train what the rows need, score them (cached in OUT/results.json), print the table and
    return the results (row -> cached figures)."""
    ks = per_class(args)
    args.out = args.out or Path(f"runs/whole-{dataset}")
    root = args.root or Path("../shared/datasets") / dataset
    if dataset == "aquarium":
        labels, annotations = aquarium_labels(root, args.out)
        cfg = {"size": args.image_size or 320, "monitor": "val_loss", "crop": (0.5, 1.0), "split": "test"}
    elif dataset == "bccd":
        labels, annotations = write_bccd_labels(root, args.out), root / "BCCD" / "Annotations"
        cfg = {"size": args.image_size or 256, "monitor": "val_auroc", "crop": (0.6, 1.0), "split": "test"}
    else:
        from backbones import synthetic_data

        labels, annotations = synthetic_data(args.out, 600, args.seed)[:2]
        labels = labels / "labels.csv"
        cfg = {"size": args.image_size or 160, "monitor": "val_loss", "crop": None, "split": "val"}  # the demo: fine_tune's crops
    gt = read_annotations(annotations)
    cache = args.out / "results.json"
    results = json.loads(cache.read_text()) if cache.is_file() else {}
    for row in args.rows.split(","):
        missing = [k for k in ks if str(k) not in calibrated(results.get(row, {}))]
        if row in results and not missing:
            continue
        model, method, label, options = prepare(row, labels, gt, args, cfg, results.get(row, {}).get("chosen"))
        if row not in results:
            t0 = time.perf_counter()
            rep = evaluate_model(model, labels, gt, method=method, maps=options, split=cfg["split"])  # the customary threshold: 0.2, 0.5 for refined maps.to_dict()
            per_image = (time.perf_counter() - t0) / rep["images"]
            seconds = args.out / ROWS[row][0] / "train_seconds.txt"
            results[row] = {"model": ROWS[row][0], "method": label, "options": ROWS[row][2], "classification": rep["classification"],
                            "localization": rep["localization"], "centre": rep["centre_baseline"], "images": rep["images"],
                            "samples": rep["localization_samples"], "seconds_per_image": per_image,
                            "instances": rep.get("instances"),
                            "train_seconds": float(seconds.read_text()) if seconds.is_file() else None}
            if "choose" in ROWS[row][2]:
                results[row]["chosen"] = model.config.maps.to_dict()
            print(f"{row}: MaxBoxAccV2 {rep['localization']['MaxBoxAccV2']:.1f}", flush=True)
        for k in missing:  # GT-known Loc at the threshold calibrated on K annotated train images per class
            try:
                cal = calibrate(model, labels, gt, per_class=k, methods=(method,), maps=options, seed=args.seed)
            except WeaklocError as e:  # no threshold localizes any of the K images' boxes: the cell says so, the other rows still run
                print(f"{row}, K = {k}: {e}", flush=True)
                results[row].setdefault("calibrated", {})[str(k)] = {"tau": None, "gt_known": None, "error": str(e)}
                continue
            rep_k = evaluate_model(model, labels, gt, method=method, maps=options, split=cfg["split"], gt_known_tau=cal.threshold)
            results[row].setdefault("calibrated", {})[str(k)] = {"tau": cal.threshold, "gt_known": rep_k.localization.gt_known_loc}
        cache.write_text(json.dumps(results, indent=2))
    device = machine_name()
    rows = [r for r in args.rows.split(",") if r in results]
    first = results[rows[0]]
    plain = results.get("cam", {}).get("localization", {}).get("MaxBoxAccV2")
    centre = first["centre"]["MaxBoxAccV2"]
    print(f"\n{dataset}, {cfg['split']} split ({first['images']} images, {first['samples']} scored image-class pairs); "
          f"{cfg['size']} px, {args.epochs} epochs per model; {device}")
    print("| row | adds | model | map | acc / mAP | MaxBoxAccV2 | vs centre | vs plain CAM | IoU30/50/70 | GT-known (K=0) | "
          + " | ".join(f"GT-known @K={k} (tau)" for k in ks) + " | instance F1 (K=0) | s / image |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|" + "---:|" * (len(ks) + 2))
    for r in rows:
        res = results[r]
        loc, c = res["localization"], res["classification"]
        cls = f"{c['acc'] * 100:.1f}" + (f" / {c['map'] * 100:.1f}" if "map" in c else f" / AUROC {c['auroc'] * 100:.1f}" if "auroc" in c else "")
        vs_cam = f"{loc['MaxBoxAccV2'] - plain:+.1f}" if plain is not None else "-"
        cal = calibrated(res)
        cols = " | ".join(f"{cal[str(k)]['gt_known']:.1f} ({cal[str(k)]['tau']:.2f})" if cal.get(str(k), {}).get("tau") is not None
                          else "no threshold" if str(k) in cal else "-" for k in ks)
        print(f"| {r} | {ROWS[r][3]} | {res['model']} | {res['method']} | {cls} | {loc['MaxBoxAccV2']:.1f} | {loc['MaxBoxAccV2'] - centre:+.1f} | "
              f"{vs_cam} | {loc['IoU30']:.1f}/{loc['IoU50']:.1f}/{loc['IoU70']:.1f} | {loc['GT-known Loc']:.1f} | {cols} | "
              f"{fmt(res.get('instances'), lambda v: v['F1'] * 100)} | {fmt(res.get('seconds_per_image'), lambda v: v, 2)} |")
    cb = first["centre"]
    print(f"| centre baseline | a centred Gaussian | - | - | - | {centre:.1f} | 0.0 | - | {cb['IoU30']:.1f}/{cb['IoU50']:.1f}/{cb['IoU70']:.1f} | "
          f"{cb.get('GT-known Loc', float('nan')):.1f} | " + " | ".join("-" for _ in ks) + " | - | - |")
    print("(instance F1: every region at the K = 0 threshold one box, matched one to one at IoU 0.5, mean over classes; "
          "s / image: evaluation time of the row's maps on this machine, older cached rows have none)")
    return results


def fmt(value, get, digits: int = 1) -> str:
    """A cell of a cached value that older caches may lack."""
    return "-" if value is None else f"{get(value):.{digits}f}"


if __name__ == "__main__":
    main()
