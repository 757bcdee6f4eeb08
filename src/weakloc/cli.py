"""The ``weakloc`` command line: synth, train, localize, explain, evaluate, calibrate, explain-eval, report, serve,
methods, demo."""

from __future__ import annotations

import functools
import inspect
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

from weakloc.checks import check_choice, check_int, check_output_file, check_output_folder
from weakloc.errors import OptionError, WeaklocError

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
    inst = report.get("instances")
    if inst:
        tp, fp, fn = (sum(v[k] for v in inst["per_class"].values()) for k in ("tp", "fp", "fn"))
        rule = "each region split at its peaks" if inst.get("keep") == "peaks" else "each region"
        console.print(f"instances ({rule} at {loc['GT-known_tau']:.2f} one box, IoU >= 0.5, one to one): "
                      f"{tp} of {tp + fn} objects found, {fp} false box(es); mean F1 over classes {inst['F1'] * 100:.1f}")


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


def _names(values: str | list[str] | None) -> list[str]:
    """A list option's values, each possibly comma-separated: ``["a, b", "c"]`` -> ``["a", "b", "c"]``."""
    texts = [values] if isinstance(values, str) else (values or [])
    return [v.strip() for text in texts for v in text.split(",") if v.strip()]


def _int_list(values: str | list[str] | None, flag: str) -> list[int]:
    try:
        return [int(v) for v in _names(values)]
    except ValueError:
        raise OptionError(f"{flag} {', '.join(_names(values))!r}: expected whole numbers, e.g. 2,3") from None


def _one_int(text: str, flag: str) -> int:
    values = _int_list(text, flag)
    if len(values) != 1:
        raise OptionError(f"{flag} {text!r}: expected one whole number")
    return values[0]


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


def map_overrides(method: str | None = None, layer: str | None = None, fusion: str | None = None, tta: bool | None = None,
                  eigen_smooth: bool | None = None, dtype: str | None = None, normalization: str | None = None,
                  refine: str | None = None, option: list[str] | None = None, test_size: int | None = None) -> dict:
    """The map options a command was given, as the flat overrides :func:`weakloc.explain.pipeline.map_settings`
    takes: only those given (the rest come from the model's stored settings); ``--option KEY=VALUE``
    pairs become method options."""
    from weakloc.explain.pipeline import AUTOCAST_DTYPES

    given = {"method": method, "layer": layer, "fusion": fusion, "tta": tta, "eigen_smooth": eigen_smooth,
             "normalization": normalization, "refine": refine, "test_size": test_size}
    if dtype is not None:
        if dtype not in AUTOCAST_DTYPES:
            raise OptionError(f"--dtype {dtype!r}: use fp32, fp16 or bf16")
        given["dtype"] = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(dtype, dtype)
    opts = {k: v for k, v in given.items() if v is not None}
    for item in option or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise OptionError(f"--option {item!r}: expected KEY=VALUE, e.g. num_samples=8")
        opts[key.strip().replace("-", "_")] = _parse_value(value.strip())
    return opts


def with_map_options(method: bool = True, network: bool = False):
    """Decorator of a command that draws maps: adds the shared map options (``--method`` unless
    ``method`` is False, ``--layer``, ``--fusion``, ``--tta``, ``--eigen-smooth``, ``--dtype``,
    ``--normalization``, ``--refine``, ``--option``, ``--test-size``) to its parameters, one definition for every
    command, and calls it with ``maps``: the overrides given (:func:`map_overrides`). With
    ``network``, also ``--weights``, ``--classes`` and ``--num-classes`` (a ``timm:NAME`` MODEL),
    passed as ``network``: the keyword arguments of :func:`_load`."""
    names = [*(["method"] if method else []), *MAP_OPTIONS]
    sources = list(NETWORK_OPTION_TYPES) if network else []

    def decorate(command):
        signature = inspect.signature(command, eval_str=True)  # the module postpones annotations; typer needs objects
        kept = [p for p in signature.parameters.values() if p.name not in ("maps", "network")]
        added = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None, annotation={**MAP_OPTION_TYPES, **NETWORK_OPTION_TYPES}[n])
                 for n in sources + names]

        @functools.wraps(command)
        def run(**kwargs):
            given = {n: kwargs.pop(n) for n in names}
            extra = {"network": {n: kwargs.pop(n) for n in sources}} if network else {}
            return command(**kwargs, **extra, maps=map_overrides(**given))

        run.__signature__ = signature.replace(parameters=kept + added)
        return run

    return decorate


def _check_map_options(opts: dict, flag: str | None = None) -> None:
    """The map options' values checked before a model is loaded (method name, fusion, dtype,
    normalisation, test size), each named by its option (or by ``flag``, a list option's name)."""
    from weakloc.config import ModelConfig, resolve_maps, split_overrides
    from weakloc.explain.pipeline import check_map_settings

    settings, _ = split_overrides(opts)
    try:
        check_map_settings(resolve_maps(ModelConfig(classes=["_"]), settings), where="--")
    except OptionError as e:
        if flag is None:
            raise
        raise OptionError(f"{flag}: {str(e).split(': ', 1)[-1]}") from None


METHOD_HELP = "Heatmap method (see `weakloc methods`; default: the model's stored one, else cam)."
LAYER_HELP = "Target layer(s), comma-separated for fusion (default: the model's stored one, else the last feature map)."
FUSION_HELP = "How several layers' maps combine: mean | max | product (default: the model's stored one, else mean)."
TTA_HELP = "Test-time augmentation smoothing of the maps (flips x scales 0.9/1/1.1)."
EIGEN_HELP = "First principal component of the weighted activations instead of their sum."
DTYPE_HELP = "fp32 | fp16 | bf16 (autocast for the model; maps stay fp32)."
NORMALIZATION_HELP = "How maps go to [0, 1]: minmax | max | pas[:Q] | ivr[:Q] (default: the model's stored one, else minmax)."
REFINE_HELP = ("Refine maps with the image before boxes are taken: none | guided[:R[,EPS]] (a guided filter, window radius R "
               "as a fraction of the image side, default 0.1,0.001; default: the model's stored one, else none).")
