"""Images/s of heatmap methods: weakloc vs pytorch-grad-cam vs TorchCAM, same model, batch, input
and device, in one run, against the ceiling (forward + gradient to the layer; forward only for CAM).

    uv run python benchmarks/cam_speed.py                       # CPU: ResNet-50, 224 px, batch 8
    uv run python benchmarks/cam_speed.py --device cuda --batch 64

Random weights (speed only). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from weakloc.explain import explain
from weakloc.models import ModelConfig, WeaklocNet


def timed(fn, repeats: int, device: str) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--methods", default="gradcam,gradcam++,xgradcam,layercam,hirescam,cam,eigencam")
    args = ap.parse_args()
    dev = args.device
    torch.manual_seed(0)
    model = WeaklocNet(ModelConfig(backbone=args.backbone, classes=[f"c{i}" for i in range(20)], input_size=args.size, drop_rate=0.0)).to(dev).eval()
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev)
    layer = model.backbone.layer4 if hasattr(model.backbone, "layer4") else None
    rows = []

    def ceiling_grad():
        with torch.enable_grad():
            f = model.features(x).detach().requires_grad_(True)  # forward, then gradient to the layer
            s = model.classifier(f).mean((2, 3)).max(1).values.sum()
            torch.autograd.grad(s, f)

    def ceiling_fwd():
        with torch.no_grad():
            model(x)

    t_grad = timed(ceiling_grad, args.repeats, dev)
    t_fwd = timed(ceiling_fwd, args.repeats, dev)
    peers = {}
    try:
        import pytorch_grad_cam as pgc
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        peers["pgc"] = {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "xgradcam": pgc.XGradCAM, "layercam": pgc.LayerCAM,
                        "hirescam": pgc.HiResCAM, "eigencam": pgc.EigenCAM}
    except ImportError:
        pass
    try:
        import torchcam.methods as tcm

        peers["torchcam"] = {"gradcam": tcm.GradCAM, "gradcam++": tcm.GradCAMpp, "xgradcam": tcm.XGradCAM, "layercam": tcm.LayerCAM}
    except ImportError:
        pass
    for name in args.methods.split(","):
        t_ours = timed(lambda: explain(model, x, name, target="predicted"), args.repeats, dev)
        t_pgc = t_tc = None
        if name in peers.get("pgc", {}):
            cam = peers["pgc"][name](model=model, target_layers=[layer])
            with torch.no_grad():
                pred = model(x).argmax(1).tolist()
            t_pgc = timed(lambda: cam(input_tensor=x, targets=[ClassifierOutputTarget(p) for p in pred]), max(1, args.repeats // 2), dev)
            cam.activations_and_grads.release()
        if name in peers.get("torchcam", {}):
            extractor = peers["torchcam"][name](model, target_layer="backbone.layer4")

            def run_tc():
                scores = model(x)
                extractor(scores.argmax(1).tolist(), scores)

            t_tc = timed(run_tc, args.repeats, dev)
            extractor.remove_hooks()
        ceiling = t_fwd if name in ("cam", "eigencam") else t_grad
        rows.append((name, args.batch / t_ours, args.batch / t_pgc if t_pgc else None, args.batch / t_tc if t_tc else None, args.batch / ceiling))
    machine = torch.cuda.get_device_name() if dev.startswith("cuda") else f"CPU {platform.machine()}, {torch.get_num_threads()} threads"
    print(f"{args.backbone}, {args.size} px, batch {args.batch}, fp32, {machine}, torch {torch.__version__}")
    print("| method | weakloc img/s | pytorch-grad-cam img/s | TorchCAM img/s | ceiling img/s | vs pytorch-grad-cam | vs TorchCAM | of ceiling |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, ours, pgc_, tc, ceil in rows:
        f = lambda v: f"{v:.1f}" if v else "-"  # noqa: E731
        r = lambda a, b: f"{a / b:.2f}x" if b else "-"  # noqa: E731
        print(f"| {name} | {ours:.1f} | {f(pgc_)} | {f(tc)} | {ceil:.1f} | {r(ours, pgc_)} | {r(ours, tc)} | {ours / ceil:.2f} |")


if __name__ == "__main__":
    main()
