"""Speed of the WSOL box sweep: weakloc's vectorised sweep vs the reference's per-image, per-threshold
OpenCV loop (as `wsolevaluation` does it), on the same maps; also synthetic data generation speed.

    uv run python benchmarks/sweep_speed.py
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import cv2
import numpy as np
import torch

from weakloc.data.synthetic import SyntheticConfig, write_synthetic
from weakloc.evaluate.boxes import box_iou_inclusive
from weakloc.evaluate.wsol import box_sweep, threshold_list
from weakloc.explain.maps import normalize_minmax


def reference_loop(maps: np.ndarray, gts: list[np.ndarray], taus: np.ndarray) -> np.ndarray:
    """Per image, per threshold: threshold, findContours, all boxes, best IoU (the reference's way)."""
    out = np.zeros((len(maps), len(taus)))
    for i, m in enumerate(maps):
        u8 = (m * 255).astype(np.uint8)
        h, w = u8.shape
        for t, tau in enumerate(taus):
            _, binary = cv2.threshold(u8, int(tau * u8.max()), 255, cv2.THRESH_BINARY)
            contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
            boxes = []
            for c in contours:
                x, y, bw, bh = cv2.boundingRect(c)
                boxes.append([x, y, min(x + bw, w - 1), min(y + bh, h - 1)])
            boxes = np.array(boxes or [[0, 0, 0, 0]])
            out[i, t] = box_iou_inclusive(torch.from_numpy(boxes), torch.from_numpy(gts[i])).max().item()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--step", type=float, default=0.01)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    low = torch.rand(args.n, 1, 7, 7, generator=g)
    maps = normalize_minmax(torch.nn.functional.interpolate(low, size=(args.size, args.size), mode="bicubic")[:, 0])
    gts = [torch.tensor([[20, 30, 150, 170]]) for _ in range(args.n)]
    taus = threshold_list(args.step)
    t = time.perf_counter()
    ref = reference_loop(maps.numpy(), [b.numpy() for b in gts], taus.numpy())
    t_ref = time.perf_counter() - t
    box_sweep(maps, gts, taus)  # warm-up
    t = time.perf_counter()
    ours = box_sweep(maps, gts, taus)
    t_ours = time.perf_counter() - t
    assert np.allclose(ours.best_iou_all.numpy(), ref), "sweeps disagree"
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        write_synthetic(d, SyntheticConfig(n_images=1000, size=128))
        t_syn = time.perf_counter() - t
    print(f"machine: {platform.machine()} CPU, {torch.get_num_threads()} torch threads; {args.n} maps {args.size}px, {len(taus)} thresholds")
    print("| task | reference-style loop | weakloc | speed-up |")
    print("|---|---:|---:|---:|")
    print(f"| all-contour box sweep, {args.n} maps x {len(taus)} thresholds | {t_ref * 1000:.0f} ms | {t_ours * 1000:.0f} ms | {t_ref / t_ours:.1f}x |")
    print(f"| synthetic data, 1,000 images of 128 px (write to disk) | - | {t_syn:.1f} s | - |")


if __name__ == "__main__":
    main()
