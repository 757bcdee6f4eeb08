"""The model service behind ``weakloc serve``: one loaded model, a batching queue, kept results.

Every result is computed by :func:`weakloc.localize.run.localize_batches` (so by the one map
pipeline, on images read by :func:`weakloc.data.images.read_image` at ``settings.test_size``), and
its records are :class:`~weakloc.localize.run.LocalizedImage` / :class:`LocalizedBox`, whose
``to_dict()`` is ``weakloc localize``'s ``detections.json``. Each image's normalised maps are kept
(:class:`Kept`, a bounded store), so a new threshold gives new boxes from the same maps
(:func:`region_records`: :mod:`weakloc.localize.threshold` and :mod:`weakloc.localize.regions`),
never a second model pass.
"""

from __future__ import annotations

import asyncio
import base64
import io
import math
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from weakloc.checks import check_choice, check_int
from weakloc.config import DEFAULT_BOX_THRESHOLD, fallback_threshold
from weakloc.errors import OptionError, WeaklocError
from weakloc.explain import pipeline
from weakloc.explain.maps import upsample
from weakloc.explain.registry import METHODS, ExplainMethod
from weakloc.explain.run import check_method, check_target
from weakloc.localize.regions import KEEP, binarize, region_boxes, scale_boxes
from weakloc.localize.run import CountBatch, LocalizedBox, LocalizedImage, RegionBatch, default_target, localize_batches
from weakloc.localize.threshold import check_threshold, parse_threshold, thresholds_for
from weakloc.report.overlay import blend, colorize, draw_detections
from weakloc.serve.batching import Batcher, Job
from weakloc.text import escape_text

#: what a request may ask for beside the records
MAP_FORMATS = ("none", "png", "array")
MASK_FORMATS = ("none", "rle", "map")


# --- methods ------------------------------------------------------------------------------------


def method_cost(method: ExplainMethod) -> tuple[str, str]:
    """``(tier, what it costs)`` of a registered method, so a user picking Score-CAM knows it is slow:
    tier ``low`` (one forward pass), ``medium`` (a backward pass too, per class) or ``high`` (a
    model pass per feature channel, or per noisy sample)."""
    if method.fn.__module__.endswith(".perturbation"):
        return "high", "one forward pass per feature channel"
    if method.name.startswith("smooth-"):
        return "high", "a forward and a backward pass per noisy sample"
    if method.uses_gradients:
        return "medium", "a forward and a backward pass per class"
    return "low", "one forward pass"


def method_problem(model, name: str) -> str | None:
    """Why ``model`` cannot make ``name``'s maps (a head or attention it lacks), or None."""
    if name == "attention" and getattr(model, "attention_head", None) is None:
        return "this model has no attention head (train with --head attention)"
    if name == "localizer" and getattr(model, "localizer", None) is None:
        return "this model has no localizer (train a second stage with --teacher)"
    if name == "box" and getattr(model, "box_head", None) is None:
        return "this model has no box head (train a second stage with --teacher)"
    if name in ("rollout", "grad-rollout"):
        from weakloc.explain.rollout import attention_probabilities

        try:
            with attention_probabilities(model):
                pass
        except WeaklocError as e:
            return str(e)
    return None


# --- masks and maps as JSON -----------------------------------------------------------------------


def mask_rle(mask: torch.Tensor) -> dict:
    """COCO's uncompressed RLE of a ``(H, W)`` bool mask: ``{"size": [H, W], "counts": [...]}``,
    runs in column-major order starting with a (possibly empty) run of zeros."""
    flat = mask.cpu().numpy().astype(np.uint8).flatten(order="F")
    if flat.size == 0:
        return {"size": list(mask.shape), "counts": []}
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": ([0] if flat[0] else []) + counts}


def rle_mask(rle: dict) -> torch.Tensor:
    """The ``(H, W)`` bool mask of :func:`mask_rle`'s RLE (its inverse)."""
    h, w = rle["size"]
    values = np.zeros(h * w, dtype=bool)
    pos, on = 0, False
    for n in rle["counts"]:
        values[pos:pos + n] = on
        pos, on = pos + n, not on
    return torch.from_numpy(values.reshape(w, h).T.copy())


def map_uint8(heat: torch.Tensor) -> torch.Tensor:
    """A normalised ``(H, W)`` map as uint8 ``round(255 * value)`` (values clamped to [0, 1])."""
    return (heat.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def png_bytes(image: torch.Tensor) -> bytes:
    """PNG of a ``(3, H, W)`` or ``(H, W)`` uint8 image."""
    arr = image.cpu().numpy() if image.ndim == 2 else image.permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buffer, format="PNG")
    return buffer.getvalue()


