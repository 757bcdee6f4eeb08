"""``localize_images``: images in, heatmaps, boxes, masks, overlays, COCO JSON and a gallery out."""

from __future__ import annotations

import html
import json
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.utils import draw_keypoints

from weakloc.data.dataset import PredictDataset, collate_list
from weakloc.checks import check_choice, check_device, check_int
from weakloc.data.images import list_images
from weakloc.errors import OptionError, WeaklocError
from weakloc.explain import explain, normalize_minmax, upsample
from weakloc.explain.run import check_method, check_target, class_file_names
from weakloc.localize.instances import COUNT_TTA, counting_forward, output_instances, predicted_counts
from weakloc.localize.regions import binarize, region_boxes, scale_boxes
from weakloc.localize.threshold import parse_threshold, thresholds_for
from weakloc.models.classifier import check_finite
from weakloc.report.html import gallery_cards, write_page
from weakloc.report.overlay import blend, draw_detections, save_png
from weakloc.report.paths import OutputFolder, printable, safe_component

DEFAULT_THRESHOLD = 0.3


def default_target(model) -> str:
    """Which classes to localize by default: the positive class of a yes/no model, every class of a
    multi-label model (kept where predicted present), else the predicted class."""
    if model.config.positive_class is not None:
        return str(model.config.positive_class)
    return "all" if model.config.task == "multi" else "predicted"


def localize_images(
    model,
    images: list[str | Path] | str | Path,
    out: str | Path | None = None,
    *,
    method: str | None = None,
    explain_options: dict | None = None,
    target=None,
    threshold: str | float = "auto",
    keep: str = "all",
    min_area: int = 4,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    display_size: int = 512,
    count_tta: str | None = None,
    progress=None,
) -> dict:
    """Localize the evidence for each image's class(es).

    Args:
        model: a trained :class:`~weakloc.models.WeaklocNet`.
        images: files and/or folders.
        out: when given, writes ``overlays/*.png``, ``masks/*.png`` (binary masks of each shown class at
            the original size), ``detections.json`` (COCO results: boxes in original pixels, scores,
            labels, and ``masks``: the mask file of each image and class) and ``index.html`` (a gallery),
            all inside ``out``: file names are made from image stems and class names by
            :func:`~weakloc.report.paths.safe_component`; the JSON keeps the original names, a file
            path that is not valid UTF-8 written with ``\\xNN`` for each undecodable byte
            (:func:`~weakloc.report.paths.printable`).
        method: heatmap method (``weakloc methods``); default: the calibrated one, else ``cam``.
        explain_options: keyword arguments for :func:`weakloc.explain.explain` (layer, fusion,
            tta, eigen_smooth, dtype, method options), over the model's stored defaults for
            ``method`` (:meth:`~weakloc.models.ModelConfig.map_options`).
        target: ``predicted``, ``all``, ``topK``, a class name or index (every image); default
            :func:`default_target`. Per-image lists are for :func:`weakloc.explain.explain`.
        threshold: a number in [0, 1), ``otsu``, ``percentile:Q``, ``calibrated``, or ``auto`` (the model's
            calibrated threshold if any, else 0.3).
        keep: ``all`` regions or the ``largest`` per map.
        count_tta: counting models: test-time views averaged (``none``, ``flip``, ``dihedral``);
            default: the model's stored ``localization["count_tta"]``, else ``none``.
        progress: optional callable ``(done, total)``.

    Returns:
        COCO-style dict with ``images``, ``annotations`` (detections), ``categories`` and
        ``skipped`` (files that could not be read, with the reason).

    Raises:
        OptionError: an argument out of range or of the wrong kind, before any work starts.
    """
    cfg = model.config
    calibrated = cfg.localization.get("threshold")
    batch_size = check_int("batch_size", batch_size, 1)
    min_area = check_int("min_area", min_area, 0)
    display_size = check_int("display_size", display_size, 1)
    keep = check_choice("keep", keep, ("all", "largest"))
    if progress is not None and not callable(progress):
        raise OptionError(f"progress: expected a callable (done, total), got {progress!r}")
    if explain_options is not None and not isinstance(explain_options, dict):
        raise OptionError(f"explain_options: expected a dict of keyword arguments, got {explain_options!r}")
    if threshold == "auto":
        threshold = "calibrated" if calibrated is not None else DEFAULT_THRESHOLD
    threshold = check_threshold(threshold, calibrated)
    target = default_target(model) if target is None else check_target(target, cfg.classes)
    method = method or cfg.localization.get("method", "cam")
    check_method(method)
    if getattr(model, "counting_head", None) is not None:
        check_choice("count_tta", cfg.count_views(count_tta), COUNT_TTA)
    elif count_tta is not None:
        raise OptionError("count_tta: only counting models average test-time views (use tta in explain_options for maps)")
    device = torch.device(check_device("device", device) if device is not None else next(model.parameters()).device)
    model = model.to(device).eval()
    paths = list_images(images)
    explain_options = cfg.map_options(method, explain_options)
    out = OutputFolder(out) if out is not None else None
    loader = DataLoader(PredictDataset(paths, cfg.inference_size(), cfg.mean, cfg.std, display_size), batch_size=batch_size, collate_fn=collate_list)
    result = {"images": [], "annotations": [], "categories": [{"id": k + 1, "name": c} for k, c in enumerate(cfg.classes)], "skipped": []}
    cards = []
    done = 0
    for batch in loader:
        good = [b for b in batch if b[1] is not None]
        for i, _, reason, _ in (b for b in batch if b[1] is None):
            result["skipped"].append({"file": printable(str(paths[i]), controls=False), "reason": printable(reason, controls=False)})
        done += len(batch)
        if good:
            _localize_batch(model, good, paths, result, cards, out, method, target, threshold, calibrated, keep, min_area, device,
                            explain_options, count_tta)
        if progress is not None:
            progress(done, len(paths))
    if result["skipped"]:
        warnings.warn(f"{len(result['skipped'])} image(s) could not be read and were skipped", stacklevel=2)
    if out is not None:
        out.file(None, "detections", ".json").write_text(json.dumps(result, indent=1), encoding="utf-8")
        note = (f"<p class='note'>Method {html.escape(str(method))}, threshold {html.escape(str(threshold))}, {len(result['images'])} "
                f"image(s), {len(result['annotations'])} box(es); boxes in detections.json (COCO format, original pixels).</p>")
        write_page(out.file(None, "index", ".html"), "weakloc — localization", [("", note), ("", gallery_cards(cards, out.root))])
    return result


