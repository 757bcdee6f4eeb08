"""A torch ``Dataset`` over :class:`LabeledImages`, with the train/eval transforms.

An image that fails to decode is returned as a :class:`SkippedImage` (its index, path and reason)
and dropped by :func:`collate_skip_bad`, which lists it in the batch, so one bad file never stops
an epoch and every skipped file can be reported by name (:class:`SkipLog`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from weakloc.data.images import read_image, read_jpeg_data
from weakloc.data.labels import LabeledImages
from weakloc.errors import ImageReadError
from weakloc.text import display_path


class RandomTranspose(torch.nn.Module):
    """Swap height and width with probability ``p``; with both flips this gives all 8 dihedral
    orientations (the 90-degree rotations among them)."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = p

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``(C, H, W)`` -> ``(C, H, W)`` or ``(C, W, H)``."""
        return image.transpose(-1, -2) if torch.rand(()) < self.p else image


def train_transform(size: int, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                    crop_scale: tuple[float, float] = (0.35, 1.0), dihedral: bool = False) -> v2.Transform:
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


def eval_transform(size: int, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> v2.Transform:
    """Resize to ``size x size`` with no crop (the WSOL protocol), then normalise."""
    return v2.Compose([
        v2.Resize((size, size), antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])


def derived_seed(*keys: int) -> int:
    """A 63-bit seed mixed from non-negative integers (numpy's ``SeedSequence``): nearby keys --
    (seed, epoch) and (seed, epoch + 1) -- give unrelated streams, unlike ``seed + epoch``."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass(eq=False)
class EpochSampler(Sampler):
    """The training draws of each epoch, fixed by (``seed``, epoch): which images in which order,
    and a seed for each draw's augmentation. A run stopped at an epoch's end and resumed sees the
    same images with the same crops, flips and colours as one never stopped, whatever the number
    of loader workers (whose own random streams would otherwise carry the augmentation, and start
    afresh on a resume). Lightning calls :meth:`set_epoch` at each epoch's start;
    :class:`EpochLoader` resumes one within an epoch.

    Yields ``(index, draw_seed)`` pairs, which :class:`ImageDataset` takes as indices.

    Args:
        n: images in the dataset.
        seed: the run's seed.
        weights: ``(n,)`` draw weights: ``n`` draws with replacement in proportion (the class
            balance of :func:`~weakloc.train.fit.balanced_sampler`); None: a permutation.
        rank, num_replicas: with several training processes, each takes every
            ``num_replicas``-th draw from ``rank`` of one order shared by all, the order padded by
            repeating its start so that every process makes as many steps (as
            ``torch.utils.data.DistributedSampler`` does).
        epoch: whose draws; skip: how many of them (this process's) were taken before a stop, left
            out when the epoch resumes.
    """

    n: int
    seed: int = 0
    weights: torch.Tensor | None = None
    rank: int = 0
    num_replicas: int = 1
    epoch: int = 0
    skip: int = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw ``epoch``'s order (a resumed epoch, set already, keeps its skip)."""
        if int(epoch) != self.epoch:
            self.epoch, self.skip = int(epoch), 0

    def shard(self, rank: int, num_replicas: int) -> "EpochSampler":
        """This sampler's share for process ``rank`` of ``num_replicas``."""
        return replace(self, rank=rank, num_replicas=num_replicas)

    def draws(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This epoch's ``(indices, draw_seeds)``, each ``(len(self),)`` int64, for this process."""
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
        if self.weights is None:
            order = torch.randperm(self.n, generator=generator)
        else:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=generator)
        seeds = torch.randint(0, 2 ** 62, (self.n,), generator=generator)
        total = len(self) * self.num_replicas
        if total > self.n:  # pad by repeating the start (more than once when there are fewer images than processes)
            order, seeds = order.repeat(math.ceil(total / self.n))[:total], seeds.repeat(math.ceil(total / self.n))[:total]
        return order[self.rank::self.num_replicas], seeds[self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order, seeds = self.draws()
        return zip(order[self.skip:].tolist(), seeds[self.skip:].tolist())

    def __len__(self) -> int:
        """The epoch's draws for this process, a resumed epoch's skipped ones included."""
        return math.ceil(self.n / self.num_replicas)


class EpochLoader(DataLoader):
    """A ``DataLoader`` over an :class:`EpochSampler` that knows its place in the epoch's draws:
    ``state_dict`` / ``load_state_dict`` (one of Lightning's stateful loaders, so Lightning keeps
    the state in each checkpoint; ``ClassifierModule`` gives it back on a resume). A run stopped
    between two batches continues with the next batch of the same draws, not a new shuffle. Its
    iterator starts at its first batch, not before, so a place or epoch set after ``iter()`` still
    counts (Lightning calls ``iter()`` before ``set_epoch`` on a resume). Its length is the whole
    epoch's."""

    sampler: EpochSampler

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._batches = 0  # of the current epoch, given out by this loader's iterators

    def __iter__(self):
        self._batches = self.sampler.skip // self.batch_size
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "batches": self._batches}

    def load_state_dict(self, state: dict) -> None:
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self):  # stopped at the epoch's end: the next one starts
            epoch, batches = epoch + 1, 0
        self.sampler.epoch, self.sampler.skip = epoch, batches * self.batch_size