OPTION_HELP = "Method option KEY=VALUE (repeatable), e.g. num_samples=8, std=0.3, chunk=128, alpha=1, positive_weights=false."
MethodOpt = Annotated[Optional[str], typer.Option(help=METHOD_HELP)]
LayerOpt = Annotated[Optional[str], typer.Option(help=LAYER_HELP)]
FusionOpt = Annotated[Optional[str], typer.Option(help=FUSION_HELP)]
TtaOpt = Annotated[Optional[bool], typer.Option("--tta/--no-tta", help=TTA_HELP, show_default=False)]
EigenOpt = Annotated[Optional[bool], typer.Option("--eigen-smooth/--no-eigen-smooth", help=EIGEN_HELP, show_default=False)]
DtypeOpt = Annotated[Optional[str], typer.Option(help=DTYPE_HELP)]
NormalizationOpt = Annotated[Optional[str], typer.Option(help=NORMALIZATION_HELP)]
RefineOpt = Annotated[Optional[str], typer.Option(help=REFINE_HELP)]
OptionOpt = Annotated[Optional[list[str]], typer.Option(help=OPTION_HELP)]
TestSizeOpt = Annotated[Optional[int], typer.Option(
    help="Run the model on inputs of this size (test-time resolution; default: the model's stored one, else the training size).")]
CountViewsOpt = Annotated[Optional[str], typer.Option(
    help="Counting models: test-time views the counts are averaged over, none | flip | dihedral (default: the model's stored choice).")]
MODEL_HELP = "Model folder, or timm:NAME: any timm classifier (e.g. timm:resnet50; see --weights, --classes)."
WeightsOpt = Annotated[Optional[Path], typer.Option(
    help="With MODEL timm:NAME: the network's weights, safetensors or a tensors-only .pth (torchvision ResNet/VGG names are mapped; "
         "default: the packaged ImageNet weights of tf_efficientnet_lite0/1/2, else timm's download).")]
ClassesOpt = Annotated[Optional[Path], typer.Option(
    help="With MODEL timm:NAME: a text file of class names, one per line, in the classifier's order (default: ImageNet's for 1,000 classes).")]
NumClassesOpt = Annotated[Optional[int], typer.Option(
    help="With MODEL timm:NAME: the classifier's number of classes (checked against --weights and --classes).")]
#: the map options every map-drawing command takes (:func:`with_map_options`), with their types
MAP_OPTION_TYPES = {"method": MethodOpt, "layer": LayerOpt, "fusion": FusionOpt, "tta": TtaOpt, "eigen_smooth": EigenOpt,
                    "dtype": DtypeOpt, "normalization": NormalizationOpt, "refine": RefineOpt, "option": OptionOpt, "test_size": TestSizeOpt}