def check_threshold(threshold, calibrated: float | None = None) -> str | float:
    """``threshold`` (see :func:`~weakloc.localize.threshold.parse_threshold`) if usable: a number
    in [0, 1), a percentile in [0, 100], ``calibrated`` only when the model has one; else an
    :class:`~weakloc.errors.OptionError`."""
    try:
        kind, _ = parse_threshold(threshold)
    except WeaklocError as e:
        raise OptionError(str(e) if "threshold" in str(e) else f"threshold: {e}") from None
    if kind == "calibrated" and calibrated is None:
        raise OptionError("threshold: this model has no calibrated threshold; run `weakloc evaluate ... --calibrate` or pass a number")
    return threshold


def _count_batch(model, good, paths, result, cards, out, device, count_tta=None) -> None:
    """Counting models: counts, and numbered instances from the density (or CAM) peaks."""
    cfg = model.config
    size = cfg.inference_size()
    x = torch.stack([b[1] for b in good]).to(device)
    with torch.no_grad():
        o = counting_forward(model, x, cfg.count_views(count_tta))
    whole = predicted_counts(o, cfg.task)
    maps, found = output_instances(o, size, counts=whole, box_sizes=cfg.instance_box_sizes())
    pts, scores, boxes, valid = (t.cpu() for t in found)
    counts, raw = whole.cpu(), o.counts.float().cpu()
    names = [str(paths[i]) for i, *_ in good]
    check_finite(o.counts, "the model's count", names)
    probs = check_finite(model.probabilities(o.logits.float()), "the model's probability", names).cpu()
    heat = normalize_minmax(maps.sum(1))  # (B, S, S): all classes' density
    for j, (i, _, (oh, ow), shown) in enumerate(good):
        image_id = len(result["images"]) + 1
        result["images"].append({"id": image_id, "file_name": printable(str(paths[i]), controls=False), "width": ow, "height": oh,
                                 "counts": {c: int(counts[j, k]) for k, c in enumerate(cfg.classes)},
                                 "raw_counts": {c: round(float(raw[j, k]), 2) for k, c in enumerate(cfg.classes)},
                                 "probabilities": [round(float(p), 4) for p in probs[j]]})
        sx, sy = ow / size, oh / size
        dh, dw = shown.shape[-2:]
        drawn, labels, points = [], [], []
        for k, cname in enumerate(cfg.classes):
            keep_n = torch.nonzero(valid[j, k])[:, 0]
            drawn.append(scale_boxes(boxes[j, k, keep_n], (size, size), (dh, dw)))
            for n in keep_n.tolist():
                # instance boxes are continuous (sized boxes sit on a peak's centre), so the COCO box is
                # their span scaled, not snapped to whole pixels as region boxes are
                x0, y0, x1, y1 = boxes[j, k, n].tolist()
                px, py = pts[j, k, n].tolist()
                result["annotations"].append({
                    "id": len(result["annotations"]) + 1, "image_id": image_id, "category_id": k + 1, "label": cname,
                    "instance": n + 1, "point": [round((px + 0.5) * sx, 1), round((py + 0.5) * sy, 1)],
                    "bbox": [round(x0 * sx, 1), round(y0 * sy, 1), round((x1 - x0 + 1) * sx, 1), round((y1 - y0 + 1) * sy, 1)],
                    "score": round(float(scores[j, k, n]), 5),
                })
                points.append([(px + 0.5) * dw / size, (py + 0.5) * dh / size])
                labels.append(f"{cname} {n + 1}")
        if out is None:
            continue
        disp = upsample(heat[j][None], (dh, dw), mode="bilinear").clamp(0, 1)
        picture = blend(shown[None].to(device), disp)[0].cpu()
        summary = " · ".join(f"{c} {int(counts[j, k])}" for k, c in enumerate(cfg.classes))
        banner = torch.tensor([[0.0, 0.0, dw - 1.0, 0.0]])  # a flat box carries the counts as its caption
        picture = draw_detections(picture, torch.cat([banner, *drawn]), [summary] + labels)
        if points:
            picture = draw_keypoints(picture, torch.tensor(points)[None], colors="white", radius=3)
        png = save_png(picture, out.file("overlays", f"{image_id:05d}_{safe_component(Path(paths[i]).stem)}", ".png"), out.root)
        cards.append({"image": png, "title": Path(paths[i]).name, "lines": [summary, f"{len(labels)} instance(s)"]})


