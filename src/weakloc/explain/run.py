"""``explain_images``: heatmaps of any registered method for image files, saved as pictures and tensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from weakloc.data.dataset import PredictDataset, collate_list
from weakloc.data.images import list_images
from weakloc.explain import explain, upsample
from weakloc.report.html import gallery_cards, write_page
from weakloc.report.overlay import blend, save_png


def explain_images(model, images, out: str | Path, *, method: str = "gradcam", target="predicted", layer: str | None = None,
                   batch_size: int = 16, device=None, progress=None, explain_options: dict | None = None) -> dict:
    """Write ``overlays/*.png`` (one per image and target), ``maps.safetensors`` (per image the raw and
    normalised maps ``(T, S, S)`` at the model's input size and the targets ``(T,)``), ``maps.json``
    (file names, classes, probabilities) and ``index.html``. ``explain_options`` go to
    :func:`~weakloc.explain.explain` (fusion, tta, eigen_smooth, dtype, method options), over the
    model's stored defaults for ``method`` (:meth:`~weakloc.models.ModelConfig.map_options`).

    Returns:
        the ``maps.json`` content.
    """
    device = torch.device(device or next(model.parameters()).device)
    model = model.to(device).eval()
    cfg = model.config
    explain_options = cfg.map_options(method, explain_options)
    out = Path(out)
    paths = list_images(images)
    loader = DataLoader(PredictDataset(paths, cfg.inference_size(), cfg.mean, cfg.std), batch_size=batch_size, collate_fn=collate_list)
    tensors: dict[str, torch.Tensor] = {}
    index = {"method": method, "classes": cfg.classes, "images": [], "skipped": []}
    cards = []
    done = 0
    for batch in loader:
        done += len(batch)
        good = [b for b in batch if b[1] is not None]
        index["skipped"] += [{"file": str(paths[i]), "reason": r} for i, _, r, _ in batch if _ is None]
        if good:
            x = torch.stack([b[1] for b in good]).to(device)
            heat = explain(model, x, method=method, target=target, layer=layer, **explain_options)
            probs = model.probabilities(heat.logits.float()).cpu()
            for j, (i, _, (h, w), shown) in enumerate(good):
                key = f"{len(index['images']):05d}_{paths[i].stem}"
                tensors[f"{key}.raw"] = heat.raw[j].float().cpu().clone()
                tensors[f"{key}.normalized"] = heat.normalized[j].float().cpu().clone()
                tensors[f"{key}.targets"] = heat.targets[j].cpu().clone()
                disp = upsample(heat.normalized[j], tuple(shown.shape[-2:]), mode="bilinear").clamp(0, 1)
                over = blend(shown[None].expand(len(disp), -1, -1, -1).to(device), disp)
                for k, cls in enumerate(heat.targets[j].tolist()):
                    png = save_png(over[k], out / "overlays" / f"{key}_{cfg.classes[cls]}.png")
                    cards.append({"image": png, "title": paths[i].name, "lines": [f"{method}: {cfg.classes[cls]} ({float(probs[j, cls]):.2f})"]})
                index["images"].append({"key": key, "file": str(paths[i]), "width": w, "height": h,
                                        "targets": [cfg.classes[c] for c in heat.targets[j].tolist()],
                                        "probabilities": [round(float(p), 4) for p in probs[j]]})
        if progress is not None:
            progress(done, len(paths))
    out.mkdir(parents=True, exist_ok=True)
    if tensors:
        save_file(tensors, str(out / "maps.safetensors"))
    (out / "maps.json").write_text(json.dumps(index, indent=1))
    write_page(out / "index.html", f"weakloc — {method} heatmaps", [("", gallery_cards(cards, out))])
    return index
