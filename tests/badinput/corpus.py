"""The whole corpus, and the shared inputs its cases copy from."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

from .harness import Assets, Case

CLASSES = ["triangle", "square", "star"]
IMAGE_SIZE = 32


def build_assets(root: Path) -> Assets:
    """One tiny model and one tiny synthetic dataset for every case (cases copy, never write them).

    The model is a random ``test_resnet`` at 32 px (no training: the corpus tests what weakloc does
    with bad input, not how well it localizes); the data are 12 synthetic 32-px images with a
    labels CSV (split: every third image val), a counts CSV and COCO annotations.
    """
    import torch

    from weakloc.data.synthetic import SyntheticConfig, write_synthetic
    from weakloc.models import ModelConfig, WeaklocNet, save_model

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="test_resnet", classes=list(CLASSES), input_size=IMAGE_SIZE, output_stride=8, drop_rate=0.0)
    model = save_model(WeaklocNet(cfg, pretrained="none").eval(), root / "model")
    data = write_synthetic(root / "data", SyntheticConfig(n_images=12, size=IMAGE_SIZE, classes=tuple(CLASSES), val_fraction=0.3, seed=1))
    for name in ("labels.csv", "counts.csv"):  # a fixed split: the corpus must not depend on the seeded draw
        rows = list(csv.reader((data / name).read_text().splitlines()))
        for n, row in enumerate(rows[1:]):
            row[-1] = "val" if n % 3 == 2 else "train"
        with open(data / name, "w", newline="") as f:
            csv.writer(f).writerows(rows)
    return Assets(root=root, model=model, data=data)


def warm_up(assets: Assets) -> None:
    """Import and run once, in the test process, what every case needs: the workers forked from it
    then start warm (no import, no first-call initialisation per case)."""
    import importlib

    import torch

    for name in ("weakloc.cli", "weakloc.train", "weakloc.train.fit", "weakloc.evaluate.run", "weakloc.evaluate.calibrate",
                 "weakloc.evaluate.explain_eval", "weakloc.evaluate.counting", "weakloc.localize.run", "weakloc.explain.run",
                 "weakloc.data.counts", "weakloc.data.annotations", "weakloc.demo", "torchvision.io", "cv2", "yaml"):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module another helper is editing: the case that needs it reports it
            pass
    try:
        import typer.main

        from weakloc.cli import app
        from weakloc.data.images import read_image
        from weakloc.models import load_model

        typer.main.get_command(app)
        with torch.no_grad():
            load_model(assets.model)(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE))
        read_image(next((assets.data / "images").iterdir()))
    except Exception:  # noqa: BLE001
        pass


def all_cases() -> list[Case]:
    from . import cases_annotations, cases_api, cases_images, cases_labels, cases_models, cases_options

    cases: list[Case] = []
    for mod in (cases_images, cases_labels, cases_annotations, cases_models, cases_options, cases_api):
        cases += mod.cases()
    dup = [k for k, n in Counter(c.id for c in cases).items() if n > 1]
    assert not dup, f"duplicate case ids: {dup}"
    return cases
