"""Any timm classifier as a weakloc model: ``timm:NAME`` wherever a command takes MODEL.

:func:`load_model_spec` builds timm's ``NAME`` with its classifier, gives it weights (a file, the
packaged ImageNet weights of EfficientNet-Lite0/1/2, or timm's download) and class names (a file,
ImageNet's for a 1,000-class head, else ``class_0``, ``class_1``, ...), and returns something the
rest of weakloc uses like a trained model folder's network, with a :class:`~weakloc.config.ModelConfig`
(input size and normalisation from timm's ``pretrained_cfg``):

- a :class:`~weakloc.models.WeaklocNet` when the network ends in global average pooling and one
  linear layer (ResNet, EfficientNet, ...): the linear layer becomes the 1x1 classifier, so its
  logits are the network's own (checked on a random input) and CAM of every class comes free;
- else a :class:`TimmClassifier` (ViT's class token, VGG's fully connected layers, ConvNeXt's norm
  after pooling): the network itself, its maps made by Grad-CAM at the layer
  :func:`default_target_layer` names.

Weights are never unpickled: safetensors, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import functools
import socket
import warnings
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from timm.data import resolve_model_data_config
from timm.models import get_pretrained_cfg
from torch import nn

from weakloc.config import MapConfig, ModelConfig
from weakloc.errors import CheckpointError, LabelError, OptionError, WeaklocError
from weakloc.models.backbone import OFFLINE_IMAGENET, for_inference, match_state_dict, offline_imagenet_path, os_reason, read_state_dict
from weakloc.models.classifier import WeaklocNet
from weakloc.text import class_name_problem

SPEC_PREFIX = "timm:"
#: classes of an ImageNet-1k head, whose names come from timm's ImageNet information
IMAGENET_CLASSES = 1000
#: pooling types after which a linear classifier commutes with the pooling (CAM is then exact)
AVERAGE_POOLS = ("avg", "fast")
#: side of the random input on which a converted network's logits are compared with the original's
CHECK_SIZE = 64
#: seconds to wait for the hub's host before calling the machine offline
HUB_TIMEOUT_S = 3.0


def model_spec_name(spec: str | Path) -> str | None:
    """``"timm:resnet50"`` -> ``"resnet50"``; None for anything else (a model folder)."""
    text = str(spec)
    return text[len(SPEC_PREFIX):] if text.startswith(SPEC_PREFIX) else None


def is_model_spec(spec: str | Path) -> bool:
    """Whether ``spec`` names a timm network (``timm:NAME``) rather than a model folder."""
    return model_spec_name(spec) is not None


class TimmClassifier(nn.Module):
    """A timm classifier whose head is not a 1x1 classifier over the last feature map.

    Its logits are the network's own; its maps come from the layer ``config.maps.layer`` names
    (``backbone.`` + a timm module name, as for a :class:`~weakloc.models.WeaklocNet`), made by
    ``config.maps.method`` (Grad-CAM). No counting, attention or localizer head.

    Args:
        net: the timm model, classifier included, in eval mode.
        config: its :class:`~weakloc.config.ModelConfig`.
    """

    counting_head = None
    attention_head = None
    localizer = None
    box_head = None

    def __init__(self, net: nn.Module, config: ModelConfig):
        super().__init__()
        self.backbone = net
        self.config = config

    @property
    def num_classes(self) -> int:
        return len(self.config.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> logits ``(B, K)``."""
        return self.backbone(x)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax (single-label) or sigmoid (multi-label) of ``(B, K)`` logits."""
        return logits.softmax(-1) if self.config.task == "single" else logits.sigmoid()


def default_target_layer(net: nn.Module) -> str:
    """The layer Grad-CAM reads in a timm classifier (a name in ``net.named_modules()``).

    The rule of :func:`weakloc.explain.layers.default_layer` for a plain timm model: the last block's
    ``norm1`` for a class-token ViT (its last patch tokens get no gradient), else the last entry of
    ``feature_info``, else the last convolution.
    """
    blocks = getattr(net, "blocks", None)
    if blocks is not None and getattr(net, "global_pool", None) == "token" and len(blocks) and hasattr(blocks[-1], "norm1"):
        return f"blocks.{len(blocks) - 1}.norm1"
    info = getattr(net, "feature_info", None)
    if info:
        return (info[-1] if isinstance(info, list) else info.get_dicts()[-1])["module"]
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    if convs:
        return convs[-1]
    raise WeaklocError(f"cannot choose a layer for the maps of {type(net).__name__}")


# --- class names -----------------------------------------------------------------------------------

def read_class_names(path: str | Path) -> list[str]:
    """Class names from a text file, one per line in the classifier's order (blank lines at the end
    ignored).

    Raises:
        LabelError: a missing or unreadable file, no names, a blank line between names, a name that
            cannot name a class (see :func:`weakloc.text.class_name_problem`) or a name listed twice,
            with its line number.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise LabelError(f"{path}: classes file not found") from None
    except UnicodeDecodeError as e:
        raise LabelError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise LabelError(f"{path}: cannot read the classes file ({os_reason(e)})") from None
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise LabelError(f"{path}: no class names (expected one per line)")
    seen: dict[str, int] = {}
    for number, name in enumerate(lines, 1):
        if not name:
            raise LabelError(f"{path} line {number}: blank line between class names (one name per line, in the classifier's order)")
        problem = class_name_problem(name)
        if problem:
            raise LabelError(f"{path} line {number}: class name {name!r} {problem}")
        if name in seen:
            raise LabelError(f"{path} line {number}: class {name!r} is listed twice (first on line {seen[name]})")
        seen[name] = number
    return lines


