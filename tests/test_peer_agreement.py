"""weakloc's maps against pytorch-grad-cam 1.5 (and CAM against torchcam) on the same model and input.

pytorch-grad-cam post-processes every map as ReLU -> min-max (eps 1e-7) -> bilinear resize
(``cv2.resize``) -> min-max; the tests apply that same post-processing to weakloc's raw map, so
any difference is in the maps themselves. Tolerance: 1e-4 after normalisation.
"""

import cv2
import numpy as np
import pytest
import torch

from weakloc.explain import explain

gradcam_lib = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

PEERS = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "hirescam": "HiResCAM",
    "gradcam-elementwise": "GradCAMElementWise",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "scorecam": "ScoreCAM",
    "ablationcam": "AblationCAM",
}
GRADIENT_ONLY = ["gradcam", "gradcam++", "hirescam", "gradcam-elementwise", "xgradcam", "layercam"]


def _peer_postprocess(raw: np.ndarray, size: int) -> np.ndarray:
    out = []
    for m in raw:
        m = np.maximum(m, 0)
        m = m - m.min()
        m = m / (1e-7 + m.max())
        m = cv2.resize(np.float32(m), (size, size))
        m = m - m.min()
        out.append(m / (1e-7 + m.max()))
    return np.stack(out)


@pytest.fixture()
def resnet():
    from weakloc.models import ModelConfig, WeaklocNet

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", classes=[f"c{i}" for i in range(5)], input_size=96, drop_rate=0.0)
    return WeaklocNet(cfg, pretrained="none").eval()


@pytest.mark.parametrize("name", list(PEERS))
def test_matches_pytorch_grad_cam_on_a_resnet(resnet, name):
    n = 2 if name in ("scorecam", "ablationcam") else 3  # these run one forward per channel and image
    x = torch.randn(n, 3, 96, 96)
    targets = [0, 3, 4][:n]
    peer_cls = getattr(gradcam_lib, PEERS[name])
    with peer_cls(model=resnet, target_layers=[resnet.backbone.layer4]) as peer:
        theirs = peer(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])
    h = explain(resnet, x, name, target=targets, size=(3, 3))  # raw maps at the layer's own resolution
    ours = _peer_postprocess(h.raw[:, 0].double().numpy(), 96)
    assert np.abs(ours - theirs).max() <= 1e-4


def test_finercam_matches_pytorch_grad_cam(resnet):
    from pytorch_grad_cam import FinerCAM

    x = torch.randn(3, 3, 96, 96)
    with FinerCAM(resnet, target_layers=[resnet.backbone.layer4]) as peer:
        theirs = peer(input_tensor=x, targets=None, alpha=0.6)  # main class = predicted, 3 closest classes
    h = explain(resnet, x, "finercam", target="predicted", size=(3, 3), alpha=0.6)
    ours = _peer_postprocess(h.raw[:, 0].double().numpy(), 96)
    assert np.abs(ours - theirs).max() <= 1e-4


def _vit(**kw):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=3, num_classes=5, **kw).eval()


def _token_reshape(prefix: int):
    """The reshape pytorch-grad-cam needs to be handed for a ViT (weakloc needs none)."""
    def reshape(t):
        t = t[:, prefix:]
        side = int(t.shape[1] ** 0.5)
        return t.reshape(t.shape[0], side, side, t.shape[2]).permute(0, 3, 1, 2)
    return reshape


@pytest.mark.parametrize("reg_tokens", [0, 4], ids=["vit", "vit-registers"])
@pytest.mark.parametrize("name", GRADIENT_ONLY + ["scorecam", "ablationcam"])
def test_matches_pytorch_grad_cam_on_a_vit(name, reg_tokens):
    vit = _vit(reg_tokens=reg_tokens)
    assert vit.num_prefix_tokens == 1 + reg_tokens
    x = torch.randn(2, 3, 64, 64)
    targets = [1, 4]
    kwargs = {}
    if name == "ablationcam":
        from pytorch_grad_cam.ablation_layer import AblationLayerVit

        kwargs["ablation_layer"] = AblationLayerVit()
    peer_cls = getattr(gradcam_lib, PEERS[name])
    # weakloc picks blocks[-1].norm1 by itself and lays the tokens out from the model's own patch grid
    with peer_cls(model=vit, target_layers=[vit.blocks[-1].norm1], reshape_transform=_token_reshape(1 + reg_tokens), **kwargs) as peer:
        theirs = peer(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])
    h = explain(vit, x, name, target=targets, size=(4, 4))
    ours = _peer_postprocess(h.raw[:, 0].double().numpy(), 64)
    assert np.abs(ours - theirs).max() <= 1e-4


def test_eigen_projection_matches_pytorch_grad_cam_up_to_sign(resnet):
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    from weakloc.explain.methods import principal_projection

    acts = resnet.features(torch.randn(4, 3, 96, 96)).detach()
    theirs = get_2d_projection(acts.numpy().copy())
    ours = principal_projection(acts).numpy()
    for o, t in zip(ours, theirs):
        sign = np.sign((o * t).sum()) or 1.0
        assert np.abs(o - sign * t).max() <= 1e-4 * max(1.0, np.abs(t).max())


def test_cam_matches_torchcam(resnet):
    torchcam = pytest.importorskip("torchcam.methods")
    x = torch.randn(2, 3, 96, 96)
    # torchcam's CAM reads a Linear classifier after global pooling: give it the equivalent view
    linear = torch.nn.Linear(resnet.classifier.in_channels, resnet.num_classes)
    linear.weight.data = resnet.classifier.weight.data[:, :, 0, 0].clone()
    linear.bias.data = resnet.classifier.bias.data.clone()

    class Features(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = resnet.backbone

        def forward(self, inp):
            return self.backbone.forward_features(inp)

    class GapLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.features = Features()
            self.pool = torch.nn.AdaptiveAvgPool2d(1)
            self.fc = linear

        def forward(self, inp):
            return self.fc(self.pool(self.features(inp)).flatten(1))

    peer_model = GapLinear().eval()
    with torchcam.CAM(peer_model, target_layer="features", fc_layer="fc") as extractor:
        scores = peer_model(x)
        assert torch.allclose(scores, resnet(x), atol=1e-5)
        theirs = extractor([1, 2], scores)[0]  # (B, h, w), min-max normalised
    h = explain(resnet, x, "cam", target=[1, 2], size=(3, 3), relu=False)  # torchcam applies no ReLU to CAM
    assert (h.normalized[:, 0] - theirs).abs().max() <= 1e-4