MAP_OPTIONS = [n for n in MAP_OPTION_TYPES if n != "method"]
#: the options naming a timm network's weights and classes (:func:`with_map_options`), with their types
NETWORK_OPTION_TYPES = {"weights": WeightsOpt, "classes": ClassesOpt, "num_classes": NumClassesOpt}


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Folder to write the dataset to."),
    n: int = typer.Option(1000, "--n", help="Number of images."),
    size: int = typer.Option(128, help="Image side in pixels."),
    mode: str = typer.Option("single", help="single | binary | multi"),
    classes: Optional[list[str]] = typer.Option(None, help="Shape classes: triangle, square, star, cross (default triangle,square,star; "
                                                "comma-separated, or the option repeated)."),
    max_instances: int = typer.Option(1, help="Most instances of one class per image."),
    target: str = typer.Option("star", help="The class asked about in binary mode."),
    val_fraction: float = typer.Option(0.2, help="Share of images in the val split."),
    test_fraction: float = typer.Option(0.0, help="Share of images in the test split."),
    seed: int = typer.Option(0, help="Random seed (output is deterministic for a seed)."),
):
    """Write a synthetic dataset with exact boxes, masks and points (labels.csv, counts.csv, annotations.json)."""
    from weakloc.data.synthetic import SyntheticConfig, write_synthetic

    cfg = SyntheticConfig(n_images=n, size=size, mode=mode, classes=tuple(_names(classes)) if classes is not None else SyntheticConfig.classes,
                          max_instances=max_instances, target=target, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    with progress_bar("synthesising") as update:
        write_synthetic(out, cfg, progress=update)
    console.print(f"wrote {n} images to {out} (labels.csv, counts.csv, annotations.json)")


ListOpt = Optional[list[str]]
LIST_HELP = " (comma-separated, or the option repeated)"


@app.command()
def train(
    data: Path = typer.Argument(..., help="labels CSV, folder with labels.csv, or folder-per-class tree."),
    out: Path = typer.Option(Path("runs/weakloc"), "--out", "-o", help="Output folder (model/ holds the best checkpoint)."),
    backbone: str = typer.Option("tf_efficientnet_lite0", help="Any timm model name."),
    pretrained: str = typer.Option("imagenet", help="imagenet | none (random init) | a backbone weights file (safetensors, or tensors-only .pth)."),
    val: Optional[Path] = typer.Option(None, help="Separate validation labels (default: the data's split, or a seeded split)."),
    input_size: int = typer.Option(224, help="Side of the square training input."),
    output_stride: Optional[int] = typer.Option(None, help="timm output_stride (16 or 8 give denser maps)."),
    drop_rate: float = typer.Option(0.2, help="Channel dropout before the classifier."),
    epochs: int = typer.Option(5),
    freeze_epochs: int = typer.Option(1, help="Epochs with the backbone frozen first."),
    frozen_stages: int = typer.Option(0, help="The stem and this many first backbone stages never train (Detectron2's "
                                      "FREEZE_AT; backpropagation stops above them: faster steps)."),
    batch_size: int = typer.Option(32),
    lr: float = typer.Option(2e-3, help="Peak learning rate of the head."),
    backbone_lr: Optional[tuple[float, float]] = typer.Option(None, help="Multipliers of --lr for the earliest and latest backbone layers (default 0.01 0.3; 0.3 1.0 with counting)."),
    weight_decay: float = typer.Option(0.01, help="AdamW weight decay."),
    schedule: str = typer.Option("onecycle", help="onecycle | cosine"),
    label_smoothing: float = typer.Option(0.0, help="Label smoothing of single-label cross entropy."),
    val_fraction: float = typer.Option(0.2),
    crop_scale: Optional[tuple[float, float]] = typer.Option(None, help="Random resized crop area range (default 0.35 1.0; 1 1 with counts; raise the minimum for small objects)."),
    dihedral: bool = typer.Option(False, help="Also flip vertically and rotate by right angles (top-down images: microscopy, aerial)."),
    seed: int = typer.Option(0),
    precision: Optional[str] = typer.Option(None, help="Lightning precision (default: 16-mixed on GPU, 32 on CPU)."),
    accelerator: str = typer.Option("auto"),
    devices: str = typer.Option("auto", help="Devices per node: auto, a count (several: one training process each; on the CPU "
                                "with --accelerator cpu) or GPU indices 0,1. Under torchrun: its --nproc-per-node."),
    strategy: str = typer.Option("auto", help="auto | ddp (this command started once more per extra device, or torchrun's "
                                 "processes) | ddp_spawn. --batch-size is per process; --lr is used as given."),
    num_nodes: Optional[int] = typer.Option(None, help="Machines training together (default 1, or torchrun's --nnodes)."),
    workers: Optional[int] = typer.Option(None, help="DataLoader workers."),
    monitor: str = typer.Option("val_loss", help="Validation metric that picks the best epoch: val_loss | val_acc | val_auroc | val_prauc | val_map | val_count_mae."),
    limit_batches: Optional[float] = typer.Option(None, help="At most this many batches per epoch (a whole number), or this fraction of them (below 1): smoke tests."),
    resume: bool = typer.Option(False, help="Continue from the newest complete checkpoint in OUT/checkpoints."),
    head: str = typer.Option("cam", help="cam (GAP + linear as a 1x1 classifier) | attention (trainable attention) | tap (thresholded average pooling)."),
    attention_stages: ListOpt = typer.Option(None, help="Stages (feature_info indices) the attention head attends (default -3,-2)" + LIST_HELP + "."),
    attention_norm: str = typer.Option("softmax", help="softmax | sigmoid attention."),
    cbam_stages: ListOpt = typer.Option(None, help="Insert CBAM after these stages, e.g. 2,3" + LIST_HELP + "."),
    adl_stages: ListOpt = typer.Option(None, help="Insert attention-based dropout (ADL) after these stages, e.g. -2,-1" + LIST_HELP + "."),
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
    swa: float = typer.Option(0.0, help="Stochastic weight averaging over this last fraction of the steps (0: off; e.g. 0.25): the LR is held and the weights averaged; the last epoch's average is kept."),
    hide_prob: float = typer.Option(0.0, help="Hide-and-Seek: probability of hiding each of --hide-grid x --hide-grid patches (0: off)."),
    hide_grid: int = typer.Option(4, help="Hide-and-Seek: patches per side."),
    cutmix_alpha: float = typer.Option(0.0, help="CutMix Beta alpha (0: off)."),
    align_weight: float = typer.Option(0.0, help="Weight of the feature-class-weight alignment loss (Kim et al. 2022; 0: off)."),
    consistency_weight: float = typer.Option(0.0, help="Weight of the attentive-dropout consistency loss (0: off)."),
    teacher: Optional[Path] = typer.Option(None, help="Second stage: learn a localizer from this first-stage model's maps (PSOL)."),
    teacher_method: Optional[str] = typer.Option(None, help="The teacher's map method (default: its calibrated one, else cam)."),
    teacher_threshold: Optional[float] = typer.Option(None, help="Pseudo-mask threshold (default: the teacher's calibrated one, else 0.2)."),
    box_backbone: Optional[str] = typer.Option(None, help="With --teacher: the box head gets its own network, this timm backbone "
                                               "(PSOL's separate localizer); the classifier is the teacher's, kept frozen."),
    density_stage: str = typer.Option("-3", help="Stage the density head reads (feature_info index), or 'last' for the last feature map."),
    density_hidden: int = typer.Option(64, help="Width of the density head's 3x3 convolution (0: none)."),
    density_context: bool = typer.Option(True, help="The density head also reads the last feature map (what each object is)."),
    test_scale: float = typer.Option(2.0, help="Maps and boxes are made on inputs this many times the training size (1: same)."),
    refine: Optional[str] = typer.Option(None, help="Map refinement stored with the model: none | guided[:R[,EPS]] "
                                         "(default: guided for a classifier, none for a counting model; see localize --refine)."),
    positive: Optional[str] = typer.Option(None, help="With two classes: the 'yes' class, making a yes/no task (default: yes/no only "
                                           "when the other class is a 'no' word such as no, negative, normal, absent)."),
    interpretation: bool = typer.Option(True, "--interpretation/--no-interpretation", help="After training, write "
                                        "OUT/interpretation.html on the validation images: confusion matrix, top losses with the "
                                        "heatmaps of the predicted and true class, most and least confident correct images per class."),
):
    """Fine-tune a pretrained backbone on image-level labels (fast.ai style: frozen warm-up, then all layers)."""
    from weakloc.config import ModelConfig, TrainConfig
    from weakloc.data.labels import load_labels
    from weakloc.train import fine_tune
    from weakloc.train.fit import check_train_options

    _quiet_lightning()
    model = ModelConfig(
        backbone=backbone, input_size=input_size, output_stride=output_stride, drop_rate=drop_rate, head=head,
        attention_stages=_int_list(attention_stages, "--attention-stages") or [-3, -2], attention_norm=attention_norm,
        cbam_stages=_int_list(cbam_stages, "--cbam-stages"), adl_stages=_int_list(adl_stages, "--adl-stages"),
        tap_threshold=tap_threshold, counting=counting, density_hidden=density_hidden, density_context=density_context,
        density_stage=None if density_stage == "last" else _one_int(density_stage, "--density-stage"), box_backbone=box_backbone)
    settings = TrainConfig(
        pretrained=pretrained, epochs=epochs, freeze_epochs=freeze_epochs, frozen_stages=frozen_stages, batch_size=batch_size, lr=lr, backbone_lr=backbone_lr,
        weight_decay=weight_decay, schedule=schedule, label_smoothing=label_smoothing, val_fraction=val_fraction, seed=seed,
        precision=precision, accelerator=accelerator, devices=int(devices) if devices.isdigit() else devices, workers=workers,
        strategy=strategy, num_nodes=num_nodes,
        crop_scale=crop_scale, dihedral=dihedral, monitor=monitor,
        limit_batches=int(limit_batches) if limit_batches is not None and limit_batches >= 1 and float(limit_batches).is_integer() else limit_batches,
        loss=loss, focal_gamma=focal_gamma, balanced=balanced, count_loss=count_loss, count_weight=count_weight,
        density_l1=density_l1, density_tv=density_tv, density_gather=density_gather, crop_consistency=crop_consistency,
        hide_prob=hide_prob, hide_grid=hide_grid, cutmix_alpha=cutmix_alpha, ema_decay=ema_decay, swa=swa, align_weight=align_weight,
        consistency_weight=consistency_weight, teacher_method=teacher_method, teacher_threshold=teacher_threshold, test_scale=test_scale)
    check_train_options(model, settings, out, teacher=teacher is not None)  # before the labels (and any annotations) are read
    maps = None
    if refine is not None:
        from weakloc.config import MapConfig

        _check_map_options({"refine": refine})
        maps = MapConfig(refine=refine)
    check_output_folder("--out", out)
    if counts or counts_from:
        from weakloc.data.counts import load_count_labels

        data = load_count_labels(data, annotations=counts_from)
    else:
        data = load_labels(data, positive=positive)
        from lightning.fabric.utilities.rank_zero import rank_zero_only  # the rank Lightning's launcher or torchrun gave this process

        if rank_zero_only.rank == 0:
            console.print(f"task: {_printable(data.task_description)}", highlight=False)
    result = fine_tune(data, out, model=model, train=settings, maps=maps, val=val, teacher=teacher, resume=resume, positive=positive)
    if result.rank != 0:  # another process of a distributed run: rank zero reports and writes
        return
    m = result.metrics
    console.print(f"best epoch {m['best_epoch']}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()
                                                            if k.startswith("val_") and k != "val_images"))
    if len(result.skipped):
        from weakloc.train.fit import SKIPPED_FILE

        console.print(f"[yellow]{_printable(result.skipped.summary(out / SKIPPED_FILE))}[/]", highlight=False)
    console.print(f"model saved to {result.model_dir}")
    if interpretation:
        _write_interpretation(result, data, out, val, positive, "cpu" if accelerator == "cpu" else _device(None), min(batch_size, 16))


