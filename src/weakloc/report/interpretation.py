"""``interpretation.html``: where the model looked when it was wrong.

:func:`write_interpretation` draws an :class:`~weakloc.evaluate.interpretation.Interpretation`
(overlays through :mod:`weakloc.report.overlay`, the page through :mod:`weakloc.report.html`);
:func:`top_losses` computes and writes it (``weakloc report``, and fastai's
``interp.plot_top_losses(k, heatmap=True)``); :func:`after_training` does it on a training run's
validation images (the end of ``weakloc train``).
"""

from __future__ import annotations

import dataclasses
import html
from pathlib import Path

from weakloc.config import MapConfig
from weakloc.errors import OptionError
from weakloc.evaluate.interpretation import Case, Interpretation, interpret
from weakloc.explain.maps import upsample
from weakloc.report.html import write_page
from weakloc.report.overlay import blend, save_png
from weakloc.report.paths import OutputFolder, page_link, safe_component
from weakloc.text import escape_text

PAGE = "interpretation"
_TASKS = {"single": "single-label", "multi": "multi-label", "yes/no": "yes/no"}

_STYLE = """<style>
.case{background:#fff;border-radius:8px;box-shadow:0 1px 3px #0002;padding:8px;margin:10px 0;font-size:12px}
.case .head{font-weight:600;margin-bottom:6px;word-break:break-all}.case .wrong{color:#c62828}.case .right{color:#2e7d32}
.panels{display:flex;gap:10px;flex-wrap:wrap}.panel{width:220px}.panel img{width:100%;border-radius:4px}
.panel .cap{margin-top:3px}.row{display:flex;gap:10px;flex-wrap:wrap}.row .case{width:480px}
</style>"""


def _t(value) -> str:
    """Any value as HTML text: control characters and undecodable bytes as ``\\xNN``, then escaped."""
    return html.escape(escape_text(str(value)))


