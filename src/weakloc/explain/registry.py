"""The one registry of explanation methods, shared by the Python API and the CLI."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from weakloc.errors import WeaklocError
from weakloc.explain import methods


@dataclass(frozen=True)
class ExplainMethod:
    """A registered heatmap method.

    Attributes:
        name: registry key (``--method NAME``).
        fn: ``(model, images, targets_fn, layer) -> (maps (B,T,h,w), targets (B,T), logits (B,K))``.
        uses_gradients: needs a backward pass.
        relu: the method's customary clamp of negative evidence before normalisation.
        summary: one line for ``weakloc methods``.
    """

    name: str
    fn: Callable
    uses_gradients: bool
    relu: bool
    summary: str


METHODS: dict[str, ExplainMethod] = {}


def register(method: ExplainMethod) -> ExplainMethod:
    """Add a method to :data:`METHODS` (names are unique)."""
    if method.name in METHODS:
        raise ValueError(f"explanation method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> ExplainMethod:
    """The method called ``name``, or a :class:`WeaklocError` listing the known ones."""
    key = name.lower().replace("_", "-").replace("gradcampp", "gradcam++").replace("grad-cam", "gradcam")
    if key not in METHODS:
        raise WeaklocError(f"unknown explanation method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[key]


register(ExplainMethod("cam", methods.cam, False, False, "Class activation map from the classifier weights; all classes in one forward pass"))
register(ExplainMethod("gradcam", methods.gradcam, True, True, "Grad-CAM: gradient-weighted activations of any layer, gradients only to that layer"))
register(ExplainMethod("gradcam++", methods.gradcam_pp, True, True, "Grad-CAM++: positive gradients weighted by closed-form alphas"))
register(ExplainMethod("hirescam", methods.hirescam, True, True, "HiResCAM: element-wise gradient x activation, summed over channels"))
register(ExplainMethod("gradcam-elementwise", methods.gradcam_elementwise, True, True, "Grad-CAM element-wise: ReLU(gradient x activation) summed over channels"))
register(ExplainMethod("xgradcam", methods.xgradcam, True, True, "XGrad-CAM: activation-normalised gradient weights"))
register(ExplainMethod("layercam", methods.layercam, True, True, "Layer-CAM: ReLU(gradient) x activation per element; good on early layers"))
register(ExplainMethod("eigencam", methods.eigencam, False, True, "Eigen-CAM: first principal component of the activations (class-agnostic, batched SVD)"))
register(ExplainMethod("eigengradcam", methods.eigengradcam, True, True, "EigenGrad-CAM: first principal component of gradient x activation"))
register(ExplainMethod("random", methods.random_baseline, False, False, "Baseline: uniform random map"))
register(ExplainMethod("sobel", methods.sobel_baseline, False, False, "Baseline: image edge magnitude (model-free)"))
