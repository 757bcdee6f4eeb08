"""The ``weakloc`` command line: synth, train, localize, explain, evaluate, explain-eval, methods, demo."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from weakloc.checks import check_output_file, check_output_folder
from weakloc.errors import WeaklocError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Where is it, and how many? Weakly-supervised localization from image-level labels.")
console = Console(width=None if sys.stdout.isatty() else 140)  # logs keep whole table headers


@app.callback()
def _options(
    max_pixels: Optional[int] = typer.Option(
        None, "--max-pixels", help="Refuse images with more pixels than this, read from the header before decoding "
        "(default 89,478,485 or $WEAKLOC_MAX_PIXELS; 0: no limit)."),
):
    """Where is it, and how many? Weakly-supervised localization from image-level labels."""
    if max_pixels is not None:
        from weakloc.checks import check_int
        from weakloc.data.images import set_max_pixels

        set_max_pixels(check_int("--max-pixels", max_pixels, 0) or None)


def _quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
                 "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*treespec.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)


@contextmanager
def progress_bar(description: str):
    """A rich progress bar; yields a ``(done, total)`` callback."""
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, transient=False) as prog:
        task = prog.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            prog.update(task, completed=done, total=total)

        yield update


def _parse_gt_class(pairs: list[str] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    out = {}
    for p in pairs:
        if "=" not in p:
            raise WeaklocError(f"--gt-class takes ANNOTATION_CLASS=MODEL_CLASS, got {p!r}")
        g, m = p.split("=", 1)
        out[g.strip()] = m.strip()
    return out


def print_report(report: dict, title: str = "Evaluation") -> None:
    """Print classification and localization tables of an evaluation report."""
    from weakloc.evaluate.run import summary_rows

    cls = report["classification"]
    console.print(f"[bold]{title}[/]: split {report['split']}, {report['images']} image(s), "
                  f"{report['localization_samples']} localization sample(s), threshold step {report['localization']['step']}")
    console.print("classification: " + ", ".join(f"{k} {v * 100:.1f}" for k, v in cls.items()))
    rows = summary_rows(report)
    cols = [c for c in ["map", "MaxBoxAccV2", "IoU30", "IoU50", "IoU70", "MaxBoxAcc", "GT-known Loc", "Top-1 Loc", "PxAP"] if any(c in r for r in rows)]
    table = Table(title="Localization (WSOL protocol, %)")
    for c in cols:
        table.add_column(c, justify="left" if c == "map" else "right")
    for r in rows:
        table.add_row(*[f"{r[c]:.1f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols])
    console.print(table)
    loc = report["localization"]
    console.print(f"best thresholds: IoU30 {loc['IoU30_tau']:.2f}, IoU50 {loc['IoU50_tau']:.2f}, IoU70 {loc['IoU70_tau']:.2f}; "
                  f"GT-known Loc at {loc['GT-known_tau']:.2f}")


def print_counting(rep: dict) -> None:
    """Counting metrics beside the mean-count baseline, and instance precision/recall/F1."""
    table = Table("", "MAE", "RMSE", "mRMSE", "mRMSE-nz", "m-relRMSE", "m-relRMSE-nz",
                  title=f"Counting: split {rep['split']}, {rep['images']} image(s), test-time views: {rep.get('tta', 'none')}")
    rows = (("model (whole counts, ILC)", rep["counting"]), ("model (raw counts)", rep["counting_raw"]),
            ("mean-count baseline", rep["baseline"]), ("rounded mean-count baseline", rep["baseline_rounded"]))
    for name, m in rows:
        table.add_row(name, *[f"{m[k]:.3f}" for k in ("MAE", "RMSE", "mRMSE", "mRMSE-nz", "m-relRMSE", "m-relRMSE-nz")])
    console.print(table)
    per = Table("class", "MAE", "baseline MAE", "point P/R/F1", "box@0.5 P/R/F1", title="Per class")
    for c, m in rep["counting"]["per_class"].items():
        pts = rep["points"]["per_class"][c] if rep["points"] else None
        bxs = rep["boxes"]["per_class"][c] if rep["boxes"] else None
        fmt = lambda d: f"{d['precision']:.2f}/{d['recall']:.2f}/{d['F1']:.2f}" if d else "-"  # noqa: E731
        per.add_row(c, f"{m['MAE']:.3f}", f"{rep['baseline']['per_class'][c]['MAE']:.3f}", fmt(pts), fmt(bxs))
    console.print(per)


def _print_left_out(report: dict, out: Path | None) -> None:
    """Images an evaluation could not score, by name: those without annotations and those that could
    not be read (the full lists are in the ``-o`` report), and boxes of classes the model does not score."""
    where = f"; all listed in {out}" if out else "; write the report with -o to list them all"
    unannotated = report.get("unannotated_images") or []
    if unannotated:
        shown = ", ".join(_printable(str(p)) for p in unannotated[:5])
        console.print(f"[yellow]{len(unannotated)} image(s) have no annotation and were not scored for localization: "
                      f"{shown}{', ...' if len(unannotated) > 5 else ''}{where}[/]", highlight=False)
    skipped = report.get("skipped_images") or []
    if skipped:
        shown = "; ".join(f"{_printable(str(s['file']))}: {_printable(str(s['reason']))}" for s in skipped[:5])
        console.print(f"[yellow]{len(skipped)} image(s) could not be read and were skipped: {shown}{'; ...' if len(skipped) > 5 else ''}"
                      f"{where}[/]", highlight=False)
    unscored = report.get("unscored_boxes") or {}
    if unscored:
        console.print("[yellow]boxes of classes this model does not localize were not scored: "
                      + ", ".join(f"{_printable(str(c))} {n}" for c, n in unscored.items()) + "[/]", highlight=False)


def _names(text: str | None) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [v.strip() for v in (text or "").split(",") if v.strip()]


def _int_list(text: str | None, flag: str) -> list[int]:
    from weakloc.errors import WeaklocError

    try:
        return [int(v) for v in _names(text)]
    except ValueError:
        raise WeaklocError(f"{flag} {text!r}: expected comma-separated integers, e.g. 2,3") from None


def _parse_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def map_options(layer: str | None = None, fusion: str = "mean", tta: bool = False, eigen_smooth: bool = False,
                dtype: str | None = None, option: list[str] | None = None) -> dict:
    """CLI map settings as keyword arguments of :func:`weakloc.explain.explain`."""
    import torch

    from weakloc.errors import WeaklocError

    opts: dict = {"fusion": fusion, "tta": tta, "eigen_smooth": eigen_smooth}
    if layer:
        opts["layer"] = layer
    if dtype:
        dtypes = {"fp32": None, "float32": None, "fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
        if dtype not in dtypes:
            raise WeaklocError(f"--dtype {dtype!r}: use fp32, fp16 or bf16")
        opts["dtype"] = dtypes[dtype]
    for item in option or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise WeaklocError(f"--option {item!r}: expected KEY=VALUE, e.g. num_samples=8")
        opts[key.strip().replace("-", "_")] = _parse_value(value.strip())
    return opts


LAYER_HELP = "Target layer(s), comma-separated for fusion (default: the last feature map, chosen per architecture)."
FUSION_HELP = "How several layers' maps combine: mean | max | product."
TTA_HELP = "Test-time augmentation smoothing (flips x scales 0.9/1/1.1)."
EIGEN_HELP = "First principal component of the weighted activations instead of their sum."
DTYPE_HELP = "fp32 | fp16 | bf16 (autocast for the model; maps stay fp32)."
OPTION_HELP = ("Method option KEY=VALUE (repeatable), e.g. num_samples=8, std=0.3, chunk=128, alpha=1; "
               "normalization=minmax|max|pas:0.9|ivr:0.4 chooses the map normalisation.")
LayerOpt = Annotated[Optional[str], typer.Option(help=LAYER_HELP)]
FusionOpt = Annotated[str, typer.Option(help=FUSION_HELP)]
TtaOpt = Annotated[bool, typer.Option(help=TTA_HELP)]
EigenOpt = Annotated[bool, typer.Option(help=EIGEN_HELP)]
DtypeOpt = Annotated[Optional[str], typer.Option(help=DTYPE_HELP)]
OptionOpt = Annotated[Optional[list[str]], typer.Option(help=OPTION_HELP)]
InputSizeOpt = Annotated[Optional[int], typer.Option(
    help="Run the model on inputs of this size (test-time resolution; default: the calibrated one, else the training size).")]
CountTtaOpt = Annotated[Optional[str], typer.Option(
    help="Counting models: test-time views averaged, none | flip | dihedral (default: the model's stored choice).")]


def _load_at_size(model: Path, device: str | None, input_size: int | None):
    """The model, set to run at ``input_size`` (else the size ``calibrate`` stored, else its training size)."""
    from weakloc.models import load_model

    net = load_model(model, _device(device))
    if input_size:
        net.config.localization["input_size"] = int(input_size)
    return net


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Folder to write the dataset to."),
    n: int = typer.Option(1000, "--n", help="Number of images."),
    size: int = typer.Option(128, help="Image side in pixels."),
    mode: str = typer.Option("single", help="single | binary | multi"),
    classes: str = typer.Option("triangle,square,star", help="Comma-separated shape classes (triangle, square, star, cross)."),
    max_instances: int = typer.Option(1, help="Most instances of one class per image."),
    target: str = typer.Option("star", help="The class asked about in binary mode."),
    val_fraction: float = typer.Option(0.2, help="Share of images in the val split."),
    test_fraction: float = typer.Option(0.0, help="Share of images in the test split."),
    seed: int = typer.Option(0, help="Random seed (output is deterministic for a seed)."),
):
    """Write a synthetic dataset with exact boxes, masks and points (labels.csv, counts.csv, annotations.json)."""
    from weakloc.data.synthetic import SyntheticConfig, write_synthetic

    cfg = SyntheticConfig(n_images=n, size=size, mode=mode, classes=tuple(_names(classes)),
                          max_instances=max_instances, target=target, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    with progress_bar("synthesising") as update:
        write_synthetic(out, cfg, progress=update)
    console.print(f"wrote {n} images to {out} (labels.csv, counts.csv, annotations.json)")


@app.command()
def train(
    data: Path = typer.Argument(..., help="labels CSV, folder with labels.csv, or folder-per-class tree."),
    out: Path = typer.Option(Path("runs/weakloc"), "--out", "-o", help="Output folder (model/ holds the best checkpoint)."),
    backbone: str = typer.Option("tf_efficientnet_lite0", help="Any timm model name."),
    pretrained: str = typer.Option("imagenet", help="imagenet | none (random init)."),
    weights: Optional[Path] = typer.Option(None, help="Backbone weights file (safetensors, or tensors-only .pth)."),
    val: Optional[Path] = typer.Option(None, help="Separate validation labels (default: the data's split, or a seeded split)."),
    image_size: int = typer.Option(224, help="Square input size."),
    output_stride: Optional[int] = typer.Option(None, help="timm output_stride (16 or 8 give denser maps)."),
    epochs: int = typer.Option(5),
    freeze_epochs: int = typer.Option(1, help="Epochs with the backbone frozen first."),
    batch_size: int = typer.Option(32),
    lr: float = typer.Option(2e-3, help="Peak learning rate of the head."),
    schedule: str = typer.Option("onecycle", help="onecycle | cosine"),
    val_fraction: float = typer.Option(0.2),
    crop_scale: Optional[tuple[float, float]] = typer.Option(None, help="Random resized crop area range (default 0.35 1.0; 1 1 with counts; raise the minimum for small objects)."),
    dihedral: bool = typer.Option(False, help="Also flip vertically and rotate by right angles (top-down images: microscopy, aerial)."),
    seed: int = typer.Option(0),
    precision: Optional[str] = typer.Option(None, help="Lightning precision (default: 16-mixed on GPU, 32 on CPU)."),
    accelerator: str = typer.Option("auto"),
    devices: str = typer.Option("auto"),
    workers: Optional[int] = typer.Option(None, help="DataLoader workers."),
    resume: bool = typer.Option(False, help="Continue from the newest complete checkpoint in OUT/checkpoints."),
    head: str = typer.Option("cam", help="cam (GAP + linear as a 1x1 classifier) | attention (trainable attention) | tap (thresholded average pooling)."),
    attention_stages: str = typer.Option("-3,-2", help="Stages (feature_info indices) the attention head attends."),
    attention_norm: str = typer.Option("softmax", help="softmax | sigmoid attention."),
    cbam: Optional[str] = typer.Option(None, help="Insert CBAM after these stages, e.g. 2,3."),
    adl: Optional[str] = typer.Option(None, help="Insert attention-based dropout (ADL) after these stages, e.g. -2,-1."),
    tap_threshold: float = typer.Option(0.1, help="TAP head: fraction of each channel's maximum."),
    loss: str = typer.Option("ce", help="ce | focal"),
    focal_gamma: float = typer.Option(2.0),
    balanced: bool = typer.Option(False, help="Class-balanced sampling (rare positives)."),
    counts: bool = typer.Option(False, help="DATA holds per-class counts (a counts CSV path,<class>,..., or a folder with counts.csv)."),
    counts_from: Optional[Path] = typer.Option(None, help="Count the objects of these COCO/VOC annotations for DATA's images."),
    counting: Optional[str] = typer.Option(None, help="Counting head: density (default with counts) | count | both."),
    count_loss: str = typer.Option("poisson", help="poisson | huber"),
    count_weight: float = typer.Option(1.0),
    density_l1: float = typer.Option(0.0, help="Weight of the density maps' L1 sparsity."),
    density_tv: float = typer.Option(0.0, help="Weight of the density maps' total variation."),
    density_gather: float = typer.Option(0.0, help="Weight of the density maps' L1/2 sparsity: prefers counts gathered in peaks to counts spread thinly."),
    crop_consistency: float = typer.Option(0.0, help="Weight of the crop-consistency loss: a random crop's count must match the whole image's density on its cells."),
    ema_decay: float = typer.Option(0.0, help="Keep a moving average of the weights with this decay per step (0: off); the average is validated and kept."),
    hide_and_seek: float = typer.Option(0.0, help="Hide-and-Seek: probability of hiding each of 4x4 patches (0: off)."),
    cutmix: float = typer.Option(0.0, help="CutMix Beta alpha (0: off)."),
    align: float = typer.Option(0.0, help="Weight of the feature-class-weight alignment loss (Kim et al. 2022; 0: off)."),
    consistency: float = typer.Option(0.0, help="Weight of the attentive-dropout consistency loss (0: off)."),
    teacher: Optional[Path] = typer.Option(None, help="Second stage: learn a localizer from this first-stage model's maps (PSOL)."),
    teacher_method: Optional[str] = typer.Option(None, help="The teacher's map method (default: its calibrated one, else cam)."),
    teacher_threshold: Optional[float] = typer.Option(None, help="Pseudo-mask threshold (default: the teacher's calibrated one, else 0.2)."),
    density_stage: str = typer.Option("-3", help="Stage the density head reads (feature_info index), or 'last' for the last feature map."),
    density_hidden: int = typer.Option(64, help="Width of the density head's 3x3 convolution (0: none)."),
    density_context: bool = typer.Option(True, help="The density head also reads the last feature map (what each object is)."),
    test_scale: float = typer.Option(2.0, help="Maps and boxes are made on inputs this many times the training size (1: same)."),
    positive: Optional[str] = typer.Option(None, help="With two classes: the 'yes' class, making a yes/no task (default: yes/no only "
                                           "when the other class is a 'no' word such as no, negative, normal, absent)."),
):
    """Fine-tune a pretrained backbone on image-level labels (fast.ai style: frozen warm-up, then all layers)."""
    import inspect

    from weakloc.data.labels import load_labels
    from weakloc.train import fine_tune
    from weakloc.train.fit import check_train_options

    _quiet_lightning()
    options = dict(positive=positive, backbone=backbone, pretrained=str(weights) if weights else pretrained, val_data=val,
                   image_size=image_size, output_stride=output_stride, epochs=epochs, freeze_epochs=freeze_epochs,
                   batch_size=batch_size, lr=lr, schedule=schedule, val_fraction=val_fraction, crop_scale=crop_scale, dihedral=dihedral, seed=seed, precision=precision,
                   accelerator=accelerator, devices=int(devices) if devices.isdigit() else devices, num_workers=workers, resume=resume,
                   head=head, attention_stages=_int_list(attention_stages, "--attention-stages"), attention_norm=attention_norm,
                   cbam_stages=_int_list(cbam, "--cbam"), adl_stages=_int_list(adl, "--adl"), tap_threshold=tap_threshold, loss=loss, focal_gamma=focal_gamma,
                   balanced=balanced, counting=counting, count_loss=count_loss, count_weight=count_weight,
                   density_l1=density_l1, density_tv=density_tv, density_gather=density_gather, crop_consistency=crop_consistency, ema_decay=ema_decay, hide_prob=hide_and_seek, cutmix_alpha=cutmix,
                   align_weight=align, consistency_weight=consistency, teacher=teacher, teacher_method=teacher_method,
                   teacher_threshold=teacher_threshold, density_hidden=density_hidden, test_scale=test_scale,
                   density_context=density_context,
                   density_stage=None if density_stage == "last" else _int_list(density_stage, "--density-stage")[0])
    bound = inspect.signature(fine_tune).bind(data, out, **options)
    bound.apply_defaults()
    check_train_options(dict(bound.arguments))  # before the labels (and any annotations) are read
    check_output_folder("--out", out)
    if counts or counts_from:
        from weakloc.data.counts import load_count_labels

        data = load_count_labels(data, annotations=counts_from)
    else:
        data = load_labels(data, positive=positive)
        console.print(f"task: {_printable(data.task_description)}", highlight=False)
    result = fine_tune(data, out, **options)
    m = result.metrics
    console.print(f"best epoch {m['best_epoch']}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()
                                                            if k.startswith("val_") and k != "val_images"))
    if len(result.skipped):
        from weakloc.train.fit import SKIPPED_FILE

        console.print(f"[yellow]{_printable(result.skipped.summary(out / SKIPPED_FILE))}[/]", highlight=False)
    console.print(f"model saved to {result.model_dir}")


@app.command()
def localize(
    model: Path = typer.Argument(..., help="Model folder (model.safetensors + config.json)."),
    images: list[Path] = typer.Argument(..., help="Image files and/or folders."),
    out: Path = typer.Option(Path("weakloc-localize"), "--out", "-o"),
    method: Optional[str] = typer.Option(None, help="Heatmap method (see `weakloc methods`; default: the calibrated one, else cam)."),
    target: Optional[str] = typer.Option(None, help="predicted | all | topK | CLASS (default: predicted / positive / present classes)."),
    threshold: str = typer.Option("auto", help="auto | NUMBER | otsu | percentile:Q | calibrated"),
    keep: str = typer.Option("all", help="all regions, or the largest per map."),
    layer: LayerOpt = None,
    fusion: FusionOpt = "mean",
    tta: TtaOpt = False,
    eigen_smooth: EigenOpt = False,
    dtype: DtypeOpt = None,
    option: OptionOpt = None,
    input_size: InputSizeOpt = None,
    count_tta: CountTtaOpt = None,
    batch_size: int = typer.Option(16),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
):
    """Heatmaps, boxes and overlays for images: writes overlays/, detections.json (COCO) and index.html."""
    from weakloc.checks import check_choice
    from weakloc.localize.run import localize_images
    from weakloc.localize.threshold import parse_threshold

    _check_run_options(batch_size, input_size, count_tta)
    check_output_folder("--out", out)
    check_choice("--keep", keep, ("all", "largest"))
    if method:
        from weakloc.explain.registry import get_method

        get_method(method)
    if threshold != "auto":
        parse_threshold(threshold)
    opts = map_options(layer, fusion, tta, eigen_smooth, dtype, option)
    net = _load_at_size(model, device, input_size)
    with progress_bar("localizing") as update:
        res = localize_images(net, images, out, method=method, target=target, threshold=threshold, keep=keep,
                              batch_size=batch_size, progress=update,
                              explain_options=opts, count_tta=count_tta)
    console.print(f"{len(res['images'])} image(s), {len(res['annotations'])} box(es) -> {out / 'index.html'}")
    for s in res["skipped"]:
        console.print(f"[yellow]skipped {s['reason']}[/]")


@app.command("explain")
def explain_cmd(
    model: Path = typer.Argument(..., help="Model folder."),
    images: list[Path] = typer.Argument(..., help="Image files and/or folders."),
    out: Path = typer.Option(Path("weakloc-explain"), "--out", "-o"),
    method: str = typer.Option("gradcam", help="Heatmap method (see `weakloc methods`)."),
    target: str = typer.Option("predicted", help="predicted | all | topK | CLASS"),
    layer: LayerOpt = None,
    fusion: FusionOpt = "mean",
    tta: TtaOpt = False,
    eigen_smooth: EigenOpt = False,
    dtype: DtypeOpt = None,
    option: OptionOpt = None,
    batch_size: int = typer.Option(16),
    device: Optional[str] = typer.Option(None),
):
    """Heatmaps of any method: overlays/, maps.safetensors (raw and normalised maps), maps.json, index.html."""
    from weakloc.explain.registry import get_method
    from weakloc.explain.run import explain_images
    from weakloc.models import load_model

    _check_run_options(batch_size)
    check_output_folder("--out", out)
    get_method(method)
    opts = map_options(None, fusion, tta, eigen_smooth, dtype, option)
    net = load_model(model, _device(device))
    with progress_bar(f"explaining ({method})") as update:
        res = explain_images(net, images, out, method=method, target=target, layer=layer, batch_size=batch_size, progress=update,
                             explain_options=opts)
    console.print(f"{len(res['images'])} image(s) -> {out / 'index.html'}, {out / 'maps.safetensors'}")
    for s in res["skipped"]:
        console.print(f"[yellow]skipped {s['reason']}[/]")


@app.command()
def evaluate(
    model: Path = typer.Argument(..., help="Model folder."),
    data: Path = typer.Argument(..., help="Labels (CSV, folder with labels.csv, or class folders)."),
    annotations: Path = typer.Option(..., "--annotations", "-a", help="COCO JSON or Pascal VOC XML folder."),
    method: str = typer.Option("cam"),
    split: str = typer.Option("auto", help="auto (test, else val, else all) | train | val | test | all"),
    step: float = typer.Option(0.01, help="Threshold step of the sweep (cam_curve_interval)."),
    gt_known_tau: Optional[float] = typer.Option(None, help="Fixed threshold of GT-known / Top-1 Loc."),
    gt_class: Optional[list[str]] = typer.Option(None, help="ANNOTATION_CLASS=MODEL_CLASS (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the report as JSON here."),
    calibrate: bool = typer.Option(False, help="Store the best IoU-50 threshold in the model for `localize`."),
    layer: LayerOpt = None,
    fusion: FusionOpt = "mean",
    tta: TtaOpt = False,
    eigen_smooth: EigenOpt = False,
    dtype: DtypeOpt = None,
    option: OptionOpt = None,
    input_size: InputSizeOpt = None,
    count_tta: CountTtaOpt = None,
    batch_size: int = typer.Option(32),
    device: Optional[str] = typer.Option(None),
):
    """Classification and WSOL localization metrics (MaxBoxAcc, MaxBoxAccV2, GT-known/Top-1 Loc, PxAP) with the centre baseline."""
    from weakloc.checks import check_float
    from weakloc.evaluate.run import evaluate_model
    from weakloc.explain.registry import get_method

    _check_run_options(batch_size, input_size, count_tta, split)
    if out:
        check_output_file("--out", out)
    from weakloc.evaluate.wsol import MIN_STEP

    check_float("--step", step, MIN_STEP, 0.5)
    check_float("--gt-known-tau", gt_known_tau, 0.0, 1.0, allow_none=True)
    get_method(method)
    opts = map_options(layer, fusion, tta, eigen_smooth, dtype, option)
    net = _load_at_size(model, device, input_size)
    if calibrate:
        from weakloc.models.checkpoint import ensure_writable

        ensure_writable(model)
    counting = None
    if net.counting_head is not None:
        from weakloc.data.counts import count_labels_or_annotated
        from weakloc.evaluate.counting import evaluate_counts

        data = count_labels_or_annotated(data, annotations, classes=net.config.classes)
        with progress_bar("counting") as update:
            counting = evaluate_counts(net, data, annotations, split=split, batch_size=batch_size, tta=count_tta, progress=update)
    with progress_bar("evaluating") as update:
        report = evaluate_model(net, data, annotations, method=method, split=split, step=step, gt_known_tau=gt_known_tau,
                                gt_class=_parse_gt_class(gt_class), batch_size=batch_size, progress=update,
                                explain_options=opts)
    print_report(report)
    if counting is not None:
        print_counting(counting)
        report["counting"] = counting
    _print_left_out(report, out)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        console.print(f"report written to {out}")
    if calibrate:
        from weakloc.evaluate.calibrate import calibrated_threshold

        tau = calibrated_threshold(report)
        net.config.localization = {**net.config.localization, "threshold": tau, "method": method,
                                   "calibrated_on": report["localization_samples"]}
        from weakloc.models import save_model

        save_model(net.cpu(), model)
        console.print(f"calibrated threshold {tau:.2f} stored in {model}")


@app.command()
def calibrate(
    model: Path = typer.Argument(..., help="Model folder (updated in place)."),
    data: Path = typer.Argument(..., help="Labels (CSV, folder with labels.csv, or class folders)."),
    annotations: Path = typer.Option(..., "--annotations", "-a", help="COCO JSON or Pascal VOC XML folder."),
    per_class: int = typer.Option(5, help="Annotated images per class to calibrate on."),
    methods: str = typer.Option("cam", help="Candidate map methods, comma-separated; the best is stored."),
    split: str = typer.Option("train", help="Split the few annotated images come from."),
    seed: int = typer.Option(0),
    gt_class: Optional[list[str]] = typer.Option(None, help="ANNOTATION_CLASS=MODEL_CLASS (repeatable)."),
    input_sizes: Optional[str] = typer.Option(None, help="Test-time input sizes to choose from as well, e.g. 256,512,768."),
    normalizations: Optional[str] = typer.Option(None, help="Map normalisations to choose from as well, e.g. minmax,pas."),
    device: Optional[str] = typer.Option(None),
):
    """Choose the box threshold (and map method, input size, normalisation) from K annotated images per class;
    `localize` then uses them. For a counting model: each class's instance box size."""
    from weakloc.evaluate.calibrate import calibrate as run_calibration
    from weakloc.evaluate.calibrate import calibrate_box_sizes

    from weakloc.checks import check_choice, check_int
    from weakloc.explain.registry import get_method
    from weakloc.models import load_model, save_model
    from weakloc.models.checkpoint import ensure_writable

    check_int("--per-class", per_class, 1, 10_000)
    check_choice("--split", split, ("train", "val", "test", "all"))
    if not _names(methods):
        raise WeaklocError("--methods: give at least one method name (see `weakloc methods`)")
    for m in _names(methods):
        get_method(m)
    for size in _int_list(input_sizes, "--input-sizes"):
        check_int("--input-sizes", size, 16, 8192)
    net = load_model(model, _device(device))
    ensure_writable(model)  # a read-only model folder fails now, not after the calibration's work
    if net.counting_head is not None:
        if methods != "cam" or input_sizes or normalizations:
            raise WeaklocError("a counting model calibrates its instance box sizes only: --methods, --input-sizes and "
                               "--normalizations choose a classifier's WSOL maps")
        res = calibrate_box_sizes(net, data, annotations, per_class=per_class, split=split, seed=seed, gt_class=_parse_gt_class(gt_class))
        save_model(net.cpu(), model)
        console.print(f"instance box sizes (width x height, fraction of the image) from {res['images']} image(s): "
                      + ", ".join(f"{c} {w:.3f} x {h:.3f} ({res['boxes'][c]} boxes)" for c, (w, h) in res["box_sizes"].items())
                      + f"; stored in {model}")
        return
    res = run_calibration(net, data, annotations, per_class=per_class, methods=tuple(_names(methods)), split=split, seed=seed,
                          gt_class=_parse_gt_class(gt_class), input_sizes=tuple(_int_list(input_sizes, "--input-sizes")) or None,
                          normalizations=tuple(_names(normalizations)) or None)
    save_model(net.cpu(), model)
    console.print(f"calibrated on {res['images']} image(s): method {res['method']}, threshold {res['threshold']:.2f}, "
                  f"input size {res['input_size']}" + (f", normalisation {res['normalization']}" if res["normalization"] else "") + " "
                  f"(MaxBoxAccV2 " + ", ".join(f"{m} {v:.1f}" for m, v in res["per_method"].items()) + f") stored in {model}")