@functools.lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k class names in the standard order, offline from timm's ImageNet
    information: each synset's first lemma (``tabby``, ``tiger cat``, ``espresso``); where two
    synsets share it (``crane`` the bird and the machine), the WordNet id follows in brackets."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    first = [info.index_to_description(i).split(",")[0].strip() for i in range(IMAGENET_CLASSES)]
    counts: dict[str, int] = {}
    for name in first:
        counts[name] = counts.get(name, 0) + 1
    return tuple(name if counts[name] == 1 else f"{name} ({info.index_to_label_name(i)})" for i, name in enumerate(first))


def default_class_names(n: int) -> list[str]:
    """ImageNet's names for a 1,000-class head, else ``class_0`` ... ``class_{n-1}``."""
    return list(imagenet_class_names()) if n == IMAGENET_CLASSES else [f"class_{i}" for i in range(n)]


# --- weights ---------------------------------------------------------------------------------------

def _classifier_names(net: nn.Module) -> list[str]:
    """Module names of the classifier(s) in timm's ``pretrained_cfg`` (two for distilled models)."""
    names = (getattr(net, "pretrained_cfg", None) or {}).get("classifier") or ()
    return [names] if isinstance(names, str) else list(names)


def _is_classifier_key(key: str, classifiers: list[str]) -> bool:
    return any(key.startswith(c + ".") for c in classifiers)


def _create(name: str, num_classes: int | None = None, pretrained: bool = False, **kwargs) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, **({"num_classes": num_classes} if num_classes is not None else {}),
                                 **kwargs)
    except RuntimeError as e:  # timm's "Unknown model" and the like
        raise OptionError(f"{SPEC_PREFIX}{name}: {e}") from None


def _head_rows(sd: dict[str, torch.Tensor], classifiers: list[str], where: str) -> int:
    """Outputs of the classifier in a mapped state dict."""
    for c in classifiers:
        w = sd.get(f"{c}.weight")
        if w is not None:
            return int(w.shape[0])
    key = f"{classifiers[0]}.weight" if classifiers else "the classifier"
    raise CheckpointError(f"{where}: has no classifier weights ({key}): it holds a backbone only, which cannot classify; "
                          "give the weights of the whole network")


def _checked_load(net: nn.Module, sd: dict[str, torch.Tensor], where: str, name: str) -> None:
    target = net.state_dict()
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    if missing or unexpected:
        raise CheckpointError(f"{where}: its {len(sd)} tensors do not fit timm's {name} ({len(target)}): missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]}; is it a {name} checkpoint?")
    wrong = [k for k in target if sd[k].shape != target[k].shape]
    if wrong:
        raise CheckpointError(f"{where}: shapes do not fit timm's {name}: " + ", ".join(
            f"{k} {tuple(sd[k].shape)} vs {tuple(target[k].shape)}" for k in wrong[:3]))
    net.load_state_dict(sd)


