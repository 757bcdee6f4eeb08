"""Target layers of any timm model: which one by default, how to capture it, how to run the rest.

Nothing here needs a reshape function from the user: :func:`weakloc.models.grid.to_grid` reads any
layer output (feature map, channels-last map, token sequence) as a ``(B, C, h, w)`` grid.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from weakloc.errors import WeaklocError
from weakloc.models.grid import backbone_of, channel_dim, to_grid

__all__ = ["activation_grid", "backbone_of", "capture_activation", "channel_dim", "default_layer", "find_layer", "forward_to_layer",
           "is_weakloc_net", "logits_after_layer", "maps_and_grid", "to_grid"]


def is_weakloc_net(model: nn.Module) -> bool:
    """Whether ``model`` has weakloc's class-map head (``features`` + 1x1 ``classifier``)."""
    return hasattr(model, "forward_maps") and hasattr(model, "classifier") and hasattr(model, "features")


def default_layer(model: nn.Module) -> str | None:
    """The layer a method reads when none is named.

    ``None`` for a weakloc model: its classifier reads the backbone's last feature map, so that map
    is where CAM lives and where every other method should look. For a plain timm classifier: the
    last stage of its ``feature_info`` -- except for class-token ViTs, whose last block's patch
    tokens get no gradient (only the class token reaches the head), where it is that block's
    ``norm1`` (the input of its attention), as is customary.
    """
    if is_weakloc_net(model):
        return None
    blocks = getattr(model, "blocks", None)
    if blocks is not None and getattr(model, "global_pool", None) == "token" and len(blocks) and hasattr(blocks[-1], "norm1"):
        return f"blocks.{len(blocks) - 1}.norm1"
    info = getattr(model, "feature_info", None)
    if info:
        last = info[-1] if isinstance(info, list) else info.get_dicts()[-1]
        return last["module"]
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if convs:
        return convs[-1]
    raise WeaklocError(f"cannot choose a target layer for {type(model).__name__}: name one with layer=...")


def find_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (as in ``model.named_modules()``)."""
    modules = dict(model.named_modules())
    if name not in modules:
        hint = [n for n in modules if n.endswith(name.split(".")[-1])][:5]
        raise WeaklocError(f"no layer named {name!r} in the model; similar: {hint}")
    return modules[name]


@contextmanager
def capture_activation(module: nn.Module, replace=None) -> Iterator[dict]:
    """Record ``module``'s output as a fresh leaf that requires grad; the hook is always removed.

    The leaf is what the rest of the network consumes, so gradients of the output reach it without
    the layers before ``module`` having recorded any graph. With ``replace`` (a tensor), the layer's
    output is swapped for it instead -- its batch size may differ from the input's (Ablation-CAM
    feeds many ablated copies through the layers after ``module`` this way).

    Yields a dict whose ``"act"`` entry holds the activation after the forward pass.
    """
    store: dict = {}

    def hook(_m, _inp, out):
        if not isinstance(out, torch.Tensor):
            raise WeaklocError(f"layer {type(_m).__name__} does not output a single tensor")
        if replace is not None:
            return replace
        leaf = out.detach().requires_grad_(True)
        store["act"] = leaf
        return leaf.clone()  # the later layers may work in place; the leaf itself must stay untouched

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def forward_to_layer(model: nn.Module, images: torch.Tensor, layer: str | None, keep_graph: bool = False):
    """Logits and the raw activation of ``layer`` from one forward pass.

    Args:
        images: ``(B, 3, H, W)``.
        layer: a module name, or ``None`` for the default (see :func:`default_layer`).
        keep_graph: differentiable mode -- the activation stays attached to the graph from the
            input and the parameters instead of being a fresh leaf.

    Returns:
        ``(activation, logits)``: the activation as the layer gave it (it requires grad, and the
        logits depend on it), logits ``(B, K)``.
    """
    layer = layer if layer is not None else default_layer(model)
    if layer is None:
        store: dict = {}

        def as_leaf(f):
            store["act"] = f if keep_graph else f.detach().requires_grad_(True)
            return store["act"]

        logits = model.forward_maps(images, on_features=as_leaf).logits
        return store["act"], logits
    module = find_layer(model, layer)
    if keep_graph:
        store: dict = {}
        handle = module.register_forward_hook(lambda _m, _i, out: store.__setitem__("act", out))
        try:
            logits = model(images)
        finally:
            handle.remove()
        return store["act"], logits
    with capture_activation(module) as store:
        logits = model(images)
    return store["act"], logits


def activation_grid(model: nn.Module, images: torch.Tensor, layer: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass without gradients: ``layer``'s activation as a ``(B, C, h, w)`` grid (see
    :func:`to_grid`) and the logits ``(B, K)``, both detached."""
    with torch.no_grad():
        raw, logits = forward_to_layer(model, images, layer)
    return to_grid(raw.detach(), model, tuple(images.shape[-2:])), logits.detach()


def maps_and_grid(model: nn.Module, images: torch.Tensor, layer: str | None):
    """A weakloc model's :meth:`forward_maps` output and ``layer``'s activation as a ``(B, C, h, w)``
    grid, from one forward pass without gradients (``None``: the classifier's own feature map)."""
    with torch.no_grad():
        if layer is None:
            out = model.forward_maps(images)
            return out, out.features
        with capture_activation(find_layer(model, layer)) as store:
            out = model.forward_maps(images)
    return out, to_grid(store["act"].detach(), model, tuple(images.shape[-2:]))


def logits_after_layer(model: nn.Module, images: torch.Tensor, layer: str | None, activation: torch.Tensor) -> torch.Tensor:
    """Logits of the network from ``layer`` on, fed ``activation`` (any batch size N) in its raw layout.

    For weakloc's default layer this is the head alone. For an inner layer the layers before it run
    on ``images[:1]`` and their output is replaced, so the cost is the network after the layer; all
    of ``activation`` must come from that one image (skip connections around the layer carry its
    earlier tensors).

    Returns:
        ``(N, K)``.
    """
    layer = layer if layer is not None else default_layer(model)
    if layer is None:
        return model.head_logits(activation)
    with capture_activation(find_layer(model, layer), replace=activation):
        try:
            return model(images[:1])
        except RuntimeError as e:
            if "size of tensor" not in str(e) and "shape" not in str(e):
                raise
            raise WeaklocError(f"the layers after {layer!r} read earlier tensors of another shape (a skip connection around "
                               f"it); choose a whole stage or block as the target layer ({e})") from None