@app.command("explain-eval")
def explain_eval_cmd(
    model: Path = typer.Argument(..., help="Model folder."),
    data: Path = typer.Argument(..., help="Labels (CSV, folder with labels.csv, or class folders): its images are used."),
    methods: str = typer.Option("cam,gradcam,gradcam++,layercam,eigencam,random", help="Comma-separated method names."),
    split: str = typer.Option("auto", help="auto (test, else val, else all) | train | val | test | all"),
    limit: int = typer.Option(64, help="At most this many images."),
    target: str = typer.Option("predicted", help="predicted | all | topK | CLASS"),
    steps: int = typer.Option(50, help="Deletion / insertion steps."),
    baseline: str = typer.Option("blur", help="What removed pixels become: blur | zero | mean | black."),
    layer: LayerOpt = None,
    tta: TtaOpt = False,
    dtype: DtypeOpt = None,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the table as JSON here."),
    batch_size: int = typer.Option(16),
    device: Optional[str] = typer.Option(None),
):
    """Compare heatmap methods: deletion/insertion AUC, Average Drop, Increase in Confidence, ms per image."""
    from weakloc.checks import check_choice, check_int
    from weakloc.evaluate.explain_eval import explain_eval
    from weakloc.explain.registry import get_method
    from weakloc.models import load_model

    _check_run_options(batch_size, split=split)
    if out:
        check_output_file("--out", out)
    check_int("--limit", limit, 1, 1_000_000)
    check_int("--steps", steps, 2, 10_000)
    check_choice("--baseline", baseline, ("blur", "zero", "mean", "black"))
    opts = map_options(layer, "mean", tta, False, dtype, None)
    names = _names(methods)
    if not names:
        raise WeaklocError("--methods: give at least one method name (see `weakloc methods`)")
    for m in names:
        get_method(m)
    net = load_model(model, _device(device))
    with console.status(f"explaining and scoring {len(names)} method(s)"):
        report = explain_eval(net, data, names, split=split, limit=limit, target=target, steps=steps, baseline=baseline,
                              batch_size=batch_size, **opts)
    table = Table("method", "deletion AUC ↓", "insertion AUC ↑", "average drop % ↓", "increase in conf. % ↑", "ms / image",
                  title=f"Explanation quality: {report['images']} {report['split']} image(s), {steps} steps, {baseline} baseline")
    for r in report["rows"]:
        table.add_row(r["method"], f"{r['deletion_auc']:.3f}", f"{r['insertion_auc']:.3f}", f"{r['average_drop_pct']:.1f}",
                      f"{r['increase_in_confidence_pct']:.1f}", f"{r['ms_per_image']:.1f}")
    console.print(table)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        console.print(f"table written to {out}")


