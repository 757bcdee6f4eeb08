"""The weakly-supervised classifier: a timm backbone and a class-map head.

The head is a 1x1 convolution over the feature map followed by global average pooling. Because
pooling and a linear layer commute, the logits equal those of GAP + linear, and the pre-pooling
tensor *is* the class activation map of every class -- CAM for all classes at no extra cost.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, NamedTuple

import torch
from torch import nn

from weakloc.data.dataset import IMAGENET_MEAN, IMAGENET_STD
from weakloc.data.labels import class_name_problem
from weakloc.errors import CheckpointError, WeaklocError
from weakloc.models.backbone import DEFAULT_BACKBONE, create_backbone, input_normalization
from weakloc.models.grid import to_grid
from weakloc.models.heads import CBAM, COUNTING, HEADS, AttentionHead, CountingHead, insert_adl, insert_cbam, thresholded_average_pool

TASKS = ("single", "multi")
#: ``format_version`` values this weakloc reads; a config.json from a newer weakloc may mean other things.
FORMAT_VERSIONS = (1,)
#: sides of a square input (pixels) a config.json may ask for; larger ones would exhaust memory, not run.
INPUT_SIZES = (16, 8192)
# timm names, with an optional ".tag"; no "hf-hub:" names or paths, which make timm fetch or read files
_BACKBONE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def _show(value: Any, limit: int = 80) -> str:
    """``value`` as JSON on one printable line, shortened to about ``limit`` characters."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# Checks of decoded JSON values, for the schema tables below. bool is refused where numbers are
# meant (JSON true is not 1), and numbers must be finite (Python's json reads NaN and Infinity).
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    try:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    except OverflowError:  # an integer beyond any float
        return False


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_name(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


def _int_in(lo: int, hi: int) -> Callable[[Any], bool]:
    return lambda v: _is_int(v) and lo <= v <= hi


def _number_in(lo: float, hi: float, *, open_low: bool = False) -> Callable[[Any], bool]:
    return lambda v: _is_number(v) and (lo < v if open_low else lo <= v) and v <= hi


def _one_of(*choices: Any) -> Callable[[Any], bool]:
    # same type as well as equal: 8.0 is not the output stride 8, nor true the version 1
    return lambda v: any(type(v) is type(c) and v == c for c in choices)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _list_of(check: Callable[[Any], bool], length: int | None = None) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and (length is None or len(v) == length) and all(check(x) for x in v)


def _dict_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, dict) and all(check(x) for x in v.values())


_Rule = tuple[Callable[[Any], bool], str]

#: config.json's fields: a check of the JSON value and what the field must be (the error's words).
CONFIG_SCHEMA: dict[str, _Rule] = {
    "backbone": (lambda v: isinstance(v, str) and bool(_BACKBONE_NAME.fullmatch(v)),
                 "a timm model name (letters, digits, '_', '-', '.')"),
    "classes": (_list_of(lambda v: isinstance(v, str)), "a list of class names"),
    "task": (_one_of(*TASKS), " or ".join(map(repr, TASKS))),
    "input_size": (_int_in(*INPUT_SIZES), f"a whole number of pixels in {INPUT_SIZES[0]}..{INPUT_SIZES[1]}"),
    "mean": (_optional(_list_of(_is_number, 3)), "3 finite numbers"),
    "std": (_optional(_list_of(_number_in(0, math.inf, open_low=True), 3)), "3 positive numbers"),
    "output_stride": (_one_of(None, 8, 16, 32), "null, 8, 16 or 32"),
    "drop_rate": (_number_in(0, 1), "a number in [0, 1]"),
    "head": (_one_of(*HEADS), ", ".join(map(repr, HEADS))),
    "attention_stages": (_list_of(_is_int), "a list of stage indices"),
    "attention_norm": (_one_of("softmax", "sigmoid"), "'softmax' or 'sigmoid'"),
    "cbam_stages": (_list_of(_is_int), "a list of stage indices"),
    "adl_stages": (_list_of(_is_int), "a list of stage indices"),
    "tap_threshold": (_number_in(0, 1), "a number in [0, 1]"),
    "positive_class": (_optional(_is_int), "null or a class index"),
    "decision_threshold": (_optional(_number_in(0, 1)), "null or a probability in [0, 1]"),
    "counting": (_one_of(None, *COUNTING), "null, " + ", ".join(map(repr, COUNTING))),
    "density_stage": (_optional(_is_int), "null or a stage index"),
    "density_hidden": (_int_in(0, 4096), "a whole number of channels in 0..4096"),
    "density_context": (_is_bool, "true or false"),
    "localizer": (_is_bool, "true or false"),
    "localization": (lambda v: isinstance(v, dict), "an object"),
    "format_version": (_one_of(*FORMAT_VERSIONS), f"one of {list(FORMAT_VERSIONS)} (a newer weakloc wrote this model?)"),
}

