"""A torch ``Dataset`` over :class:`LabeledImages`, with the train/eval transforms.

An image that fails to decode is returned as ``None`` and dropped by :func:`collate_skip_bad`,
which counts it, so one bad file never stops an epoch.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from weakloc.data.images import read_image
from weakloc.report.overlay import fit_size
from weakloc.data.labels import LabeledImages
from weakloc.errors import ImageReadError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RandomTranspose(torch.nn.Module):
    """Swap height and width with probability ``p``; with both flips this gives all 8 dihedral
    orientations (the 90-degree rotations among them)."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = p

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``(C, H, W)`` -> ``(C, H, W)`` or ``(C, W, H)``."""
        return image.transpose(-1, -2) if torch.rand(()) < self.p else image


def train_transform(size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_scale: tuple[float, float] = (0.35, 1.0),
                    dihedral: bool = False) -> v2.Transform:
    """Random resized crop, horizontal flip (with ``dihedral``, also vertical flip and transpose: any
    of the 8 right-angle orientations, for top-down images such as microscopy), light colour jitter,
    then normalisation.

    Input ``(3, H, W)`` uint8, output ``(3, size, size)`` float32.
    """
    flips = [v2.RandomHorizontalFlip()] + ([v2.RandomVerticalFlip(), RandomTranspose()] if dihedral else [])
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=crop_scale, antialias=True),
        *flips,
        v2.ColorJitter(0.2, 0.2, 0.2, 0.02),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])


def eval_transform(size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> v2.Transform:
    """Resize to ``size x size`` with no crop (the WSOL protocol), then normalise."""
    return v2.Compose([
        v2.Resize((size, size), antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])


class ImageDataset(Dataset):
    """``(image, target, index)`` per item, or ``None`` when the image cannot be decoded.

    Args:
        data: labelled images; ``targets`` may be None for unlabelled inference.
        transform: maps ``(3, H, W)`` uint8 to the model's input tensor.
    """

    def __init__(self, paths: list[Path], targets: torch.Tensor | None, transform: v2.Transform):
        self.paths = list(paths)
        self.targets = targets
        self.transform = transform

    @classmethod
    def from_labels(cls, data: LabeledImages, transform: v2.Transform) -> "ImageDataset":
        """Targets are the labels' ``targets``; with counting labels, ``[presence (K), counts (K)]``."""
        targets = data.targets if data.counts is None else torch.cat([data.targets.float(), data.counts.float()], 1)
        return cls(data.paths, targets, transform)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            img = read_image(self.paths[i])
        except ImageReadError:
            return None
        target = self.targets[i] if self.targets is not None else torch.tensor(-1)
        return self.transform(img), target, i


def collate_skip_bad(items: list) -> dict:
    """Stack the good items of a batch; count the ones that failed to decode.

    Returns:
        dict with ``image (B, 3, S, S)``, ``target``, ``index (B,)`` and ``skipped`` (int).
        When every item failed, ``image`` is None.
    """
    good = [it for it in items if it is not None]
    skipped = len(items) - len(good)
    if not good:
        return {"image": None, "target": None, "index": None, "skipped": skipped}
    images, targets, idx = zip(*good)
    return {
        "image": torch.stack(images),
        "target": torch.stack(targets),
        "index": torch.tensor(idx, dtype=torch.long),
        "skipped": skipped,
    }


class PredictDataset(Dataset):
    """For inference on unlabelled files: ``(index, model input, (H, W) original size, display image)``.

    An unreadable file gives ``(index, None, reason, None)`` so callers can report and skip it. The
    display image is the original resized for pictures (longest side 256..``display`` px).
    """

    def __init__(self, paths: list[Path], size: int, mean, std, display: int = 512):
        self.paths, self.tf, self.display = list(paths), eval_transform(size, mean, std), display

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            img = read_image(self.paths[i])
        except ImageReadError as e:
            return i, None, str(e), None
        h, w = img.shape[-2:]
        dh, dw = fit_size(h, w, self.display)
        shown = torch.nn.functional.interpolate(img[None].float(), size=(dh, dw), mode="bilinear", antialias=True)[0].round().to(torch.uint8)
        return i, self.tf(img), (h, w), shown


def collate_list(items: list) -> list:
    """Keep a batch as a list (items of different sizes)."""
    return items