class SkippedImage(NamedTuple):
    """An image a loader could not decode: its index in the dataset, its path and why (one line,
    without the file name)."""

    index: int
    path: Path
    reason: str

    @property
    def message(self) -> str:
        """``"<file>: <reason>"``, the file named by :func:`~weakloc.text.display_path`."""
        return f"{display_path(self.path)}: {self.reason}"


class ImageDataset(Dataset):
    """Images read from ``paths`` and transformed: ``(image, target, index)`` per item, or a
    :class:`SkippedImage` when the file cannot be decoded (batch with :func:`collate_skip_bad`).

    Build it from labels with :meth:`from_labels`.

    Args:
        paths: the image files, in item order.
        targets: ``(N, ...)`` one row per path (class indices, multi-hot rows or presence and
            counts), or None for unlabelled images (each item's target is then ``tensor(-1)``).
        transform: maps ``(3, H, W)`` uint8 to the model's input tensor (:func:`train_transform`,
            :func:`eval_transform`).
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

    def __getitem__(self, item: int | tuple[int, int]):
        """Item ``i``; given ``(i, draw_seed)`` (what :class:`EpochSampler` yields), its random
        transform draws from that seed, and the caller's random stream is left as it was."""
        i, draw_seed = item if isinstance(item, tuple) else (item, None)
        try:
            img = read_image(self.paths[i])
        except ImageReadError as e:
            return SkippedImage(i, Path(self.paths[i]), getattr(e, "reason", None) or str(e))
        target = self.targets[i] if self.targets is not None else torch.tensor(-1)
        if draw_seed is None:
            return self.transform(img), target, i
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(draw_seed)
            return self.transform(img), target, i


def collate_skip_bad(items: list) -> dict:
    """Stack the good items of a batch; list the ones that failed to decode.

    Items are ``(image, target, index)`` or :class:`SkippedImage` (``None`` also counts as skipped,
    without a name).

    Returns:
        dict with ``image (B, 3, S, S)``, ``target``, ``index (B,)``, ``skipped`` (int: items that
        failed) and ``skipped_images`` (the :class:`SkippedImage` of each, in batch order). When
        every item failed, ``image``, ``target`` and ``index`` are None.
    """
    good = [it for it in items if it is not None and not isinstance(it, SkippedImage)]
    skipped_images = [it for it in items if isinstance(it, SkippedImage)]
    skipped = len(items) - len(good)
    if not good:
        return {"image": None, "target": None, "index": None, "skipped": skipped, "skipped_images": skipped_images}
    images, targets, idx = zip(*good)
    return {
        "image": torch.stack(images),
        "target": torch.stack(targets),
        "index": torch.tensor(idx, dtype=torch.long),
        "skipped": skipped,
        "skipped_images": skipped_images,
    }