def _write_interpretation(result, data, out: Path, val, positive, device, batch_size: int) -> None:
    """``OUT/interpretation.html`` after training; the model is saved already, so a problem here is a
    one-line warning, never a failed training."""
    from weakloc.report.interpretation import after_training

    try:
        with console.status("writing interpretation.html (top losses with heatmaps)"):
            page = after_training(result, data, out, val=val, positive=positive, device=device, batch_size=batch_size)
    except Exception as e:  # noqa: BLE001 - the trained model is saved; the page is an extra
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        console.print(f"[yellow]warning:[/] interpretation.html not written: {_printable(first)}", soft_wrap=True, highlight=False)
        return
    console.print(f"where it looked when it was wrong: {page}")


def _load(model: Path, device: str | None, weights: Path | None = None, classes: Path | None = None,
          num_classes: int | None = None, saves: bool = False):
    """The model a command runs: a model folder, or ``timm:NAME`` with ``--weights/--classes/--num-classes``
    (``saves``: the command writes into the model folder, which a timm network does not have)."""
    from weakloc.models import is_model_spec, load_model, load_model_spec

    if is_model_spec(model):
        if saves:
            raise OptionError(f"MODEL {_printable(str(model))}: calibrate stores its choices in a model folder, and a timm network "
                              "has none; fine-tune one with `weakloc train` first, or give localize/evaluate --threshold, "
                              "--method and --test-size directly")
        return load_model_spec(str(model), weights=weights, classes=classes, num_classes=num_classes, device=_device(device))
    given = [flag for flag, value in (("--weights", weights), ("--classes", classes), ("--num-classes", num_classes)) if value is not None]
    if given:
        raise OptionError(f"{', '.join(given)}: only with MODEL timm:NAME; the model folder {_printable(str(model))} holds its "
                          "own weights and classes")
    return load_model(model, _device(device))


