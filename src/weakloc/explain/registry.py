"""The one registry of explanation methods, shared by the Python API and the CLI."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from weakloc.errors import WeaklocError
from weakloc.explain import methods, perturbation, rollout


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
    key = name.lower().replace("_", "-").replace("grad-cam", "gradcam").replace("gradcampp", "gradcam++").replace("score-cam", "scorecam")
    key = {"gradcamplusplus": "gradcam++", "ablation-cam": "ablationcam", "eigen-cam": "eigencam", "layer-cam": "layercam"}.get(key, key)
    if key not in METHODS:
        raise WeaklocError(f"unknown explanation method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[key]


for _name, _fn, _grad, _relu, _summary in [
    ("cam", methods.cam, False, False, "Class activation map from the classifier weights; all classes in one forward pass"),
    ("gradcam", methods.gradcam, True, True, "Grad-CAM: gradient-weighted activations of any layer, gradients only to that layer"),
    ("gradcam++", methods.gradcam_pp, True, True, "Grad-CAM++: positive gradients weighted by closed-form alphas"),
    ("smooth-gradcam++", methods.smooth_gradcam_pp, True, True, "Smooth Grad-CAM++: Grad-CAM++ with gradient moments averaged over noisy inputs"),
    ("hirescam", methods.hirescam, True, True, "HiResCAM: element-wise gradient x activation, summed over channels"),
    ("gradcam-elementwise", methods.gradcam_elementwise, True, True, "Grad-CAM element-wise: ReLU(gradient x activation) summed over channels"),
    ("xgradcam", methods.xgradcam, True, True, "XGrad-CAM: activation-normalised gradient weights"),
    ("layercam", methods.layercam, True, True, "Layer-CAM: ReLU(gradient) x activation per element; good on early layers"),
    ("finercam", methods.finercam, True, True, "Finer-CAM: Grad-CAM of the target against its most similar classes"),
    ("scorecam", perturbation.scorecam, False, True, "Score-CAM: channels weighted by the score of the input masked by each"),
    ("sscam", perturbation.sscam, False, True, "SS-CAM: Score-CAM with scores averaged over noisy masks"),
    ("iscam", perturbation.iscam, False, True, "IS-CAM: Score-CAM with scores integrated from a black image to the masked one"),
    ("ablationcam", perturbation.ablationcam, False, True, "Ablation-CAM: channels weighted by the score drop when each is ablated"),
    ("eigencam", methods.eigencam, False, True, "Eigen-CAM: first principal component of the activations (class-agnostic, batched SVD)"),
    ("eigengradcam", methods.eigengradcam, True, True, "EigenGrad-CAM: first principal component of gradient x activation"),
    ("attention", methods.attention_maps, False, False, "The trainable attention head's own maps (models trained with --head attention)"),
    ("localizer", methods.localizer_maps, False, False, "The second-stage localizer's object maps (models trained with --teacher)"),
    ("box", methods.box_maps, False, False, "The second-stage class-agnostic box regressor's box (models trained with --teacher)"),
    ("rollout", rollout.rollout, False, False, "Attention rollout through every transformer layer (head fusion, discard ratio)"),
    ("grad-rollout", rollout.grad_rollout, True, False, "Gradient-weighted attention rollout, per target"),
    ("random", methods.random_baseline, False, False, "Baseline: uniform random map"),
    ("sobel", methods.sobel_baseline, False, False, "Baseline: image edge magnitude (model-free)"),
]:
    register(ExplainMethod(_name, _fn, _grad, _relu, _summary))

from weakloc.explain import conceptor as _conceptor  # noqa: E402,F401 -- registers the Conceptor-CAM methods
from weakloc.explain import ddt as _ddt  # noqa: E402

register(ExplainMethod("ddt", _ddt.ddt, False, True,
                       "Co-localization (DDT): each class's principal descriptor direction over its training images (weakloc ddt)"))
register(ExplainMethod("cam+ddt", _ddt.cam_ddt, False, False,
                       "CAM blended with the class's co-localization map: which object (CAM), how far it extends (DDT)"))