def _localize_batch(model, good, paths, result, cards, out, method, target, threshold, calibrated, keep, min_area, device,
                    explain_options=None, count_tta=None):
    if getattr(model, "counting_head", None) is not None:
        return _count_batch(model, good, paths, result, cards, out, device, count_tta)
    cfg = model.config
    x = torch.stack([b[1] for b in good]).to(device)
    heat = explain(model, x, method=method, target=target, **(explain_options or {}))
    probs = check_finite(model.probabilities(heat.logits.float()), "the model's probability", [str(paths[i]) for i, *_ in good])
    score = probs.gather(1, heat.targets)  # (B, T)
    if cfg.task == "multi" and heat.targets.shape[1] > 1:
        present = score >= 0.5
        present[torch.arange(len(score)), score.argmax(1)] = True  # always show the top class
    elif cfg.positive_class is not None:
        present = probs[:, cfg.positive_class:cfg.positive_class + 1] >= 0.5
    else:
        present = torch.ones_like(score, dtype=torch.bool)
    b, t, h, w = heat.normalized.shape
    flat = heat.normalized.reshape(b * t, h, w)
    tau = thresholds_for(flat, threshold, calibrated)
    masks = binarize(flat, tau)
    dets = region_boxes(masks, flat, keep=keep, min_area=min_area)
    class_files = class_file_names(cfg.classes)
    present_cpu, score_cpu, targets_cpu, probs = present.cpu(), score.cpu(), heat.targets.cpu(), probs.cpu()
    for j, (i, _, (oh, ow), shown) in enumerate(good):
        image_id = len(result["images"]) + 1
        stem = f"{image_id:05d}_{safe_component(Path(paths[i]).stem)}"
        result["images"].append({"id": image_id, "file_name": printable(str(paths[i]), controls=False), "width": ow, "height": oh,
                                 "predicted": cfg.classes[int(probs[j].argmax())], "probabilities": [round(float(p), 4) for p in probs[j]]})
        drawn_boxes, drawn_labels = [], []
        for k in range(t):
            cls = int(targets_cpu[j, k])
            if not present_cpu[j, k]:
                continue
            det = dets[j * t + k]
            boxes = scale_boxes(det.boxes, (h, w), (oh, ow))
            for r in range(len(boxes)):
                x0, y0, x1, y1 = boxes[r].tolist()
                result["annotations"].append({
                    "id": len(result["annotations"]) + 1, "image_id": image_id, "category_id": cls + 1,
                    "label": cfg.classes[cls], "bbox": [round(x0, 1), round(y0, 1), round(x1 - x0 + 1, 1), round(y1 - y0 + 1, 1)],
                    "score": round(float(score_cpu[j, k] * det.scores[r]), 4),
                })
            drawn_boxes.append(scale_boxes(det.boxes, (h, w), tuple(shown.shape[-2:])))
            if out is not None:
                full = torch.nn.functional.interpolate(masks[j * t + k][None, None].float(), size=(oh, ow), mode="nearest")[0, 0]
                mask_png = save_png((full * 255).to(torch.uint8), out.file("masks", f"{stem}_{class_files[cls]}", ".png"), out.root)
                result["images"][-1].setdefault("masks", {})[cfg.classes[cls]] = mask_png.relative_to(out.root).as_posix()
            drawn_labels += [f"{cfg.classes[cls]} {float(score_cpu[j, k]):.2f}"] * len(det.boxes)
        if out is None:
            continue
        # overlay the first shown target's map (the predicted / positive class)
        k_show = int(present_cpu[j].float().argmax()) if present_cpu[j].any() else 0
        heat_disp = upsample(heat.normalized[j, k_show][None], tuple(shown.shape[-2:]), mode="bilinear").clamp(0, 1)
        over = blend(shown[None].to(device), heat_disp)[0]
        boxes_all = torch.cat(drawn_boxes) if drawn_boxes else torch.zeros(0, 4)
        picture = draw_detections(over, boxes_all, drawn_labels)
        png = save_png(picture, out.file("overlays", stem, ".png"), out.root)
        pred = int(probs[j].argmax())
        cards.append({"image": png, "title": Path(paths[i]).name,
                      "lines": [f"predicted {cfg.classes[pred]} ({float(probs[j, pred]):.2f})", f"{len(boxes_all)} box(es)"]})