@app.command()
@with_map_options(network=True)
def localize(
    model: Path = typer.Argument(..., help=MODEL_HELP),
    images: list[Path] = typer.Argument(..., help="Image files, folders and/or file lists (.txt: one path per line; .csv: a path column)."),
    out: Path = typer.Option(Path("weakloc-localize"), "--out", "-o"),
    target: Optional[str] = typer.Option(None, help="predicted | all | topK | CLASS (default: predicted / positive / present classes)."),
    threshold: str = typer.Option("auto", help="auto (the calibrated one, else 0.3) | NUMBER | otsu | percentile:Q | calibrated"),
    keep: str = typer.Option("all", help="all regions, the largest per map, or peaks: every region split at the map's peaks (touching objects)."),
    count_views: CountViewsOpt = None,
    batch_size: int = typer.Option(16),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda if available; under torchrun cuda:LOCAL_RANK)."),
    pictures: str = typer.Option("all", help="all (overlays and masks) | overlays | none (records only, fastest)."),
    workers: Optional[int] = typer.Option(None, help="Processes decoding the images (default: a quarter of the cores, at most 4)."),
    decode: str = typer.Option("cpu", help="cpu (in the --workers processes) | device (JPEGs decoded on the model's device: nvJPEG on a GPU)."),
    restart: bool = typer.Option(False, "--restart", help="Discard the results of an earlier run in --out instead of resuming it."),
    network: Optional[dict] = None,  # --weights, --classes, --num-classes, filled in by with_map_options
    maps: Optional[dict] = None,  # the map options given, filled in by with_map_options
):
    """Heatmaps, boxes and overlays for images, streamed to disk and resumable: writes parts/*.jsonl as it goes, overlays/, masks/,
    and at the end detections.json (COCO), counts.csv (counting models) and index.html. Run the same command again after an
    interruption to finish the rest; under torchrun each rank takes its share."""
    from weakloc.checks import check_choice
    from weakloc.localize.regions import KEEP
    from weakloc.localize.threshold import parse_threshold
    from weakloc.report.localization import PICTURES, localize_to_folder

    opts = _check_run_options(batch_size, count_views, maps)
    check_output_folder("--out", out)
    check_choice("--keep", keep, KEEP)
    check_choice("--pictures", pictures, PICTURES)
    check_choice("--decode", decode, ("cpu", "device"))
    workers = default_workers() if workers is None else check_int("--workers", workers, 0)
    if threshold != "auto":
        parse_threshold(threshold)
    net = _load(model, device, **network)
    with progress_bar("localizing") as update:
        res = localize_to_folder(net, images, out, maps=opts, target=target, threshold=threshold, keep=keep, batch_size=batch_size,
                                 progress=update, count_views=count_views, pictures=pictures, workers=workers, decode=decode,
                                 restart=restart)
    resumed = f" ({res.resumed} done by an earlier run)" if res.resumed else ""
    where = out / "detections.json" if res.rank == 0 else out / "parts"
    shard = f"rank {res.rank} of {res.world}: " if res.world > 1 else ""
    console.print(f"{shard}{res.images} image(s){resumed}, {res.boxes} box(es), {res.skipped} unreadable -> {where}", highlight=False)
    for s in res.skipped_files[:20]:
        console.print(f"[yellow]skipped {_printable(s.reason)}[/]", highlight=False)
    if res.skipped > 20:
        console.print(f"[yellow]... and {res.skipped - 20} more (all in {out / 'detections.json'})[/]", highlight=False)


@app.command()
def assemble(out: Path = typer.Argument(..., help="The output folder of weakloc localize.")):
    """Merge a localization run's parts/*.jsonl into detections.json, counts.csv and index.html now (also while it runs or after it
    was stopped)."""
    from weakloc.report.stream import assemble as merge

    res = merge(out)
    console.print(f"{res.images} image(s), {res.boxes} box(es), {res.skipped} unreadable -> {out / 'detections.json'}", highlight=False)


def default_workers() -> int:
    """Decoding processes beside this one: a quarter of the cores, at most 4; none on a machine of
    fewer than 4 cores, where a decoding process takes its core from the model (benchmarks.md)."""
    return min(4, (os.cpu_count() or 1) // 4)


@app.command("explain")
@with_map_options(network=True)
def explain_cmd(
    model: Path = typer.Argument(..., help=MODEL_HELP),
    images: list[Path] = typer.Argument(..., help="Image files and/or folders."),
    out: Path = typer.Option(Path("weakloc-explain"), "--out", "-o"),
    target: str = typer.Option("predicted", help="predicted | all | topK | CLASS"),
    batch_size: int = typer.Option(16),
    device: Optional[str] = typer.Option(None),
    network: Optional[dict] = None,  # --weights, --classes, --num-classes, filled in by with_map_options
    maps: Optional[dict] = None,  # the map options given, filled in by with_map_options
):
    """Heatmaps of any method: overlays/, maps.safetensors (raw and normalised maps), maps.json, index.html."""
    from weakloc.report.explanation import explain_images

    opts = _check_run_options(batch_size, None, maps)
    check_output_folder("--out", out)
    net = _load(model, device, **network)
    with progress_bar(f"explaining ({maps.get('method') or net.config.maps.method or 'cam'})") as update:
        res = explain_images(net, images, out, maps=opts, target=target, batch_size=batch_size, progress=update)
    console.print(f"{len(res.images)} image(s) -> {out / 'index.html'}, {out / 'maps.safetensors'}")
    for s in res.skipped:
        console.print(f"[yellow]skipped {_printable(s.reason)}[/]", highlight=False)


@app.command()
@with_map_options(network=True)
def evaluate(
    model: Path = typer.Argument(..., help=MODEL_HELP),
    data: Path = typer.Argument(..., help="Labels (CSV, folder with labels.csv, or class folders)."),
    annotations: Path = typer.Option(..., "--annotations", "-a", help="COCO JSON, Pascal VOC XML folder or YOLO dataset."),
    split: str = typer.Option("auto", help="auto (test, else val, else all) | train | val | test | all"),
    step: float = typer.Option(0.01, help="Threshold step of the sweep (cam_curve_interval)."),
    gt_known_tau: Optional[float] = typer.Option(None, help="Fixed threshold of GT-known / Top-1 Loc (default: the calibrated one, else 0.2)."),
    gt_class: Optional[list[str]] = typer.Option(None, help="ANNOTATION_CLASS=MODEL_CLASS (repeatable)."),
    keep: str = typer.Option("all", help="Instance boxes: all regions, or peaks: every region split at the map's peaks (crowds)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the report as JSON here."),
    count_views: CountViewsOpt = None,
    batch_size: int = typer.Option(32),
    device: Optional[str] = typer.Option(None),
    network: Optional[dict] = None,  # --weights, --classes, --num-classes, filled in by with_map_options
    maps: Optional[dict] = None,  # the map options given, filled in by with_map_options
):
    """Classification and WSOL localization metrics (MaxBoxAcc, MaxBoxAccV2, GT-known/Top-1 Loc, PxAP) with the centre baseline."""
    import dataclasses

    from weakloc.checks import check_float
    from weakloc.evaluate.run import evaluate_model
    from weakloc.evaluate.wsol import MIN_STEP
    from weakloc.localize.regions import KEEP

    opts = _check_run_options(batch_size, count_views, maps, split)
    if out:
        check_output_file("--out", out)
    check_float("--step", step, MIN_STEP, 0.5)
    check_float("--gt-known-tau", gt_known_tau, 0.0, 1.0, allow_none=True)
    check_choice("--keep", keep, KEEP)
    net = _load(model, device, **network)
    counting = None
    if net.counting_head is not None:
        from weakloc.data.counts import count_labels_or_annotated
        from weakloc.evaluate.counting import evaluate_counts

        data = count_labels_or_annotated(data, annotations, classes=net.config.classes)
        with progress_bar("counting") as update:
            counting = evaluate_counts(net, data, annotations, split=split, batch_size=batch_size, maps=opts,
                                       count_views=count_views, progress=update)
    with progress_bar("evaluating") as update:
        report = evaluate_model(net, data, annotations, maps=opts, split=split, step=step, gt_known_tau=gt_known_tau,
                                gt_class=_parse_gt_class(gt_class), keep=keep, batch_size=batch_size,
                                progress=update)
    print_report(report)
    if counting is not None:
        print_counting(counting)
        report = dataclasses.replace(report, counting=counting)
    _print_left_out(report, out)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report.to_dict(), indent=2))
        console.print(f"report written to {out}")