#: the keys of ``localization`` that weakloc reads; others (calibrated_on, note, ...) are notes kept as they are.
LOCALIZATION_SCHEMA: dict[str, _Rule] = {
    "threshold": (_number_in(0, 1), "a number in [0, 1]"),
    "method": (_is_name, "a heatmap method name"),
    "input_size": (_int_in(*INPUT_SIZES), f"a whole number of pixels in {INPUT_SIZES[0]}..{INPUT_SIZES[1]}"),
    "options": (_dict_of(lambda v: isinstance(v, dict)), "an object of method -> options object"),
    "box_sizes": (_dict_of(_list_of(_number_in(0, 1, open_low=True), 2)),
                  "an object of class -> [width, height], fractions of the image in (0, 1]"),
    "count_tta": (_one_of("none", "flip", "dihedral"), "'none', 'flip' or 'dihedral'"),
}


def _check_table(raw: dict, schema: dict[str, _Rule], where: str, prefix: str = "") -> None:
    for key, (check, must) in schema.items():
        if key in raw and not check(raw[key]):
            raise CheckpointError(f"{where}: '{prefix}{key}' must be {must}, got {_show(raw[key])}")


def validate_config(raw: Any, where: str = "config") -> None:
    """Check a decoded config.json against :data:`CONFIG_SCHEMA` (missing keys take the defaults).

    Raises:
        CheckpointError: ``"<where>: '<field>' must be ..., got ..."`` for the first bad field.
    """
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: must be a JSON object of model settings, got {_show(raw, 40)}")
    unknown = sorted(set(raw) - set(CONFIG_SCHEMA))
    if unknown:
        raise CheckpointError(f"{where}: unknown config key(s) {unknown}")
    if "classes" not in raw:
        raise CheckpointError(f"{where}: config has no 'classes'")
    _check_table(raw, CONFIG_SCHEMA, where)
    _check_table(raw.get("localization", {}), LOCALIZATION_SCHEMA, where, "localization.")
    classes = raw["classes"]
    if not classes:
        raise CheckpointError(f"{where}: 'classes' must be a non-empty list of class names, got []")
    for name in classes:
        problem = class_name_problem(name)
        if problem:
            raise CheckpointError(f"{where}: 'classes' entry {_show(name)} {problem} (class names become file names)")
    twice = [c for c, n in Counter(classes).items() if n > 1]
    if twice:
        raise CheckpointError(f"{where}: 'classes' lists {_show(twice[0])} more than once")
    positive = raw.get("positive_class")
    if positive is not None and not (len(classes) == 2 and 0 <= positive < 2):
        raise CheckpointError(f"{where}: 'positive_class' must be null or 0 or 1 (a class of a two-class model), "
                              f"got {_show(positive)} with {len(classes)} classes")


