"""Checks of what a command wrote, per outcome: ``check(env, result)`` raises AssertionError.

They read the files a command promises (detections.json, maps.json, the report, the model's
config) rather than its wording, except where the wording *is* the promise (a skipped file named).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .harness import Env, Result


def _base(name: str) -> str:
    return os.path.basename(str(name))


def spellings(name: str) -> set[str]:
    """How a file name may be written out: as is, undecodable bytes as ``\\xNN`` (surrogateescape
    then backslashreplace), control characters escaped as Python writes them."""
    raw = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    ctl = "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in raw)
    return {name, raw, ctl}


def _named(name: str, names) -> bool:
    names = set(names)
    return any(s in names for s in spellings(name))


def _load(path: Path) -> dict:
    assert path.is_file(), f"{path.name} was not written"
    return json.loads(path.read_text(encoding="utf-8"))


def _finite_probs(probs, what: str, single: bool = True) -> None:
    assert probs, f"{what}: no probabilities"
    assert all(isinstance(p, (int, float)) and math.isfinite(p) and -1e-6 <= p <= 1 + 1e-6 for p in probs), \
        f"{what}: probabilities not finite in [0, 1]: {probs}"
    if single:
        assert abs(sum(probs) - 1) < 0.01, f"{what}: softmax probabilities sum to {sum(probs)}"


def box_inside(bbox, width: int, height: int, what: str) -> None:
    """A COCO ``[x, y, w, h]`` box of positive size inside a ``width x height`` image (0.1 px rounding)."""
    x, y, w, h = bbox
    assert all(math.isfinite(v) for v in bbox), f"{what}: box {bbox} is not finite"
    assert w > 0 and h > 0, f"{what}: box {bbox} has no area"
    assert x >= -0.1 and y >= -0.1 and x + w <= width + 0.11 and y + h <= height + 0.11, \
        f"{what}: box {bbox} leaves the {width}x{height} image"


SKIP_WORDS = ("skip", "ignor", "could not", "cannot", "unreadable", "duplicate", "drop", "repeat", "not used", "left out",
              "not scored", "not evaluated", "not read")


def mentions_skip(text: str, name: str) -> None:
    """``text`` names ``name`` (or one of its ``|``-separated alternatives) and says it was left out."""
    names = name.split("|")
    assert any(s in text for n in names for s in spellings(n)), f"the output does not name {name!r}"
    low = text.lower()
    assert any(w in low for w in SKIP_WORDS), "the output does not say it was skipped"


# --- localize / explain ------------------------------------------------------------------------


def localized(names: list[str] | None = None, sizes: dict | None = None, n_images: int | None = None,
              escaped_html: str | None = None, pictures: bool = True):
    """localize wrote detections.json with an entry per image of ``names`` (base names), of the
    real size, every box inside its image, probabilities finite; overlays (unless not ``pictures``:
    then none) and index.html exist."""

    def check(env: Env, res: Result) -> None:
        out = env.out
        doc = _load(out / "detections.json")
        images = doc["images"]
        by_name = {_base(im["file_name"]): im for im in images}
        if n_images is not None:
            assert len(images) == n_images, f"{len(images)} image(s) localized, expected {n_images}"
        for name in names or []:
            hit = [s for s in spellings(name) if s in by_name]
            assert hit, f"{name!r} missing from detections.json (has {sorted(by_name)[:5]})"
            im = by_name[hit[0]]
            if sizes and name in sizes:
                assert (im["width"], im["height"]) == tuple(sizes[name]), f"{name}: size {im['width']}x{im['height']}, real {sizes[name]}"
        classes = [c["name"] for c in doc["categories"]]
        sizes_by_id = {im["id"]: (im["width"], im["height"]) for im in images}
        for im in images:
            if "probabilities" in im:
                _finite_probs(im["probabilities"], im["file_name"], single=len(classes) > 1 and abs(sum(im["probabilities"]) - 1) < 0.5)
        for a in doc["annotations"]:
            w, h = sizes_by_id[a["image_id"]]
            box_inside(a["bbox"], w, h, f"detection {a['id']}")
            assert 0 <= a["score"] <= 1, f"detection {a['id']}: score {a['score']}"
        overlays = list((out / "overlays").glob("*.png")) if (out / "overlays").is_dir() else []
        if pictures:
            assert len(overlays) >= len(images), f"{len(overlays)} overlay(s) for {len(images)} image(s)"
            missing = [im["file_name"] for im in images if not (out / im.get("overlay", "-")).is_file()]
            assert not missing, f"the overlay named in detections.json is missing for {missing[:3]}"
        else:
            assert not overlays and not any("overlay" in im for im in images), "pictures were drawn though none were asked for"
        html = (out / "index.html")
        assert html.is_file(), "index.html was not written"
        if escaped_html:
            assert escaped_html not in html.read_text(encoding="utf-8", errors="replace"), \
                f"index.html holds the raw markup {escaped_html!r} of a file name"

    return check


def _skipped(name: str, good, listing: str, file_key: str, verb: str):
    """The command reported ``name`` as skipped (output and ``listing``'s skipped list) and still did
    the ``good`` images (``listing``'s images, named by ``file_key``)."""

    def check(env: Env, res: Result) -> None:
        mentions_skip(res.text, name)
        doc = _load(env.out / listing)
        skipped = [_base(s["file"]) for s in doc.get("skipped", [])]
        assert _named(name, skipped), f"{name!r} not in {listing}'s skipped list {skipped}"
        done = {_base(im[file_key]) for im in doc["images"]}
        assert set(good) <= done, f"good image(s) {sorted(set(good) - done)} not {verb}"

    return check


def localize_skipped(name: str, good: list[str] = ("good.png",)):
    """localize reported ``name`` as skipped (output and detections.json) and still did the good images."""
    return _skipped(name, good, "detections.json", "file_name", "localized")


def explained(names: list[str] | None = None, sizes: dict | None = None, n_images: int | None = None,
              escaped_html: str | None = None):
    """explain wrote maps.json with an entry per image, maps.safetensors with finite maps in [0, 1]."""

    def check(env: Env, res: Result) -> None:
        from safetensors.torch import load_file

        doc = _load(env.out / "maps.json")
        by_name = {_base(im["file"]): im for im in doc["images"]}
        if n_images is not None:
            assert len(doc["images"]) == n_images, f"{len(doc['images'])} image(s) explained, expected {n_images}"
        for name in names or []:
            hit = [s for s in spellings(name) if s in by_name]
            assert hit, f"{name!r} missing from maps.json"
            if sizes and name in sizes:
                im = by_name[hit[0]]
                assert (im["width"], im["height"]) == tuple(sizes[name]), f"{name}: size {im['width']}x{im['height']}, real {sizes[name]}"
        for im in doc["images"]:
            _finite_probs(im["probabilities"], im["file"], single=abs(sum(im["probabilities"]) - 1) < 0.5)
        if doc["images"]:
            maps = load_file(str(env.out / "maps.safetensors"))
            for k, v in maps.items():
                if k.endswith(".normalized"):
                    assert bool(v.isfinite().all()) and float(v.min()) >= 0 and float(v.max()) <= 1, f"{k}: not finite in [0, 1]"
        assert (env.out / "index.html").is_file(), "index.html was not written"
        if escaped_html:
            assert escaped_html not in (env.out / "index.html").read_text(encoding="utf-8", errors="replace"), \
                f"index.html holds the raw markup {escaped_html!r}"

    return check


def explain_skipped(name: str, good: list[str] = ("good.png",)):
    """explain reported ``name`` as skipped (output and maps.json) and still did the good images."""
    return _skipped(name, good, "maps.json", "file", "explained")


# --- evaluate / calibrate -----------------------------------------------------------------------


def evaluated(min_images: int = 1, samples: int | None = None):
    """evaluate wrote the report (``{out}/report.json``) with metrics in [0, 100]."""

    def check(env: Env, res: Result) -> None:
        rep = _load(env.out / "report.json")
        assert rep["images"] >= min_images, f"{rep['images']} image(s) evaluated"
        if samples is not None:
            assert rep["localization_samples"] == samples, f"{rep['localization_samples']} localization sample(s), expected {samples}"
        for k in ("MaxBoxAccV2", "IoU50", "GT-known Loc"):
            v = rep["localization"][k]
            assert math.isfinite(v) and 0 <= v <= 100, f"{k} = {v}"
        for k, v in rep["classification"].items():
            assert isinstance(v, (int, float)) and math.isfinite(v), f"classification {k} = {v}"

    return check


def evaluate_skipped(name: str):
    """evaluate ran, and its output names ``name`` as skipped / ignored."""

    def check(env: Env, res: Result) -> None:
        mentions_skip(res.text, name)

    return check


def calibrated(model_key: str = "model", test_sizes: tuple[int, ...] | None = None):
    """calibrate stored, in the model's format-2 ``config.json``, a threshold in [0, 1] and its
    source (and, given ``test_sizes``, a ``maps.test_size`` among them or the training size)."""

    def check(env: Env, res: Result) -> None:
        cfg = _load(Path(env[model_key]) / "config.json")
        assert cfg.get("format_version") == 2 and "localization" not in cfg, \
            f"calibrate wrote format {cfg.get('format_version')} (keys {sorted(cfg)[:8]}...), not format 2's maps"
        tau = cfg["maps"].get("threshold")
        assert isinstance(tau, (int, float)) and 0 <= tau <= 1, f"stored threshold {tau}"
        assert "threshold" in cfg["maps"].get("sources", {}), "calibrate did not record where maps.threshold came from"
        if test_sizes is not None:
            size = cfg["maps"].get("test_size")
            assert size is None or size in (*test_sizes, cfg["input_size"]), f"stored test size {size}, candidates {test_sizes}"

    return check


# --- training -----------------------------------------------------------------------------------


def reached_training(classes: list[str] | None = None, n_train: int | None = None, n_val: int | None = None):
    """The options were accepted and training would start (``Trainer.fit`` stub), with these data."""

    def check(env: Env, res: Result) -> None:
        got = res.reached_training
        assert got is not None, "training did not start"
        model = got["module"].model
        if classes is not None:
            assert sorted(model.config.classes) == sorted(classes), f"classes {model.config.classes}, expected {classes}"
        if n_train is not None:
            assert len(got["train"].dataset) == n_train, f"{len(got['train'].dataset)} training image(s), expected {n_train}"
        if n_val is not None:
            assert len(got["val"].dataset) == n_val, f"{len(got['val'].dataset)} validation image(s), expected {n_val}"

    return check