@app.command()
def calibrate(
    model: Path = typer.Argument(..., help="Model folder (updated in place; not a timm:NAME network)."),
    data: Path = typer.Argument(..., help="Labels (CSV, folder with labels.csv, or class folders)."),
    annotations: Path = typer.Option(..., "--annotations", "-a", help="COCO JSON, Pascal VOC XML folder or YOLO dataset."),
    per_class: int = typer.Option(5, help="Annotated images per class to calibrate on."),
    methods: ListOpt = typer.Option(None, help="Candidate map methods (default cam)" + LIST_HELP + "; the best is stored."),
    split: str = typer.Option("train", help="Split the few annotated images come from: train | val | test | all."),
    seed: int = typer.Option(0),
    gt_class: Optional[list[str]] = typer.Option(None, help="ANNOTATION_CLASS=MODEL_CLASS (repeatable)."),
    test_sizes: ListOpt = typer.Option(None, help="Test-time input sizes to choose from as well, e.g. 256,512,768" + LIST_HELP + "."),
    normalizations: ListOpt = typer.Option(None, help="Map normalisations to choose from as well, e.g. minmax,pas" + LIST_HELP + "."),
    margin: str = typer.Option("auto", help="Points of MaxBoxAccV2 a candidate must beat the model's own settings by: auto "
                                            "(1, or the standard error of the difference if larger) or a number; 0: the best."),
    device: Optional[str] = typer.Option(None),
):
    """Choose the box threshold (and map method, test-time size, normalisation) from K annotated images per class;
    `localize` and `evaluate` then use them. For a counting model: each class's instance box size."""
    from weakloc.checks import check_choice, check_float, check_int
    from weakloc.evaluate.calibrate import calibrate as run_calibration
    from weakloc.evaluate.calibrate import calibrate_box_sizes
    from weakloc.models import save_model
    from weakloc.models.checkpoint import ensure_writable

    check_int("--per-class", per_class, 1, 10_000)
    check_choice("--split", split, ("train", "val", "test", "all"))
    if margin != "auto":
        try:
            margin = float(margin)
        except ValueError:
            raise OptionError(f"--margin: {margin!r} is not auto or a number of points") from None
        check_float("--margin", margin, 0.0, 100.0)
    names, sizes, norms = _names(methods), _int_list(test_sizes, "--test-sizes"), _names(normalizations)
    if methods is not None and not names:
        raise OptionError("--methods: give at least one method name (see `weakloc methods`)")
    for m in names:
        _check_map_options({"method": m}, "--methods")
    for size in sizes:
        _check_map_options({"test_size": size}, "--test-sizes")
    for n in norms:
        _check_map_options({"normalization": n}, "--normalizations")
    net = _load(model, device, saves=True)
    ensure_writable(model)  # a read-only model folder fails now, not after the calibration's work
    if net.counting_head is not None:
        if names or sizes or norms:
            raise OptionError("a counting model calibrates its instance box sizes only: --methods, --test-sizes and "
                              "--normalizations choose a classifier's WSOL maps")
        res = calibrate_box_sizes(net, data, annotations, per_class=per_class, split=split, seed=seed, gt_class=_parse_gt_class(gt_class))
        save_model(net.cpu(), model)
        console.print(f"instance box sizes (width x height, fraction of the image) from {res['images']} image(s): "
                      + ", ".join(f"{c} {w:.3f} x {h:.3f} ({res['boxes'][c]} boxes)" for c, (w, h) in res["box_sizes"].items())
                      + f"; stored in {model}")
        return
    res = run_calibration(net, data, annotations, per_class=per_class, methods=tuple(names or ["cam"]), split=split, seed=seed,
                          gt_class=_parse_gt_class(gt_class), test_sizes=tuple(sizes) or None, normalizations=tuple(norms) or None,
                          margin=margin)
    save_model(net.cpu(), model)
    console.print(f"calibrated on {res.images} image(s): method {res.method}, threshold {res.threshold:.2f}, "
                  f"test size {res.test_size}" + (f", normalisation {res.normalization}" if res.normalization else "") + " "
                  "(MaxBoxAccV2 " + ", ".join(f"{m} {v:.1f} ± {res.standard_error[m]:.1f}" for m, v in res.per_method.items())
                  + f") stored in {model}", highlight=False)
    if len(res.per_method) > 1:
        console.print(f"the model's own settings ({res.default}) are kept unless another candidate wins by {res.margin:.1f} points: "
                      + ("kept" if res.kept_default else f"{res.chosen} won"), highlight=False)