def _hub_reachable(endpoint: str) -> bool:
    """Whether the hub's host answers within :data:`HUB_TIMEOUT_S` (offline, timm's download would
    retry for minutes before failing)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=HUB_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def _needs_weights(name: str, why: str) -> CheckpointError:
    offline = ", ".join(f"{SPEC_PREFIX}{n}" for n in OFFLINE_IMAGENET if n.startswith("tf_"))
    return CheckpointError(f"{SPEC_PREFIX}{name} needs weights ({why}): give --weights FILE (safetensors, or a tensors-only "
                           f".pth such as torchvision's), or go online for timm's download. Offline out of the box: {offline}")


def _hub_model(name: str) -> nn.Module:
    """timm's ``NAME`` with its pretrained weights: from the local Hugging Face cache, else downloaded.

    Raises:
        CheckpointError: timm has no weights for it, or they are neither cached nor downloadable.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    cfg = get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id and not getattr(cfg, "url", None):
        raise _needs_weights(name, "timm has no pretrained weights for it")
    cached = try_to_load_from_cache(hub_id, "model.safetensors") if hub_id else None
    if isinstance(cached, str):
        return _create(name, pretrained=True, pretrained_cfg_overlay={"file": cached})
    if not _hub_reachable(constants.ENDPOINT):
        raise _needs_weights(name, f"offline, and not in the Hugging Face cache ({hub_id or cfg.url})")
    try:
        return _create(name, pretrained=True)
    except OSError as e:
        raise _needs_weights(name, f"the download failed: {type(e).__name__}") from None


# --- the model -------------------------------------------------------------------------------------

def as_cam_net(net: nn.Module, config: ModelConfig) -> WeaklocNet | None:
    """``net`` as a :class:`WeaklocNet` of the same weights, when its head is global average pooling
    and one linear layer: the linear layer becomes the 1x1 classifier. None when the head is
    anything else, or when the two networks' logits on a random input differ.
    """
    pool = getattr(net, "global_pool", None)
    kind = getattr(pool, "pool_type", pool)
    head = net.get_classifier() if hasattr(net, "get_classifier") else None
    classifiers = _classifier_names(net)
    if (isinstance(kind, str) and kind not in AVERAGE_POOLS) or not isinstance(head, nn.Linear) or len(classifiers) != 1:
        return None
    try:
        cam = WeaklocNet(config, pretrained="none")
    except (WeaklocError, RuntimeError, TypeError, ValueError):
        return None
    body = {k: v for k, v in net.state_dict().items() if not _is_classifier_key(k, classifiers)}
    expected = cam.backbone.state_dict()
    if (set(body) != set(expected) or any(body[k].shape != v.shape for k, v in expected.items())
            or head.in_features != cam.classifier.in_channels):
        return None
    cam.backbone.load_state_dict(body)
    with torch.no_grad():
        cam.classifier.weight.copy_(head.weight[:, :, None, None])
        cam.classifier.bias.copy_(head.bias if head.bias is not None else torch.zeros_like(cam.classifier.bias))
    cam.eval()
    net.eval()
    return cam if _same_logits(net, cam, config.input_size) else None


def _same_logits(net: nn.Module, cam: nn.Module, input_size: int) -> bool:
    """Whether both networks give the same logits for a random input: a small one first (quick, and
    enough for a convolutional network), the network's own size where the small one is refused."""
    generator = torch.Generator().manual_seed(0)
    for size in dict.fromkeys((min(CHECK_SIZE, input_size), input_size)):
        x = torch.randn(1, 3, size, size, generator=generator)
        with torch.no_grad():
            try:
                theirs, ours = net(x), cam(x)
            except (RuntimeError, ValueError, AssertionError):  # a network that takes one input size only
                continue
        return theirs.shape == ours.shape and torch.allclose(theirs, ours, rtol=1e-3, atol=1e-4 * (1 + float(theirs.abs().max())))
    return False