@app.command()
def methods():
    """List the heatmap methods."""
    from weakloc.explain import METHODS

    table = Table("name", "gradients", "summary")
    for m in METHODS.values():
        table.add_row(m.name, "yes" if m.uses_gradients else "no", m.summary)
    console.print(table)


@app.command()
def demo(
    out: Path = typer.Option(Path("weakloc-demo"), "--out", "-o"),
    n: int = typer.Option(600, help="Synthetic images."),
    epochs: int = typer.Option(8),
    seed: int = typer.Option(0),
):
    """Offline end to end: synthesise data, fine-tune on image labels only, localize, evaluate, report."""
    from weakloc.checks import check_int
    from weakloc.demo import run_demo

    check_output_folder("--out", out)
    check_int("--n", n, 50, 100_000)
    check_int("--epochs", epochs, 1, 1000)
    _quiet_lightning()
    run_demo(out, n_images=n, epochs=epochs, seed=seed, console=console, progress_bar=progress_bar, print_report=print_report)


def _device(name: str | None):
    import torch

    from weakloc.checks import check_device

    return check_device("--device", name) if name else ("cuda" if torch.cuda.is_available() else "cpu")


SPLITS = ("auto", "train", "val", "test", "all")


def _check_run_options(batch_size: int | None = None, input_size: int | None = None, count_tta: str | None = None,
                       split: str | None = None) -> None:
    """Options several commands share, checked before a model is loaded or an image read."""
    from weakloc.checks import check_choice, check_int

    if batch_size is not None:
        check_int("--batch-size", batch_size, 1, 4096)
    check_int("--input-size", input_size, 16, 8192, allow_none=True)
    check_choice("--count-tta", count_tta, ("none", "flip", "dihedral"), allow_none=True)
    if split is not None:
        check_choice("--split", split, SPLITS)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one red line and exit code 2; anything unexpected becomes one
    line naming the exception, a hint to rerun with ``--debug`` for the traceback, and exit code 1."""
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("WEAKLOC_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    if not debug:  # a warning is one line for users, not Python's two-line form with a source path
        warnings.showwarning = _show_warning
    try:
        app(args, prog_name="weakloc")  # click's standalone mode prints usage errors itself and exits 2
    except WeaklocError as e:
        if debug:
            raise
        console.print(f"[bold red]error:[/] {_printable(str(e))}", soft_wrap=True, highlight=False)
        sys.exit(getattr(e, "exit_code", 2))  # an interrupted training exits 143 (SIGTERM) or 130 (Ctrl+C)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]")
        sys.exit(130)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - the one place an unexpected error becomes one line
        if debug:
            raise
        where = ""
        tb = e.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None:
            where = f" (in {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno})"
        first = _printable(str(e)).splitlines()[0] if str(e).strip() else ""
        console.print(f"[bold red]unexpected error:[/] {type(e).__name__}: {first}{where}; rerun with --debug for the traceback",
                      soft_wrap=True, highlight=False)
        sys.exit(1)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = str(message).strip().replace("\n", " ")
    console.print(f"[yellow]warning:[/] {_printable(text)}", soft_wrap=True, highlight=False)


def _printable(text: str) -> str:
    """``text`` safe for any terminal: undecodable file-name bytes (surrogates) and control
    characters escaped, rich markup brackets escaped."""
    from rich.markup import escape

    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    text = "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)
    return escape(text)


if __name__ == "__main__":
    main()