@app.command("ddt")
def ddt_cmd(
    model: Path = typer.Argument(..., help="Model folder (ddt.safetensors is written into it)."),
    data: Path = typer.Argument(..., help="Labels (CSV, folder with labels.csv, or class folders): the training images."),
    split: str = typer.Option("train", help="Split whose images are pooled: train | val | test | all."),
    layer: Optional[str] = typer.Option(None, help="Module name of the layer (default: the classifier's feature map)."),
    batch_size: int = typer.Option(16),
    device: Optional[str] = typer.Option(None),
):
    """Class-level co-localization statistics (Deep Descriptor Transforming): each class's mean descriptor and principal direction
    over its training images, stored in the model folder; the `ddt` and `cam+ddt` methods read them."""
    from weakloc.data.labels import load_labels, resolve_split
    from weakloc.explain.ddt import fit_directions
    from weakloc.models.checkpoint import ensure_writable
    from weakloc.models.colocalization import save_directions

    check_choice("--split", split, ("train", "val", "test", "all"))
    batch_size = check_int("--batch-size", batch_size, 1)
    net = _load(model, device, saves=True)
    if net.counting_head is not None:
        raise OptionError("co-localization statistics are for classifiers; this is a counting model")
    ensure_writable(model)
    labeled = load_labels(data, classes=net.config.classes)
    labeled, used = resolve_split(labeled, split if labeled.splits else "all")  # no split column: every image is a training image
    with progress_bar("pooling descriptors") as update:
        stats = fit_directions(net, labeled, layer=layer, batch_size=batch_size, progress=update)
    path = save_directions(stats, model)
    console.print(f"co-localization statistics of {len(labeled)} image(s) ({used}), "
                  f"{stats.mean.shape[1]} channels ({layer or 'the feature map'}) -> {path}; use --method ddt or cam+ddt", highlight=False)


@app.command("explain-eval")
@with_map_options(method=False, network=True)
def explain_eval_cmd(
    model: Path = typer.Argument(..., help=MODEL_HELP),
    data: Path = typer.Argument(..., help="Labels (CSV, folder with labels.csv, or class folders): its images are used."),
    methods: ListOpt = typer.Option(None, help="Methods to compare (default cam,gradcam,gradcam++,layercam,eigencam,random)" + LIST_HELP + "."),
    split: str = typer.Option("auto", help="auto (test, else val, else all) | train | val | test | all"),
    limit: int = typer.Option(64, help="At most this many images."),
    target: str = typer.Option("predicted", help="predicted | all | topK | CLASS"),
    steps: int = typer.Option(50, help="Deletion / insertion steps."),
    baseline: str = typer.Option("blur", help="What removed pixels become: blur | zero | mean | black."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the table as JSON here."),
    batch_size: int = typer.Option(16),
    device: Optional[str] = typer.Option(None),
    network: Optional[dict] = None,  # --weights, --classes, --num-classes, filled in by with_map_options
    maps: Optional[dict] = None,  # the map options given, filled in by with_map_options
):
    """Compare heatmap methods: deletion/insertion AUC, Average Drop, Increase in Confidence, ms per image."""
    from weakloc.checks import check_choice, check_int
    from weakloc.evaluate.explain_eval import explain_eval

    opts = _check_run_options(batch_size, None, maps, split)
    if out:
        check_output_file("--out", out)
    check_int("--limit", limit, 1, 1_000_000)
    check_int("--steps", steps, 2, 10_000)
    check_choice("--baseline", baseline, ("blur", "zero", "mean", "black"))
    names = _names(methods) if methods is not None else ["cam", "gradcam", "gradcam++", "layercam", "eigencam", "random"]
    if not names:
        raise OptionError("--methods: give at least one method name (see `weakloc methods`)")
    for m in names:
        _check_map_options({"method": m}, "--methods")
    net = _load(model, device, **network)
    with console.status(f"explaining and scoring {len(names)} method(s)"):
        report = explain_eval(net, data, names, split=split, limit=limit, target=target, steps=steps, baseline=baseline,
                              batch_size=batch_size, maps=opts)
    table = Table("method", "deletion AUC ↓", "insertion AUC ↑", "average drop % ↓", "increase in conf. % ↑", "ms / image",
                  title=f"Explanation quality: {report['images']} {report['split']} image(s), {steps} steps, {baseline} baseline")
    for r in report["rows"]:
        table.add_row(r["method"], f"{r['deletion_auc']:.3f}", f"{r['insertion_auc']:.3f}", f"{r['average_drop_pct']:.1f}",
                      f"{r['increase_in_confidence_pct']:.1f}", f"{r['ms_per_image']:.1f}")
    console.print(table)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report.to_dict(), indent=2))
        console.print(f"table written to {out}")


@app.command()
@with_map_options()
def report(
    model: Path = typer.Argument(..., help="Model folder."),
    data: Path = typer.Argument(..., help="Labels (CSV, folder with labels.csv, or class folders; a counts CSV for a counting model)."),
    out: Path = typer.Option(Path("weakloc-report"), "--out", "-o", help="Output folder: interpretation.html and interpretation/*.png."),
    split: str = typer.Option("auto", help="auto (test, else val, else all) | train | val | test | all"),
    k: int = typer.Option(12, "--k", help="How many top losses to show."),
    per_class: int = typer.Option(3, help="Most, and least, confident correct images shown per class (0: none)."),
    batch_size: int = typer.Option(16),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
    maps: Optional[dict] = None,  # the map options given, filled in by with_map_options
):
    """Where it looked when it was wrong: interpretation.html with the confusion matrix, the top losses with the heatmaps
    of the predicted and true class side by side, and per class the most and least confident correct images."""
    from weakloc.checks import check_int
    from weakloc.report.interpretation import top_losses

    opts = _check_run_options(batch_size, None, maps, split)
    check_output_folder("--out", out)
    check_int("--k", k, 1, 100_000)
    check_int("--per-class", per_class, 0, 10_000)
    net = _load(model, device)
    with progress_bar("interpreting") as update:
        res = top_losses(net, data, out, k=k, per_class=per_class, split=split, maps=opts, batch_size=batch_size, progress=update)
    wrong = sum(not c.correct for c in res.top_losses)
    console.print(f"{res.images} {res.split} image(s), accuracy {res.accuracy:.1f}%, {wrong} of the top {len(res.top_losses)} "
                  f"losses wrong -> {out / 'interpretation.html'}", highlight=False)
    for note in res.notes:
        console.print(f"[yellow]note:[/] {_printable(note)}", highlight=False)
    for s in res.skipped:
        console.print(f"[yellow]skipped {_printable(s.file)}: {_printable(s.reason)}[/]", highlight=False)


