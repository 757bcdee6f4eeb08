"""``explain_images``: heatmaps of any registered method for image files, saved as pictures and tensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from weakloc.checks import check_device, check_int
from weakloc.data.dataset import PredictDataset, collate_list
from weakloc.data.images import list_images
from weakloc.errors import OptionError, WeaklocError
from weakloc.explain import explain, resolve_targets, upsample
from weakloc.explain.registry import get_method
from weakloc.models.classifier import check_finite
from weakloc.report.html import gallery_cards, write_page
from weakloc.report.overlay import blend, save_png
from weakloc.report.paths import OutputFolder, printable, safe_component


def explain_images(model, images, out: str | Path, *, method: str = "gradcam", target="predicted", layer: str | None = None,
                   batch_size: int = 16, device=None, progress=None, explain_options: dict | None = None) -> dict:
    """Write ``overlays/*.png`` (one per image and target), ``maps.safetensors`` (per image the raw and
    normalised maps ``(T, S, S)`` at the model's input size and the targets ``(T,)``), ``maps.json``
    (file names, classes, probabilities) and ``index.html``. ``explain_options`` go to
    :func:`~weakloc.explain.explain` (fusion, tta, eigen_smooth, dtype, method options), over the
    model's stored defaults for ``method`` (:meth:`~weakloc.models.ModelConfig.map_options`).

    Every file stays inside ``out``: overlay names ``{key}_{class}.png`` and the keys (``NNNNN_stem``,
    also the tensors' name prefix in ``maps.safetensors``) are made from image stems and class names
    by :func:`~weakloc.report.paths.safe_component`. ``maps.json`` keeps the original class names and
    file paths, a path that is not valid UTF-8 written with ``\\xNN`` for each undecodable byte
    (:func:`~weakloc.report.paths.printable`).

    ``target``: ``predicted``, ``all``, ``topK``, a class name or index (every image).

    Returns:
        the ``maps.json`` content.

    Raises:
        OptionError: an argument out of range or of the wrong kind, before any work starts.
    """
    cfg = model.config
    if out is None:
        raise OptionError("out: explain_images needs an output folder")
    batch_size = check_int("batch_size", batch_size, 1)
    if progress is not None and not callable(progress):
        raise OptionError(f"progress: expected a callable (done, total), got {progress!r}")
    if explain_options is not None and not isinstance(explain_options, dict):
        raise OptionError(f"explain_options: expected a dict of keyword arguments, got {explain_options!r}")
    check_method(method)
    target = check_target(target, cfg.classes)
    device = torch.device(check_device("device", device) if device is not None else next(model.parameters()).device)
    model = model.to(device).eval()
    explain_options = cfg.map_options(method, explain_options)
    out = OutputFolder(out)
    class_files = class_file_names(cfg.classes)
    paths = list_images(images)
    loader = DataLoader(PredictDataset(paths, cfg.inference_size(), cfg.mean, cfg.std), batch_size=batch_size, collate_fn=collate_list)
    tensors: dict[str, torch.Tensor] = {}
    index = {"method": method, "classes": cfg.classes, "images": [], "skipped": []}
    cards = []
    done = 0
    for batch in loader:
        done += len(batch)
        good = [b for b in batch if b[1] is not None]
        index["skipped"] += [{"file": printable(str(paths[i]), controls=False), "reason": printable(r, controls=False)}
                             for i, x, r, _ in batch if x is None]
        if good:
            x = torch.stack([b[1] for b in good]).to(device)
            heat = explain(model, x, method=method, target=target, layer=layer, **explain_options)
            probs = check_finite(model.probabilities(heat.logits.float()), "the model's probability",
                                 [str(paths[i]) for i, *_ in good]).cpu()
            for j, (i, _, (h, w), shown) in enumerate(good):
                key = f"{len(index['images']):05d}_{safe_component(paths[i].stem)}"
                tensors[f"{key}.raw"] = heat.raw[j].float().cpu().clone()
                tensors[f"{key}.normalized"] = heat.normalized[j].float().cpu().clone()
                tensors[f"{key}.targets"] = heat.targets[j].cpu().clone()
                disp = upsample(heat.normalized[j], tuple(shown.shape[-2:]), mode="bilinear").clamp(0, 1)
                over = blend(shown[None].expand(len(disp), -1, -1, -1).to(device), disp)
                for k, cls in enumerate(heat.targets[j].tolist()):
                    png = save_png(over[k], out.file("overlays", f"{key}_{class_files[cls]}", ".png"), out.root)
                    cards.append({"image": png, "title": paths[i].name, "lines": [f"{method}: {cfg.classes[cls]} ({float(probs[j, cls]):.2f})"]})
                index["images"].append({"key": key, "file": printable(str(paths[i]), controls=False), "width": w, "height": h,
                                        "targets": [cfg.classes[c] for c in heat.targets[j].tolist()],
                                        "probabilities": [round(float(p), 4) for p in probs[j]]})
        if progress is not None:
            progress(done, len(paths))
    if tensors:
        save_file(tensors, str(out.file(None, "maps", ".safetensors")))
    out.file(None, "maps", ".json").write_text(json.dumps(index, indent=1), encoding="utf-8")
    write_page(out.file(None, "index", ".html"), f"weakloc — {method} heatmaps", [("", gallery_cards(cards, out.root))])
    return index


def check_target(target, classes: list[str]) -> str | int:
    """``target`` if it names maps for every image (``predicted``, ``all``, ``topK``, a class name
    or index), else an :class:`~weakloc.errors.OptionError`."""
    if isinstance(target, bool) or not isinstance(target, (str, int)):
        raise OptionError(f"target: expected predicted, all, topK, a class name or a class index, got {target!r}")
    try:
        resolve_targets(target, torch.zeros(1, len(classes)), classes)
    except WeaklocError as e:
        raise OptionError(f"target: {e}") from None
    return target


def check_method(method) -> str:
    """``method`` if it is a registered heatmap method, else an :class:`~weakloc.errors.OptionError`."""
    if not isinstance(method, str):
        raise OptionError(f"method: expected a method name, got {method!r}")
    try:
        get_method(method)
    except WeaklocError as e:
        raise OptionError(f"method: {e}") from None
    return method


def class_file_names(classes: list[str]) -> list[str]:
    """Each class name as a file-name component, unique among the classes (``a/b`` -> ``a_b``)."""
    used: set[str] = set()
    return [safe_component(c, used) for c in classes]