def check_finite(tensor: torch.Tensor, what: str, names: Sequence[str] | None = None) -> torch.Tensor:
    """``tensor`` unchanged when every value is finite; else a :class:`WeaklocError` naming the first
    bad row's ``names`` entry (one name per row of ``tensor``, e.g. the images of a batch).

    Meant for what users see (probabilities, counts): NaN would otherwise print as a probability and
    its arg-max as a "predicted" class.
    """
    bad = ~torch.isfinite(tensor.detach())
    if not bool(bad.any()):
        return tensor
    rows = bad.reshape(bad.shape[0], -1).any(1).nonzero()[:, 0].tolist() if bad.dim() else [0]
    where = ""
    if names is not None and rows:
        others = len(rows) - 1
        where = f" for {names[rows[0]]}" + (f" (and {others} other{'s' if others > 1 else ''})" if others else "")
    raise WeaklocError(f"{what} is NaN or infinite{where}: the model's weights are broken, or its computation "
                       "overflowed (try float32)")


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model and use it; stored as JSON beside the weights.

    Attributes:
        backbone: timm model name.
        classes: class names in output order.
        task: ``single`` (softmax) or ``multi`` (sigmoid per class).
        input_size: side of the square input.
        mean, std: input normalisation (None: the backbone's own, from timm's pretrained config).
        output_stride: timm ``output_stride`` (16 or 8 dilate the last stages; None = native 32).
        drop_rate: channel dropout before the classifier during training.
        head: ``cam`` (1x1 classifier + global average pooling), ``attention`` (trainable attention
            on ``attention_stages``, see :class:`~weakloc.models.heads.AttentionHead`) or ``tap``
            (thresholded average pooling at ``tap_threshold``).
        attention_stages: ``feature_info`` indices of the stages the attention head attends.
        attention_norm: ``softmax`` or ``sigmoid`` attention.
        cbam_stages: ``feature_info`` indices of stages followed by a CBAM block.
        adl_stages: ``feature_info`` indices of stages followed by an attention-based dropout layer
            (training only; erases the most discriminative region so evidence spreads).
        tap_threshold: TAP's fraction of each channel's maximum.
        positive_class: the "yes" class of a two-class task, else None.
        counting: a counting head beside the classifier: ``density``, ``count`` or ``both``
            (see :class:`~weakloc.models.heads.CountingHead`), or None.
        density_stage: ``feature_info`` index of the stage the density head reads (None: the last
            feature map). An earlier stage has a receptive field near an object's size, so its
            density must come from each object's own pixels and peaks on the instances, where the
            last map can spread an image-wide count evenly.
        density_hidden: channels of the density head's 3x3 convolution (0: a 1x1 convolution alone).
        density_context: the density head also reads the last feature map, upsampled onto the
            stage's grid (needs ``density_stage`` and ``density_hidden``).
        localizer: a second-stage localizer head (a 1x1 convolution per class, sigmoid maps) trained
            on pseudo-masks from a first-stage model's maps (PSOL's idea; see ``fine_tune(teacher=)``);
            its maps are the explanation method ``localizer``.
        decision_threshold: probability above which the positive class is predicted (chosen on
            validation for yes/no tasks; None: the arg-max).
        localization: settings for ``localize`` / ``evaluate``: the calibrated ``threshold`` and
            ``method``, the test-time ``input_size`` (see :meth:`inference_size`), default map
            ``options`` per method (see :meth:`map_options`) and counting's ``count_tta`` (see
            :meth:`count_views`) and ``box_sizes`` (see :meth:`instance_box_sizes`).
    """

    backbone: str = DEFAULT_BACKBONE
    classes: list[str] = field(default_factory=list)
    task: str = "single"
    input_size: int = 224
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    output_stride: int | None = None
    drop_rate: float = 0.2
    head: str = "cam"
    attention_stages: list[int] = field(default_factory=lambda: [-3, -2])
    attention_norm: str = "softmax"
    cbam_stages: list[int] = field(default_factory=list)
    adl_stages: list[int] = field(default_factory=list)
    tap_threshold: float = 0.1
    positive_class: int | None = None
    decision_threshold: float | None = None
    counting: str | None = None
    density_stage: int | None = None
    density_hidden: int = 0
    density_context: bool = False
    localizer: bool = False
    localization: dict = field(default_factory=dict)
    format_version: int = 1

    def inference_size(self) -> int:
        """Side of the input for maps, boxes and predictions: the test-time size stored in
        ``localization["input_size"]`` (by ``fine_tune``'s ``test_scale`` or ``weakloc calibrate``),
        else the training size. A fully convolutional model run on a larger input than it was
        trained on gives denser maps (docs/results.md)."""
        return int(self.localization.get("input_size") or self.input_size)

    def map_options(self, method: str, given: dict | None = None) -> dict:
        """Explain options for ``method`` on the model's default path (localize, evaluate, explain,
        calibrate): those stored for it in ``localization["options"][method]`` (``fine_tune`` stores
        the defaults that measured best, docs/results.md), overridden by the caller's ``given``."""
        stored = self.localization.get("options", {}).get(method, {})
        return {**stored, **(given or {})}

    def count_views(self, given: str | None = None) -> str:
        """Test-time views a counting model's counts are averaged over (``none``, ``flip``,
        ``dihedral``): ``given``, else the ones ``fine_tune`` stored (``localization["count_tta"]``),
        else ``none``."""
        return given or self.localization.get("count_tta", "none")

    def instance_box_sizes(self) -> list[list[float]] | None:
        """Counting models: each class's instance box ``[width, height]`` as fractions of the image,
        in class order, as ``weakloc calibrate`` stored them (``localization["box_sizes"]``); None
        when not calibrated (boxes then come from the region around each peak)."""
        stored = self.localization.get("box_sizes")
        if not stored:
            return None
        missing = [c for c in self.classes if c not in stored]
        if missing:
            raise WeaklocError(f"localization.box_sizes in the model's config.json has no size for {', '.join(missing)}: "
                               "run weakloc calibrate again")
        return [list(map(float, stored[c])) for c in self.classes]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, where: str = "config") -> "ModelConfig":
        """The config in ``text`` (config.json), checked field by field (:func:`validate_config`).

        Raises:
            CheckpointError: not JSON, not an object, or a field of the wrong type or value; the
                message names ``where`` and the field.
        """
        try:
            raw = json.loads(text)
        except (ValueError, RecursionError) as e:  # JSONDecodeError; too many digits; nesting too deep
            raise CheckpointError(f"{where}: not valid JSON ({e})") from None
        validate_config(raw, where)
        defaults = {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(cls)}
        values = {**defaults, **raw}
        values["mean"] = tuple(values["mean"] or IMAGENET_MEAN)
        values["std"] = tuple(values["std"] or IMAGENET_STD)
        return cls(**values)