@app.command()
def serve(
    model: Path = typer.Argument(..., help="Model folder (model.safetensors + config.json)."),
    images: Optional[Path] = typer.Option(None, help="A folder of images the page lists (only image files under it are served)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on: 127.0.0.1 serves this machine only; another (0.0.0.0: every "
                             "network) is reachable by others, with no authentication, and is logged."),
    port: int = typer.Option(8000),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
    max_batch: int = typer.Option(8, help="Most images in one device batch (concurrent requests are batched)."),
    batch_window_ms: float = typer.Option(20.0, help="How long a request waits for others to share its batch."),
    queue_size: int = typer.Option(64, help="Most images waiting; past that requests get 503 with Retry-After."),
    max_upload_mb: float = typer.Option(20.0, help="Largest request body (uploads), in MiB."),
    max_files: int = typer.Option(16, help="Most images in one request."),
    keep_results: int = typer.Option(256, help="How many images' maps are kept for new thresholds and downloads."),
):
    """A local web page and JSON API: heatmaps, boxes, masks and counts of uploaded images (docs/serve.md)."""
    from weakloc.checks import check_int

    check_int("--port", port, 0, 65535)
    check_int("--max-batch", max_batch, 1, 1024)
    check_int("--queue-size", queue_size, 1)
    check_int("--max-files", max_files, 1)
    check_int("--keep-results", keep_results, 1)
    if images is not None and not images.is_dir():
        raise OptionError(f"--images {_printable(str(images))}: not a folder")
    net = _load(model, device)
    from weakloc.serve.app import run_server

    run_server(net, images=images, host=host, port=port, max_batch=max_batch, window_ms=batch_window_ms, queue_size=queue_size,
               max_upload_mb=max_upload_mb, max_files=max_files, keep_results=keep_results,
               say=lambda line: console.print(_printable(line), soft_wrap=True, highlight=False))


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
    frozen_stages: Optional[int] = typer.Option(None, help="The stem and this many first backbone stages never train "
                                                "(default: the demo's recipe; see train --frozen-stages)."),
):
    """Offline end to end: synthesise data, fine-tune on image labels only, localize, evaluate, report."""
    from weakloc.checks import check_int
    from weakloc.demo import run_demo

    check_output_folder("--out", out)
    check_int("--n", n, 50, 100_000)
    check_int("--epochs", epochs, 1, 1000)
    check_int("--frozen-stages", frozen_stages, 0, 5, allow_none=True)  # EfficientNet-Lite0 has 5 (feature_info)
    _quiet_lightning()
    recipe = {} if frozen_stages is None else {"frozen_stages": frozen_stages}
    run_demo(out, n_images=n, epochs=epochs, seed=seed, console=console, progress_bar=progress_bar, print_report=print_report, **recipe)


def _device(name: str | None):
    import torch

    from weakloc.checks import check_device

    return check_device("--device", name) if name else ("cuda" if torch.cuda.is_available() else "cpu")


SPLITS = ("auto", "train", "val", "test", "all")


def _check_run_options(batch_size: int | None, count_views: str | None, maps: dict, split: str | None = None) -> dict:
    """Options the map-drawing commands share, checked before a model is loaded or an image read;
    returns ``maps`` (the map overrides)."""
    from weakloc.checks import check_choice, check_int
    from weakloc.config import COUNT_VIEWS

    if batch_size is not None:
        check_int("--batch-size", batch_size, 1, 4096)
    check_choice("--count-views", count_views, COUNT_VIEWS, allow_none=True)
    if split is not None:
        check_choice("--split", split, SPLITS)
    _check_map_options(maps)
    return maps


#: old option spellings per command -> the new ones (docs/changelog.md); they keep working with a warning
RENAMED_OPTIONS: dict[str, dict[str, str]] = {
    "train": {"--image-size": "--input-size", "--weights": "--pretrained", "--hide-and-seek": "--hide-prob",
              "--cutmix": "--cutmix-alpha", "--align": "--align-weight", "--consistency": "--consistency-weight",
              "--cbam": "--cbam-stages", "--adl": "--adl-stages"},
    "localize": {"--input-size": "--test-size", "--count-tta": "--count-views"},
    "evaluate": {"--input-size": "--test-size", "--count-tta": "--count-views"},
    "calibrate": {"--input-sizes": "--test-sizes"},
}
#: options that are gone, per command, and what to do instead
REMOVED_OPTIONS: dict[str, dict[str, str]] = {
    "evaluate": {"--calibrate": "it chose the threshold on the very images it then scored; calibrate on a few annotated "
                                "training images first with `weakloc calibrate MODEL DATA -a ANNOTATIONS`, then evaluate"},
}


def renamed_arguments(args: list[str]) -> list[str]:
    """``args`` with old option spellings of the command they follow replaced by the new ones (a
    deprecation warning for each); a removed option is an :class:`OptionError` saying what to use."""
    at = 0
    while at < len(args) and args[at].startswith("-"):  # the global options before the command
        at += 2 if args[at] == "--max-pixels" else 1
    command = args[at] if at < len(args) else None
    if command not in RENAMED_OPTIONS.keys() | REMOVED_OPTIONS.keys():
        return args
    out = args[:at + 1]
    for i, arg in enumerate(args[at + 1:], at + 1):
        if arg == "--":  # the rest are arguments, whatever they look like
            return out + args[i:]
        flag, eq, value = arg.partition("=")
        if flag in REMOVED_OPTIONS.get(command, {}):
            raise OptionError(f"{command} {flag} was removed: {REMOVED_OPTIONS[command][flag]}")
        new = RENAMED_OPTIONS.get(command, {}).get(flag)
        if new is not None:
            warnings.warn(f"{command} {flag} is deprecated; use {new} (docs/changelog.md)", DeprecationWarning, stacklevel=2)
            arg = new + eq + value
        out.append(arg)
    return out


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
        with warnings.catch_warnings():
            warnings.simplefilter("always", DeprecationWarning)  # a renamed option's warning is for the user
            args = renamed_arguments(args)
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

    from weakloc.text import escape_text

    return escape(escape_text(text))


if __name__ == "__main__":
    main()
