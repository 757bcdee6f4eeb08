"""``weakloc explain``'s files: overlays, ``maps.safetensors``, ``maps.json`` and a gallery.

:class:`ExplanationWriter` writes the batches of :func:`~weakloc.explain.run.explain_batches`;
:func:`explain_images` runs both (what the command calls).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from weakloc.config import MapConfig
from weakloc.errors import OptionError
from weakloc.explain.maps import upsample
from weakloc.explain.run import ExplainedBatch, ExplainedImage, ExplanationResult, explain_batches
from weakloc.report.html import gallery_cards, write_page
from weakloc.report.overlay import blend, save_png
from weakloc.report.paths import OutputFolder, safe_component


def class_file_names(classes: list[str]) -> list[str]:
    """Each class name as a file-name component, unique among the classes (``a/b`` -> ``a_b``)."""
    used: set[str] = set()
    return [safe_component(c, used) for c in classes]


class ExplanationWriter:
    """Writes one heatmap run into ``out``, batch by batch.

    Every file stays inside ``out``: overlay names ``{key}_{class}.png`` and the keys (``NNNNN_stem``,
    also the tensors' name prefix in ``maps.safetensors``) are made from image stems and class names
    by :func:`~weakloc.report.paths.safe_component`.
    """

    def __init__(self, out: str | Path | OutputFolder, classes: list[str], method: str):
        self.out = out if isinstance(out, OutputFolder) else OutputFolder(out)
        self.classes, self.method = list(classes), method
        self._class_files = class_file_names(self.classes)
        self._tensors: dict[str, torch.Tensor] = {}
        self._cards: list[dict] = []
        self._written = 0

    def add(self, batch: ExplainedBatch) -> list[ExplainedImage]:
        """Write the batch's overlays (one per image and map) and keep its maps for
        ``maps.safetensors``; returns its records with their keys."""
        out, keyed = self.out, []
        for j, (record, path, shown) in enumerate(zip(batch.images, batch.paths, batch.display)):
            key = f"{self._written:05d}_{safe_component(path.stem)}"
            self._written += 1
            self._tensors[f"{key}.raw"] = batch.raw[j].float().cpu().clone()
            self._tensors[f"{key}.normalized"] = batch.normalized[j].float().cpu().clone()
            self._tensors[f"{key}.targets"] = batch.targets[j].cpu().clone()
            disp = upsample(batch.normalized[j], tuple(shown.shape[-2:]), mode="bilinear").clamp(0, 1)
            over = blend(shown[None].expand(len(disp), -1, -1, -1).to(disp.device), disp)
            for k, cls in enumerate(batch.targets[j].tolist()):
                png = save_png(over[k], out.file("overlays", f"{key}_{self._class_files[cls]}", ".png"), out.root)
                self._cards.append({"image": png, "title": path.name,
                                    "lines": [f"{self.method}: {self.classes[cls]} ({float(batch.probabilities[j, cls]):.2f})"]})
            keyed.append(replace(record, key=key))
        return keyed

    def finish(self, result: ExplanationResult) -> None:
        """Write ``maps.safetensors`` (when any map was made), ``maps.json`` and ``index.html``."""
        out = self.out
        if self._tensors:
            save_file(self._tensors, str(out.file(None, "maps", ".safetensors")))
        out.file(None, "maps", ".json").write_text(json.dumps(result.to_dict(), indent=1), encoding="utf-8")
        write_page(out.file(None, "index", ".html"), f"weakloc — {self.method} heatmaps", [("", gallery_cards(self._cards, out.root))])


def explain_images(model, images, out: str | Path, *, method: str | None = None, target="predicted", layer: str | None = None,
                   maps: MapConfig | dict | None = None, batch_size: int = 16, device=None, progress=None) -> ExplanationResult:
    """Heatmaps of image files, written to ``out``: ``overlays/*.png`` (one per image and target),
    ``maps.safetensors`` (per image the raw and normalised maps ``(T, S, S)`` at
    ``settings.test_size`` and the targets ``(T,)``), ``maps.json`` (file names, classes,
    probabilities) and ``index.html``.

    Args:
        model, images, method, target, layer, maps, batch_size, device, progress: see
            :func:`~weakloc.explain.run.explain_batches` (``method`` None: the model's stored one,
            else ``cam``).
        out: the output folder. ``maps.json`` keeps the original class names and file paths, a
            path that is not valid UTF-8 written with ``\\xNN`` for each undecodable byte.

    Returns:
        an :class:`~weakloc.explain.run.ExplanationResult`; its ``to_dict()`` is ``maps.json``.

    Raises:
        OptionError: an argument out of range or of the wrong kind, before any work starts.
    """
    if out is None:
        raise OptionError("out: explain_images needs an output folder")
    run = explain_batches(model, images, method=method, target=target, layer=layer, maps=maps, batch_size=batch_size, device=device,
                          progress=progress)
    writer = ExplanationWriter(out, model.config.classes, run.method)
    result = run.result()
    for batch in run:
        result.add(writer.add(batch), batch.skipped)
    writer.finish(result)
    return result