class ModelOutput(NamedTuple):
    """What one forward pass gives.

    Attributes:
        logits: ``(B, K)``.
        class_maps: ``(B, K, h, w)`` CAM of every class (the classifier applied at each position; for
            the ``cam`` head their spatial mean is ``logits``).
        features: ``(B, C, h, w)`` the backbone's last feature map.
        attention: the attention head's maps ``[(B, h_s, w_s)]`` (empty for other heads).
        counts: ``(B, K)`` predicted counts (models with a counting head), else None.
        density: ``(B, K, h, w)`` density maps summing to ``counts`` (density heads), else None.
        head_counts: ``(B, K)`` the pooled count head's own prediction (``count``/``both``), else None.
        localizer: ``(B, K, h, w)`` the second-stage localizer's logits (sigmoid: object
            probability per class and position), else None.
    """

    logits: torch.Tensor
    class_maps: torch.Tensor
    features: torch.Tensor
    attention: tuple = ()
    counts: torch.Tensor | None = None
    density: torch.Tensor | None = None
    head_counts: torch.Tensor | None = None
    localizer: torch.Tensor | None = None


class WeaklocNet(nn.Module):
    """Backbone + 1x1-conv classifier + global average pooling.

    Args:
        config: the model's :class:`ModelConfig`.
        pretrained: ``"imagenet"``, ``"none"`` or a weights file (see :mod:`weakloc.models.backbone`).
    """

    def __init__(self, config: ModelConfig, pretrained: str = "none"):
        super().__init__()
        if config.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {config.task!r}")
        if config.head not in HEADS:
            raise WeaklocError(f"unknown head {config.head!r}: use one of {', '.join(HEADS)}")
        self.config = config
        self.backbone = create_backbone(config.backbone, pretrained, config.output_stride, config.input_size)
        if config.mean is None or config.std is None:
            config.mean, config.std = input_normalization(self.backbone)
        if config.cbam_stages:
            insert_cbam(self.backbone, list(config.cbam_stages))
        if config.adl_stages:
            insert_adl(self.backbone, list(config.adl_stages))
        self.dropout = nn.Dropout2d(config.drop_rate)  # whole channels: same as dropout on pooled features
        self.classifier = nn.Conv2d(self.backbone.num_features, len(config.classes), kernel_size=1)
        info = self.backbone.feature_info
        dicts = info if isinstance(info, list) else info.get_dicts()
        n = len(dicts)
        self._attention_indices: list[int] = []
        self._density_index: int | None = None
        self.counting_head = None
        if config.counting:
            density_channels = self.backbone.num_features
            if config.density_stage is not None:
                if not -n <= config.density_stage < n:
                    raise WeaklocError(f"density stage {config.density_stage} must be an index in -{n}..{n - 1}")
                self._density_index = config.density_stage % n
                density_channels = dicts[self._density_index]["num_chs"]
            reduction = dicts[-1 if self._density_index is None else self._density_index].get("reduction")
            positions = math.ceil(config.input_size / reduction) ** 2 if reduction else None
            self.counting_head = CountingHead(self.backbone.num_features, len(config.classes), config.counting,
                                              density_channels=density_channels, hidden=config.density_hidden, positions=positions,
                                              context=config.density_context and self._density_index is not None)
        self.localizer = nn.Conv2d(self.backbone.num_features, len(config.classes), 1) if config.localizer else None
        self.attention_head = None
        if config.head == "attention":
            stages = sorted({s % n for s in config.attention_stages if -n <= s < n})
            if len(stages) != len(config.attention_stages) or not stages:
                raise WeaklocError(f"attention stages {config.attention_stages} must be distinct indices in -{n}..{n - 1}")
            self._attention_indices = stages
            self.attention_head = AttentionHead([dicts[s]["num_chs"] for s in stages], self.backbone.num_features,
                                                len(config.classes), normalize=config.attention_norm)
        # the stages one forward pass must return besides the last map (attention and density inputs)
        self._intermediate_indices = sorted(set(self._attention_indices) | ({self._density_index} - {None}))

    @property
    def num_classes(self) -> int:
        return self.classifier.out_channels

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, C, h, w)``; transformer tokens are laid out on their patch grid."""
        return to_grid(self.backbone.forward_features(x), self.backbone, tuple(x.shape[-2:]))

    def forward_maps(self, x: torch.Tensor, on_features=None) -> ModelOutput:
        """Logits, class maps of every class, features and attention maps from one forward pass.

        ``on_features`` (optional) may replace the last feature map before the head reads it
        (the explanation engine makes it a leaf there).
        """
        local: list[torch.Tensor] = []
        density_features = None
        wanted = self._intermediate_indices
        if wanted:
            final, inter = self.backbone.forward_intermediates(x, indices=wanted)
            by_index = dict(zip(wanted, inter))
            local = [by_index[i] for i in self._attention_indices]
            density_features = by_index.get(self._density_index)
            f = to_grid(final, self.backbone, tuple(x.shape[-2:]))
        else:
            f = self.features(x)
        if on_features is not None:
            f = on_features(f)
        fd = self.dropout(f)
        maps = self.classifier(fd)
        attention: tuple = ()
        logits = self._pooled_logits(fd, maps)
        if self.attention_head is not None:
            local_logits, attn = self.attention_head(local, f)
            logits = logits + local_logits
            attention = tuple(attn)
        counts = density = head_counts = None
        if self.counting_head is not None:
            counts, density, head_counts = self.counting_head(f, density_features)
        localizer = self.localizer(f) if self.localizer is not None else None
        return ModelOutput(logits, maps, f, attention, counts, density, head_counts, localizer)

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from a last feature map alone ``(N, C, h, w) -> (N, K)`` (not for the attention head,
        whose logits also read earlier stages)."""
        if self.attention_head is not None:
            raise WeaklocError("the attention head also reads earlier stages; name a target layer instead")
        return self._pooled_logits(features)

    def _pooled_logits(self, features: torch.Tensor, maps: torch.Tensor | None = None) -> torch.Tensor:
        """The classifier on pooled features: TAP for the ``tap`` head, else the mean of the class maps
        (``maps``, the classifier applied at every position, when already computed)."""
        if self.config.head == "tap":
            return self.classifier(thresholded_average_pool(features, self.config.tap_threshold)[:, :, None, None])[:, :, 0, 0]
        return (self.classifier(features) if maps is None else maps).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> logits ``(B, K)``."""
        return self.forward_maps(x).logits

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax (single-label) or sigmoid (multi-label) of ``(B, K)`` logits."""
        return logits.softmax(-1) if self.config.task == "single" else logits.sigmoid()

    def new_parameters(self) -> list[nn.Parameter]:
        """Parameters that start untrained: classifier, attention, counting and localizer heads, CBAM blocks (head learning rate,
        trained from the first epoch)."""
        cbam = [p for m in self.backbone.modules() if isinstance(m, CBAM) for p in m.parameters()]
        head = list(self.classifier.parameters())
        for extra in (self.attention_head, self.counting_head, self.localizer):
            if extra is not None:
                head += list(extra.parameters())
        return head + cbam

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """The backbone's own parameters (without inserted blocks), earliest layers first."""
        new = {id(p) for p in self.new_parameters()}
        return [p for p in self.backbone.parameters() if id(p) not in new]

    def backbone_groups(self, n: int = 3) -> list[list[nn.Parameter]]:
        """Backbone parameters in ``n`` consecutive groups, earliest layers first (for layer-wise LRs)."""
        params = self.pretrained_parameters()
        size = -(-len(params) // n)
        return [params[i:i + size] for i in range(0, len(params), size)]