def load_model_spec(spec: str | Path, weights: str | Path | None = None, classes: str | Path | None = None,
                    num_classes: int | None = None, device: str | torch.device | None = None) -> WeaklocNet | TimmClassifier:
    """A timm classifier ready for ``explain``, ``localize``, ``evaluate`` and ``explain-eval``.

    Args:
        spec: ``timm:NAME``, ``NAME`` any of ``timm.list_models()``.
        weights: the whole network's weights: safetensors or a tensors-only ``.pth`` (a training
            checkpoint's ``state_dict``/``model`` entry is taken). Key names are mapped onto timm's
            where the architecture matches (:func:`~weakloc.models.backbone.match_state_dict`:
            torchvision ResNet/VGG/DenseNet, lukemelas EfficientNet, a ``module.`` prefix). Default:
            the packaged ImageNet weights for EfficientNet-Lite0/1/2, else timm's (cached or downloaded).
        classes: a text file of class names, one per line, in the classifier's order. Default:
            ImageNet's names for 1,000 outputs, else ``class_0`` ...
        num_classes: the classifier's outputs, checked against the weights and ``classes``.
        device: where the model goes (default ``cpu``).

    Returns:
        a :class:`WeaklocNet` (global-average-pooling + linear heads: CAM available, method ``cam``)
        or a :class:`TimmClassifier` (method ``gradcam`` at :func:`default_target_layer`), in eval
        mode, ``.config`` holding backbone ``NAME``, the classes, the pretrained input size and
        normalisation.

    Raises:
        OptionError: not a ``timm:`` spec, an unknown name, ``num_classes`` out of range or at odds
            with ``classes`` or the weights.
        LabelError: a bad classes file.
        CheckpointError: weights that cannot be read or do not fit, or none to be had (offline).
    """
    name = model_spec_name(spec)
    if not name:
        raise OptionError(f"{spec}: expected {SPEC_PREFIX}NAME with NAME a timm model, e.g. {SPEC_PREFIX}resnet50")
    if not timm.is_model(name):
        near = timm.list_models(f"*{name}*")[:5]
        raise OptionError(f"{spec}: timm has no model {name!r}" + (f"; similar: {', '.join(near)}" if near else "")
                          + " (see timm.list_models())")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1):
        raise OptionError(f"--num-classes: expected a whole number of at least 1, got {num_classes!r}")
    names = read_class_names(classes) if classes is not None else None
    if names is not None and num_classes is not None and len(names) != num_classes:
        raise OptionError(f"--classes {classes} lists {len(names)} class(es) but --num-classes is {num_classes}")
    wanted = len(names) if names is not None else num_classes

    if weights is not None:
        net = _create(name)
        where = str(weights)
        classifiers = _classifier_names(net)
        target = net.state_dict()
        sd = match_state_dict(read_state_dict(weights), net, target,
                              loose=[k for k in target if _is_classifier_key(k, classifiers)])
        rows = _head_rows(sd, classifiers, where)
    elif name in OFFLINE_IMAGENET:
        net = _create(name)
        where = str(offline_imagenet_path(name))
        sd = match_state_dict(read_state_dict(where), net)
        rows = IMAGENET_CLASSES
    else:
        net, sd, where = _hub_model(name), None, f"timm's {name} weights"
        rows = int(net.num_classes)
    if wanted is not None and wanted != rows:
        given = f"--classes {classes} lists {wanted}" if names is not None else f"--num-classes is {wanted}"
        raise OptionError(f"{given} class(es), but the classifier of {where} has {rows} output(s)"
                          + ("" if weights is not None else ": give --weights of the network trained for your classes"))
    if sd is not None:
        if rows != getattr(net, "num_classes", rows):
            net = _create(name, num_classes=rows)
        _checked_load(net, sd, where, name)
    net.eval()

    data = resolve_model_data_config(net)
    config = ModelConfig(backbone=name, classes=names or default_class_names(rows), input_size=int(data["input_size"][-1]),
                         mean=tuple(float(v) for v in data["mean"]), std=tuple(float(v) for v in data["std"]), drop_rate=0.0)
    with warnings.catch_warnings():  # timm's notes on building the same architecture a second time
        warnings.simplefilter("ignore")
        model = as_cam_net(net, config)
    if model is None:
        config.maps = MapConfig(method="gradcam", layer="backbone." + default_target_layer(net))
        model = TimmClassifier(net, config)
    return for_inference(model, device or "cpu")


__all__ = ["SPEC_PREFIX", "TimmClassifier", "as_cam_net", "default_class_names", "default_target_layer", "imagenet_class_names",
           "is_model_spec", "load_model_spec", "model_spec_name", "read_class_names"]