class SkipLog:
    """The images a run's loaders skipped: each file once (its first reason), in the order met.

    Feed it the batches of :func:`collate_skip_bad` in the main process -- ``log.add_batch(batch)``
    in a training/validation step, or ``for batch in log.track(loader)``. The batch carries the
    skipped files out of data-loader worker processes, where a list kept on the dataset would stay
    (each worker holds its own copy of the dataset).

    ``len(log)`` is the number of distinct files, ``log.events`` how many times any was skipped (a
    training image is met again every epoch). ``log.write(out / "skipped.txt")`` lists them, one
    line per file: the file (:func:`~weakloc.text.display_path`: no tab, newline or
    undecodable byte left), a tab, the reason; :meth:`summary` is the line to print.
    """

    def __init__(self, items: Iterable[SkippedImage] = ()):
        self._items: dict[str, SkippedImage] = {}
        self.events = 0
        for it in items:
            self.add(it)

    def add(self, item: SkippedImage) -> None:
        """Record one skipped image (a file already listed keeps its first reason)."""
        self.events += 1
        self._items.setdefault(os.fspath(item.path), item)

    def add_batch(self, batch: dict) -> dict:
        """Record the skipped images of a :func:`collate_skip_bad` batch; returns the batch."""
        for item in batch.get("skipped_images", ()):
            self.add(item)
        self.events += batch.get("skipped", 0) - len(batch.get("skipped_images", ()))  # unnamed (None) items
        return batch

    def track(self, batches: Iterable[dict]) -> Iterator[dict]:
        """The batches, each recorded as it passes."""
        for batch in batches:
            yield self.add_batch(batch)

    def update(self, other: "SkipLog") -> None:
        """Add the files (and events) of another log."""
        for item in other:
            self._items.setdefault(os.fspath(item.path), item)
        self.events += other.events

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[SkippedImage]:
        return iter(self._items.values())

    def __repr__(self) -> str:
        return f"SkipLog({len(self)} file(s), {self.events} skip(s))"

    def records(self) -> list[dict]:
        """``{"file", "reason"}`` per file, the file as :func:`~weakloc.text.display_path` writes it (for JSON)."""
        return [{"file": display_path(it.path), "reason": it.reason} for it in self]

    def lines(self) -> list[str]:
        """One line per file: the file, a tab, the reason (controls in either escaped)."""
        return [f"{display_path(it.path)}\t{display_path(' '.join(it.reason.split()))}" for it in self]

    def write(self, path: str | os.PathLike) -> Path:
        """Write :meth:`lines` (UTF-8, one per file) to ``path``; returns it."""
        path = Path(path)
        path.write_text("".join(line + "\n" for line in self.lines()), encoding="utf-8")
        return path

    def summary(self, listed_in: str | os.PathLike | None = None) -> str:
        """``"N image(s) could not be decoded and were skipped"``, with ``", listed in <file>"``."""
        where = f", listed in {display_path(listed_in)}" if listed_in is not None else ""
        return f"{len(self)} image(s) could not be decoded and were skipped{where}"


def fit_size(h: int, w: int, longest: int = 512, shortest_display: int = 256) -> tuple[int, int]:
    """``(H, W)`` scaled so the longest side is at most ``longest`` and, for small images, at least
    ``shortest_display`` (so drawn captions stay legible)."""
    s = min(1.0, longest / max(h, w))
    if max(h, w) < shortest_display:
        s = shortest_display / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


class JpegData(NamedTuple):
    """A JPEG's checked bytes (:func:`~weakloc.data.images.read_jpeg_data`), to be decoded on the
    device the batch goes to."""

    data: torch.Tensor


DECODERS = ("cpu", "device")


class PredictDataset(Dataset):
    """For inference on unlabelled files: ``(index, model input, (H, W) original size, display image)``.

    An unreadable file gives ``(index, None, message, None)`` (the :class:`ImageReadError`'s one
    line, naming the file by :func:`~weakloc.text.display_path`) so callers can report and
    skip it. The display image is the original resized for pictures (:func:`fit_size`: longest
    side 256..``display`` px; None when ``display`` is None). With ``decode="device"`` a JPEG's
    model input is its checked bytes (:class:`JpegData`), decoded where the batch goes
    (:func:`prepare`); other files are decoded here.
    """

    def __init__(self, paths: list[Path], size: int, mean, std, display: int | None = 512, decode: str = "cpu"):
        self.paths, self.tf, self.display, self.decode = list(paths), eval_transform(size, mean, std), display, decode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            if self.decode == "device":
                jpeg = read_jpeg_data(self.paths[i])
                if jpeg is not None:
                    return i, JpegData(jpeg[0]), jpeg[1], None
            img = read_image(self.paths[i])
        except ImageReadError as e:
            return i, None, str(e), None
        x, shown = prepare(img, self.tf, self.display)
        return i, x, tuple(img.shape[-2:]), shown


def prepare(img: torch.Tensor, tf, display: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A decoded ``(3, H, W)`` uint8 image as the model's input (``tf``) and, unless ``display`` is
    None, its picture for overlays (uint8, on the CPU), on whatever device it is."""
    if display is None:
        return tf(img), None
    dh, dw = fit_size(*img.shape[-2:], display)
    shown = torch.nn.functional.interpolate(img[None].float(), size=(dh, dw), mode="bilinear", antialias=True)[0].round().to(torch.uint8)
    return tf(img), shown.cpu()


def collate_list(items: list) -> list:
    """Keep a batch as a list (items of different sizes)."""
    return items
