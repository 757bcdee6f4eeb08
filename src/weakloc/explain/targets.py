"""Which class each map is for: predicted, named, all, or a per-image list."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from weakloc.errors import WeaklocError

TargetSpec = str | int | Sequence[int | str] | torch.Tensor | None


def resolve_targets(spec: TargetSpec, logits: torch.Tensor, classes: Sequence[str]) -> torch.Tensor:
    """Turn a target spec into class indices ``(B, T)`` on the logits' device.

    Args:
        spec: ``None``/``"predicted"`` (top-1), ``"all"`` (every class), ``"topK"`` (e.g. ``"top3"``),
            a class index or name (every image), a per-image sequence of indices/names of length B,
            or a ``(B,)``/``(B, T)`` tensor.
        logits: ``(B, K)``.
        classes: the K class names.

    Raises:
        WeaklocError: an unknown class, an index out of range, or a per-image list whose length is
            not the batch size.
    """
    b, k = logits.shape
    dev = logits.device

    def index_of(c: int | str) -> int:
        if isinstance(c, str):
            if c in classes:
                return list(classes).index(c)
            if c.isdigit():
                c = int(c)
            else:
                raise WeaklocError(f"unknown class {c!r} (known: {', '.join(classes)})")
        if not 0 <= int(c) < k:
            raise WeaklocError(f"class index {c} out of range 0..{k - 1}")
        return int(c)

    if spec is None or (isinstance(spec, str) and spec == "predicted"):
        return logits.argmax(-1, keepdim=True)
    if isinstance(spec, str) and spec == "all":
        return torch.arange(k, device=dev).expand(b, k)
    if isinstance(spec, str) and spec.startswith("top") and spec[3:].isdigit():
        n = int(spec[3:])
        if not 1 <= n <= k:
            raise WeaklocError(f"{spec}: k must be between 1 and {k}")
        return logits.topk(n, dim=-1).indices
    if isinstance(spec, (str, int)):
        return torch.full((b, 1), index_of(spec), device=dev, dtype=torch.long)
    if isinstance(spec, torch.Tensor):
        t = spec.to(dev, torch.long)
        if t.ndim == 1:
            t = t[:, None]
        if t.ndim != 2 or t.shape[0] != b:
            raise WeaklocError(f"target tensor of shape {tuple(spec.shape)} does not match a batch of {b}")
        if (t < 0).any() or (t >= k).any():
            raise WeaklocError(f"target indices must be in 0..{k - 1}")
        return t
    seq = list(spec)
    if len(seq) != b:
        raise WeaklocError(f"{len(seq)} targets given for a batch of {b} images")
    return torch.tensor([index_of(c) for c in seq], device=dev, dtype=torch.long)[:, None]