def map_json(heat: torch.Tensor, kind: str) -> dict:
    """A normalised map as JSON: ``png`` (grey PNG, base64) or ``array`` (uint8 row-major, base64)."""
    values = map_uint8(heat)
    if kind == "png":
        return {"format": "png", "data": base64.b64encode(png_bytes(values)).decode("ascii")}
    return {"format": "array", "dtype": "uint8", "shape": list(values.shape),
            "data": base64.b64encode(values.numpy().tobytes()).decode("ascii")}


# --- kept results ---------------------------------------------------------------------------------


@dataclass
class Kept:
    """One localized image, kept for new thresholds, pictures and downloads.

    Attributes:
        id: its handle in the API (``/api/results/{id}``).
        name: the file name shown (an upload's own name, or the path under ``--images``).
        record, annotations: its records as ``localize_batches`` made them, numbered as a run of
            this one image (image id 1, box ids from 1).
        display: ``(3, h, w)`` uint8 picture for overlays.
        method, threshold, keep, min_area, target: the settings it was made with (``threshold``
            as resolved: a number, ``calibrated``, ``otsu``, ...).
        maps: ``(T, S, S)`` normalised maps (counting models: ``(1, S, S)`` density of all classes).
        targets: ``(T,)`` class index of each map (counting: ``[-1]``).
        scores: ``(T,)`` float32, the probability of each map's class.
        present: ``(T,)`` bool, the maps whose class is shown.
        counting: a counting model's result (boxes are its instances; no threshold applies).
    """

    id: str
    name: str
    record: LocalizedImage
    annotations: list[LocalizedBox]
    display: torch.Tensor
    method: str
    threshold: str | float
    keep: str
    min_area: int
    target: str | int
    maps: torch.Tensor
    targets: torch.Tensor
    scores: torch.Tensor
    present: torch.Tensor
    counting: bool = False


class ResultStore:
    """The last ``size`` results (least recently used dropped first), by id; thread-safe."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[str, Kept] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, kept: Kept) -> None:
        with self._lock:
            self._items[kept.id] = kept
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def get(self, key: str) -> Kept | None:
        with self._lock:
            kept = self._items.get(key)
            if kept is not None:
                self._items.move_to_end(key)
            return kept

    def __len__(self) -> int:
        return len(self._items)


def region_records(kept: Kept, classes: list[str], threshold, calibrated: float | None, keep: str | None = None,
                   min_area: int | None = None) -> tuple[list[LocalizedBox], torch.Tensor, list[torch.Tensor]]:
    """A classifier's boxes at another threshold, from the kept maps (no model pass).

    The same steps as :meth:`weakloc.localize.run.LocalizeBatches._regions`: threshold
    (:func:`~weakloc.localize.threshold.thresholds_for`), mask
    (:func:`~weakloc.localize.regions.binarize`), regions
    (:func:`~weakloc.localize.regions.region_boxes`), boxes in original pixels
    (:func:`~weakloc.localize.regions.scale_boxes`), scored by the class probability times the
    region's mean map value; so at any threshold they equal ``weakloc localize --threshold``'s.

    Returns:
        the boxes (image id 1, box ids from 1), the ``(T, S, S)`` masks, and each map's region
        boxes ``(R, 4)`` in map pixels (empty where its class is not shown).
    """
    keep = kept.keep if keep is None else keep
    min_area = kept.min_area if min_area is None else min_area
    maps = kept.maps
    t, h, w = maps.shape
    masks = binarize(maps, thresholds_for(maps, threshold, calibrated))
    dets = region_boxes(masks, maps, keep=keep, min_area=min_area)
    oh, ow = kept.record.height, kept.record.width
    boxes, map_boxes = [], []
    for k in range(t):
        if not kept.present[k]:
            map_boxes.append(torch.zeros(0, 4))
            continue
        det = dets[k]
        map_boxes.append(det.boxes)
        cls = int(kept.targets[k])
        for r, (x0, y0, x1, y1) in enumerate(scale_boxes(det.boxes, (h, w), (oh, ow)).tolist()):
            boxes.append(LocalizedBox(len(boxes) + 1, 1, cls + 1, classes[cls],
                                      [round(x0, 1), round(y0, 1), round(x1 - x0 + 1, 1), round(y1 - y0 + 1, 1)],
                                      round(float(kept.scores[k] * det.scores[r]), 4)))
    return boxes, masks, map_boxes


# --- the service ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """A localize request's settings (requests with equal settings share batches)."""

    method: str | None = None
    target: str | int | None = None
    threshold: str | float = "auto"
    keep: str = "all"
    min_area: int = 4