def _table(head: list[str], rows: list[list]) -> str:
    cells = "".join(f"<th>{_t(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_t(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def confusion_table(result: Interpretation) -> str:
    """The confusion matrix as an HTML table: true classes down, predicted across (single-label,
    yes/no), or per class TN / FP / FN / TP (multi-label)."""
    m = result.confusion.tolist()
    if result.task == "multi":
        return _table(["class", "true negatives", "false positives", "false negatives", "true positives"],
                      [[c, *m[k][0], *m[k][1]] for k, c in enumerate(result.classes)])
    return _table(["true \u2193 / predicted \u2192", *result.classes], [[c, *m[k]] for k, c in enumerate(result.classes)])


class InterpretationWriter:
    """Writes the page's pictures into ``out/interpretation/``: each image once, and each
    (image, class) overlay once, however many sections show it. Names come from
    :func:`~weakloc.report.paths.safe_component`, so every file stays inside ``out``."""

    def __init__(self, out: str | Path | OutputFolder, result: Interpretation):
        self.out = out if isinstance(out, OutputFolder) else OutputFolder(out)
        self.result = result
        self._files: dict[tuple[int, int | None], Path] = {}
        used: set[str] = set()
        self._class_files = {k: safe_component(c, used) for k, c in enumerate(result.classes)}
        self._stems = {c.image: safe_component(Path(c.file).stem) for c in result.cases()}

    def picture(self, image: int) -> Path | None:
        """The image's picture as PNG (None when it could not be read for the maps)."""
        if (image, None) not in self._files:
            shown = self.result.pictures.get(image)
            if shown is None:
                return None
            stem = f"{image:05d}_{self._stems.get(image, '')}"
            self._files[(image, None)] = save_png(shown, self.out.file(PAGE, stem, ".png"), self.out.root)
        return self._files[(image, None)]

    def overlay(self, image: int, cls: int) -> Path | None:
        """The image's heatmap of class ``cls`` over its picture, as PNG (None without a map)."""
        if (image, cls) not in self._files:
            shown, heat = self.result.pictures.get(image), self.result.maps.get((image, cls))
            if shown is None or heat is None:
                return None
            disp = upsample(heat[None], tuple(shown.shape[-2:]), mode="bilinear").clamp(0, 1)
            over = blend(shown[None].to(disp.device), disp)[0]
            stem = f"{image:05d}_{self._stems.get(image, '')}_{self._class_files[cls]}"
            self._files[(image, cls)] = save_png(over, self.out.file(PAGE, stem, ".png"), self.out.root)
        return self._files[(image, cls)]

    def _img(self, path: Path | None, caption: str) -> str:
        if path is None:
            return f'<div class="panel"><div class="cap">{_t(caption)}: no map (the image could not be read again)</div></div>'
        src = html.escape(page_link(path, self.out.root))
        return f'<div class="panel"><a href="{src}"><img src="{src}" loading="lazy"></a><div class="cap">{_t(caption)}</div></div>'

    def case_html(self, case: Case, number: int | None = None) -> str:
        """One case: a line of what it is, then the picture and its heatmaps side by side."""
        r = self.result
        verdict = '<span class="right">right</span>' if case.correct else '<span class="wrong">wrong</span>'
        about = f"{case.label}: " if case.label is not None else ""
        head = (f"{'' if number is None else f'#{number} · '}{verdict} · {_t(about)}loss {case.loss:.3f} · "
                f"true {_t(', '.join(case.true) or '(none)')} (p {case.probability_true:.3f}) · "
                f"predicted {_t(', '.join(case.predicted) or '(none)')} (confidence {case.confidence:.3f})")
        panels = [self._img(self.picture(case.image), "image")]
        for p in case.panels:
            panels.append(self._img(self.overlay(case.image, p.class_index), f"{p.role}: {p.class_name} ({r.method})"))
        return f'<div class="case"><div class="head">{head}</div><div class="name">{_t(case.file)}</div>' \
               f'<div class="panels">{"".join(panels)}</div></div>'

    def page(self) -> Path:
        """Write ``out/interpretation.html`` (and the pictures it shows); returns its path."""
        r = self.result
        summary = [f"{r.images} {r.split} image(s) of a {_TASKS.get(r.task, r.task)} model ({len(r.classes)} class(es)); accuracy {r.accuracy:.1f}%",
                   f"prediction: {r.decision}",
                   f"maps: {r.method} at {r.test_size} px, normalised to [0, 1] per map (red: where the model looked)"]
        summary += [f"note: {n}" for n in r.notes]
        if r.skipped:
            summary.append(f"{len(r.skipped)} image(s) could not be read and are left out: "
                           + "; ".join(f"{s.file}: {s.reason}" for s in r.skipped[:5]) + ("; ..." if len(r.skipped) > 5 else ""))
        sections = [("", _STYLE + "".join(f'<p class="note">{_t(line)}</p>' for line in summary)),
                    ("Confusion matrix", confusion_table(r)),
                    (f"Top {len(r.top_losses)} losses", "".join(self.case_html(c, n) for n, c in enumerate(r.top_losses, 1))
                     or '<p class="note">no case</p>')]
        for name in r.classes:
            most, least = r.most_confident.get(name, []), r.least_confident.get(name, [])
            if not most and not least:
                body = '<p class="note">no correctly classified image of this class</p>'
            else:
                body = ('<h3>most confident</h3><div class="row">' + "".join(self.case_html(c) for c in most) + "</div>"
                        + ('<h3>least confident</h3><div class="row">' + "".join(self.case_html(c) for c in least) + "</div>"
                           if least else ""))
            sections.append((f"Correct: {name}", body))
        return write_page(self.out.file(None, PAGE, ".html"), "weakloc — where it looked when it was wrong", sections)


def write_interpretation(result: Interpretation, out: str | Path) -> Path:
    """Write ``out/interpretation.html`` and its pictures (``out/interpretation/*.png``) for ``result``."""
    return InterpretationWriter(out, result).page()


def top_losses(model, data, out: str | Path, *, k: int = 12, per_class: int = 3, split: str = "auto", method: str | None = None,
               maps: MapConfig | dict | None = None, batch_size: int = 16, device=None, progress=None) -> Interpretation:
    """The confusion matrix, the ``k`` top losses with the heatmaps of their predicted and true
    classes side by side, and per class the ``per_class`` most and least confident correct images
    with theirs, written to ``out/interpretation.html`` (pictures in ``out/interpretation/``).

    Args:
        model, data, k, per_class, split, method, maps, batch_size, device, progress: see
            :func:`~weakloc.evaluate.interpretation.interpret`.
        out: the output folder.

    Returns:
        the :class:`~weakloc.evaluate.interpretation.Interpretation` drawn.
    """
    if out is None:
        raise OptionError("out: top_losses needs an output folder")
    folder = OutputFolder(out)  # checked before any work
    result = interpret(model, data, k=k, per_class=per_class, split=split, method=method, maps=maps, batch_size=batch_size,
                       device=device, progress=progress)
    InterpretationWriter(folder, result).page()
    return result


def after_training(result, data, out: str | Path, *, val=None, positive: str | None = None, k: int = 12, per_class: int = 3,
                   batch_size: int = 16, device=None) -> Path:
    """``out/interpretation.html`` of a training run (:class:`~weakloc.train.fit.TrainResult`) on its
    validation images: ``val`` when given, else the split ``fine_tune`` made of ``data`` (the same
    seed and fraction)."""
    from weakloc.train.fit import load_training_data

    folder = OutputFolder(out)
    model = result.model
    _, val_set = load_training_data(data, val, positive, model.config.train)
    found = interpret(model, val_set, k=k, per_class=per_class, split="all", batch_size=batch_size, device=device)
    return InterpretationWriter(folder, dataclasses.replace(found, split="validation")).page()