class Service:
    """A loaded model answering localize requests through a :class:`~weakloc.serve.batching.Batcher`.

    Args:
        model: a :class:`~weakloc.models.WeaklocNet` (moved to ``device``, eval mode).
        device: where it runs.
        max_batch: most images in one device batch.
        window: seconds a request waits for others to batch with.
        max_queue: most images waiting.
        keep_results: how many images' maps are kept for new thresholds and downloads.
        display_size: longest side of the pictures of overlays.
    """

    def __init__(self, model, *, device=None, max_batch: int = 8, window: float = 0.02, max_queue: int = 64,
                 keep_results: int = 256, display_size: int = 512):
        self.max_batch = check_int("max_batch", max_batch, 1, 1024)
        self.max_queue = check_int("max_queue", max_queue, 1)
        self.keep_results = check_int("keep_results", keep_results, 1)
        self.display_size = check_int("display_size", display_size, 16)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.config = model.config
        self.classes = list(self.config.classes)
        self.counting = getattr(model, "counting_head", None) is not None
        self.settings = pipeline.map_settings(model)  # the stored ones, checked once
        self.results = ResultStore(self.keep_results)
        self.workdir = Path(tempfile.mkdtemp(prefix="weakloc-serve-"))
        self._seconds: dict[str, float] = {}  # method -> measured seconds per image (moving average)
        self._problems = {name: method_problem(model, name) for name in METHODS}
        # the requests' own work (saving uploads, reading them, new thresholds, pictures) runs on two
        # threads, not on Starlette's pool of dozens: the model's thread does the heavy work anyway,
        # and every extra thread may get its own C allocator arena (memory held, never returned)
        self._io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="weakloc-serve-io")
        self.batcher = Batcher(self._run, max_queue=self.max_queue, window=window, max_batch=self.max_batch)

    async def call(self, fn, *args):
        """``fn(*args)`` on the service's worker threads, awaited (for the web app's handlers)."""
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    def close(self) -> None:
        self.batcher.close()
        self._io.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self.workdir, ignore_errors=True)

    # --- settings -------------------------------------------------------------------------------

    @property
    def calibrated(self) -> float | None:
        return self.config.maps.threshold

    def default_threshold(self) -> float:
        """The page's first threshold: the model's calibrated one, else the default."""
        return float(self.calibrated) if self.calibrated is not None else fallback_threshold(self.config.maps.refine, DEFAULT_BOX_THRESHOLD)

    def check(self, method=None, target=None, threshold="auto", keep="all", min_area=4) -> Settings:
        """A request's settings checked before any work (an :class:`OptionError` naming the field)."""
        if method is not None and method != "":
            method = check_method(method)
            problem = self._problems.get(method)
            if problem is None:
                pipeline.map_settings(self.model, None, method=method)
            else:
                raise OptionError(f"method {method}: {problem}")
        else:
            method = None
        target = None if target in (None, "") else check_target(_as_target(target), self.classes)
        threshold = "auto" if threshold in (None, "") else threshold
        if threshold != "auto":
            threshold = check_threshold(_as_threshold(threshold), self.calibrated)
        keep = check_choice("keep", keep, KEEP)
        min_area = check_int("min_area", min_area, 0)
        return Settings(method, target, threshold, keep, min_area)

    def info(self) -> dict:
        """What the page and API clients need to know about the model."""
        cfg = self.config
        lut = colorize(torch.linspace(0, 1, 256)[None, None])[0].permute(1, 2, 0)[0].tolist()  # (256, 3)
        methods = []
        for name, m in METHODS.items():
            tier, cost = method_cost(m)
            methods.append({"name": name, "summary": m.summary, "cost": tier, "cost_detail": cost, "gradients": m.uses_gradients,
                            "usable": self._problems[name] is None, "problem": self._problems[name],
                            "seconds_per_image": self._seconds.get(name)})
        return {"classes": self.classes, "task": cfg.task, "counting": self.counting, "backbone": cfg.backbone,
                "test_size": self.settings.test_size, "method": self.settings.method,
                "threshold": {"default": self.default_threshold(), "calibrated": self.calibrated},
                "target": default_target(self.model), "methods": methods, "colormap": lut,
                "queue": self.batcher.stats(), "device": str(self.device)}

    # --- work -----------------------------------------------------------------------------------

    def submit(self, settings: Settings, items: list[tuple[Path, str]], temporary: bool = False, on_finish=None) -> Job:
        """Queue ``items`` (``(file, name shown)``) for localization with ``settings``; their files
        are removed when the job ends if ``temporary``. :class:`~weakloc.serve.batching.QueueFull`
        when the queue has no room."""
        def finished(job: Job) -> None:
            if temporary:
                for path, _ in job.items:
                    Path(path).unlink(missing_ok=True)
            if on_finish is not None:
                on_finish(job)

        job = Job(key=settings, items=list(items), payload=settings, on_finish=finished)
        try:
            return self.batcher.submit(job)
        except BaseException:
            if temporary:
                for path, _ in items:
                    Path(path).unlink(missing_ok=True)
            raise

    def _run(self, jobs: list[Job]) -> None:
        """Localize a batch of jobs of one settings key (the batcher's worker thread)."""
        settings: Settings = jobs[0].payload
        owners = [(job, path, name) for job in jobs for path, name in job.items]
        for job in jobs:
            job.result = []
        run = localize_batches(self.model, [path for _, path, _ in owners], method=settings.method, target=settings.target,
                               threshold=settings.threshold, keep=settings.keep, min_area=settings.min_area,
                               batch_size=self.max_batch, device=self.device, display_size=self.display_size)
        t0, start = time.perf_counter(), 0
        for batch in run:
            chunk, start = owners[start:start + self.max_batch], start + self.max_batch
            self._collect(batch, chunk, run, settings)
            for job, _, _ in chunk:
                job.done += 1
            if all(job.cancelled for job in jobs):
                return
        if not self.counting:
            per_image = (time.perf_counter() - t0) / max(1, len(owners))
            old = self._seconds.get(run.method)
            self._seconds[run.method] = per_image if old is None else 0.7 * old + 0.3 * per_image

    def _collect(self, batch, chunk: list, run, settings: Settings) -> None:
        """Keep each image of ``batch`` and give it (or its read error) to its job."""
        skipped = {s.file: s.reason for s in batch.skipped}
        j = 0
        for job, path, name in chunk:
            file_name = escape_text(str(path), controls=False)
            if j < len(batch.images) and batch.images[j].file_name == file_name:
                job.result.append(self._keep(batch, j, name, run, settings))
                j += 1
            else:  # read when queued, unreadable now (changed on disk): the reader's reason, the shown name
                reason = skipped.get(file_name, "could not be read")
                job.result.append(WeaklocError(f"{name}: {reason.split(': ', 1)[-1] if reason.startswith(file_name) else reason}"))

    def _keep(self, batch, j: int, name: str, run, settings: Settings) -> Kept:
        record = batch.images[j]
        boxes = [a for a in batch.annotations if a.image_id == record.id]
        boxes = [replace(a, id=n, image_id=1) for n, a in enumerate(boxes, 1)]
        record = replace(record, id=1, file_name=name)
        common = {"name": name, "record": record, "annotations": boxes, "display": batch.display[j], "method": run.method,
                  "threshold": run.threshold, "keep": settings.keep, "min_area": settings.min_area, "target": run.target}
        if isinstance(batch, RegionBatch):
            kept = Kept(_new_id(), maps=batch.maps[j].float().cpu(), targets=batch.targets[j].cpu(), scores=batch.scores[j].float().cpu(),
                        present=batch.present[j].cpu(), **common)
        else:
            assert isinstance(batch, CountBatch)
            kept = Kept(_new_id(), maps=batch.density[j][None].float().cpu(), targets=torch.tensor([-1]),
                        scores=torch.ones(1), present=torch.ones(1, dtype=torch.bool), counting=True, **common)
        self.results.add(kept)
        return kept

    # --- answers --------------------------------------------------------------------------------

    def regions(self, kept: Kept, threshold=None, keep: str | None = None, min_area: int | None = None):
        """``(boxes, masks (T, S, S), map boxes)`` of ``kept`` at ``threshold`` (None: its own)."""
        if kept.counting:
            return kept.annotations, None, None
        if threshold is None and keep is None and min_area is None:
            boxes, masks, map_boxes = region_records(kept, self.classes, kept.threshold, self.calibrated)
            return kept.annotations, masks, map_boxes  # the boxes as localize made them
        return region_records(kept, self.classes, kept.threshold if threshold is None else threshold, self.calibrated, keep, min_area)

    def document(self, kept: list[Kept], threshold=None, keep: str | None = None, min_area: int | None = None, maps: str = "none",
                 masks: str = "none") -> dict:
        """The API's answer for ``kept`` images: ``detections.json``'s ``images``, ``annotations`` and
        ``categories`` (numbered as a ``weakloc localize`` run over these images), each image
        with its ``result`` id and, on request, its maps and masks (RLE)."""
        maps = check_choice("maps", maps, MAP_FORMATS)
        masks = check_choice("masks", masks, MASK_FORMATS)
        if threshold is not None:
            threshold = check_threshold(_as_threshold(threshold), self.calibrated)
        if keep is not None:
            keep = check_choice("keep", keep, KEEP)
        if min_area is not None:
            min_area = check_int("min_area", min_area, 0)
        images, annotations = [], []
        for n, k in enumerate(kept, 1):
            boxes, mask_t, _ = self.regions(k, threshold, keep, min_area)
            for box in boxes:
                annotations.append(replace(box, id=len(annotations) + 1, image_id=n).to_dict())
            entry = replace(k.record, id=n).to_dict() | {"result": k.id, "method": k.method,
                                                         "threshold": k.threshold if threshold is None else threshold}
            if not k.counting and mask_t is not None and masks != "none":
                entry["masks_rle"] = {self.classes[int(c)]: mask_rle(self._mask(k, mask_t[t], masks))
                                      for t, c in enumerate(k.targets.tolist()) if k.present[t]}
            if maps != "none":
                entry["maps"] = [self._map_entry(k, t, maps) for t in range(len(k.targets))]
            images.append(entry)
        return {"images": images, "annotations": annotations, "categories": [{"id": i + 1, "name": c} for i, c in enumerate(self.classes)]}

    def _mask(self, kept: Kept, mask: torch.Tensor, kind: str) -> torch.Tensor:
        if kind == "map":
            return mask
        size = (kept.record.height, kept.record.width)  # as weakloc localize writes masks/*.png: nearest, original size
        return torch.nn.functional.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0] > 0.5

    def _map_entry(self, kept: Kept, t: int, kind: str) -> dict:
        cls = int(kept.targets[t])
        head = {"label": "density"} if kept.counting else {"label": self.classes[cls], "category_id": cls + 1,
                                                             "score": round(float(kept.scores[t]), 4), "present": bool(kept.present[t])}
        return head | map_json(kept.maps[t], kind)

    def overlay_png(self, kept: Kept, map_index: int = 0, threshold=None, opacity: float = 0.5) -> bytes:
        """The overlay as ``weakloc localize`` draws it (heatmap blended on the picture, boxes with
        captions; counting: density and numbered instances), for map ``map_index``."""
        from torchvision.utils import draw_keypoints

        if not 0 <= map_index < len(kept.targets):
            raise OptionError(f"map: expected 0..{len(kept.targets) - 1}, got {map_index}")
        if not 0 <= opacity <= 1:
            raise OptionError(f"opacity: expected a number in [0, 1], got {opacity}")
        shown = kept.display
        dh, dw = shown.shape[-2:]
        heat = upsample(kept.maps[map_index][None], (dh, dw), mode="bilinear").clamp(0, 1)
        picture = blend(shown[None], heat, alpha=opacity)[0]
        if kept.counting:
            sx, sy = dw / kept.record.width, dh / kept.record.height
            boxes = torch.tensor([[a.bbox[0] * sx, a.bbox[1] * sy, (a.bbox[0] + a.bbox[2]) * sx - 1, (a.bbox[1] + a.bbox[3]) * sy - 1]
                                  for a in kept.annotations]).reshape(-1, 4)
            labels = [f"{a.label} {a.instance}" for a in kept.annotations]
            picture = draw_detections(picture, boxes, labels)
            if kept.annotations:
                points = torch.tensor([[a.point[0] * sx, a.point[1] * sy] for a in kept.annotations])[None]
                picture = draw_keypoints(picture, points, colors="white", radius=3)
            return png_bytes(picture)
        _, _, map_boxes = self.regions(kept, threshold)
        h, w = kept.maps.shape[-2:]
        drawn, labels = [], []
        for t, b in enumerate(map_boxes):
            if kept.present[t] and len(b):
                drawn.append(scale_boxes(b, (h, w), (dh, dw)))
                labels += [f"{self.classes[int(kept.targets[t])]} {float(kept.scores[t]):.2f}"] * len(b)
        return png_bytes(draw_detections(picture, torch.cat(drawn) if drawn else torch.zeros(0, 4), labels))


def _new_id() -> str:
    import secrets

    return secrets.token_hex(8)


def _as_target(value) -> str | int:
    """A target from a form field: a class index when it is a whole number, else the text."""
    text = str(value).strip()
    return int(text) if text.isdigit() else text


def _as_threshold(value) -> str | float:
    """A threshold from a form field (text): a number when it reads as one."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    try:
        kind, number = parse_threshold(text)
    except WeaklocError:
        return text  # check_threshold names the problem
    return number if kind == "fixed" and math.isfinite(number) else text
