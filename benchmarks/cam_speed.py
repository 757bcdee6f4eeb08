"""Images/s of heatmap methods: weakloc vs pytorch-grad-cam vs TorchCAM, same model, batch, input
and device, in one run, against the ceiling (forward + gradient to the layer; forward only for CAM).

    uv run python benchmarks/cam_speed.py                       # CPU: ResNet-50, 224 px, batch 8
    uv run python benchmarks/cam_speed.py --device cuda --batch 64

    uv run python benchmarks/cam_speed.py --methods scorecam,ablationcam --backbone resnet18 --size 112 --batch 2

Random weights (speed only), 1,000 classes like an ImageNet head. The ceiling is a plain forward for
CAM and the gradient-free methods (their unavoidable first pass) and forward + gradient to the layer
for the gradient methods; "cam-all" is the CAM of all classes at the feature map's resolution. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from weakloc.explain import explain
from weakloc.models import ModelConfig, WeaklocNet
from weakloc.models.backbone import for_inference


def timed(fn, repeats: int, device: str) -> float:
    """Fastest of ``repeats`` runs after one warm-up, in seconds (the minimum is the estimate least
    disturbed by other work on a shared machine)."""
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
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--methods", default="gradcam,gradcam++,xgradcam,layercam,hirescam,cam,cam-all,eigencam")
    ap.add_argument("--passes", type=int, default=2, help="Time everything this many times over; keep each one's best.")
    ap.add_argument("--chunk", type=int, default=64, help="Masked inputs / ablated copies per forward (Score-CAM, Ablation-CAM).")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="weakloc's autocast dtype.")
    ap.add_argument("--layout", default="nchw", choices=["nchw", "channels-last"],
                    help="The shared model's weight layout (channels-last: what load_model gives since 2026-12-01).")
    args = ap.parse_args()
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    dev = args.device
    torch.manual_seed(0)
    model = WeaklocNet(ModelConfig(backbone=args.backbone, classes=[f"c{i}" for i in range(1000)], input_size=args.size, drop_rate=0.0)).to(dev).eval()
    if args.layout == "channels-last":  # every library runs the same model, so the comparison stays like for like
        model = for_inference(model, dev)
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev)
    layer = model.backbone.layer4 if hasattr(model.backbone, "layer4") else None
    rows = []

    def ceiling_grad():
        with torch.no_grad():  # the forward up to the layer records no graph ...
            f = model.features(x)
        with torch.enable_grad():  # ... and the gradient reaches only the layer
            f = f.requires_grad_(True)
            s = model.classifier(f).mean((2, 3)).max(1).values.sum()
            torch.autograd.grad(s, f)

    def ceiling_fwd():
        with torch.no_grad():
            model(x)

    start = time.perf_counter()
    while time.perf_counter() - start < 5:  # warm the machine up (allocator, clocks) before any timing
        ceiling_grad()
        explain(model, x, "gradcam")
    t_grad = timed(ceiling_grad, args.repeats, dev)
    t_fwd = timed(ceiling_fwd, args.repeats, dev)
    peers = {}
    try:
        import pytorch_grad_cam as pgc
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        peers["pgc"] = {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "xgradcam": pgc.XGradCAM, "layercam": pgc.LayerCAM,
                        "hirescam": pgc.HiResCAM, "eigencam": pgc.EigenCAM, "scorecam": pgc.ScoreCAM, "ablationcam": pgc.AblationCAM}
    except ImportError:
        pass
    try:
        import torchcam.methods as tcm

        peers["torchcam"] = {"gradcam": tcm.GradCAM, "gradcam++": tcm.GradCAMpp, "xgradcam": tcm.XGradCAM, "layercam": tcm.LayerCAM,
                             "scorecam": tcm.ScoreCAM, "cam": None}
    except ImportError:
        pass
    with torch.no_grad():
        pred = model(x).argmax(1).tolist()
    names = args.methods.split(",")
    for name in names * args.passes:  # every pass times every library; the best pass counts
        target = "all" if name == "cam-all" else "predicted"
        method = "cam" if name == "cam-all" else name
        options = {"chunk": args.chunk} if method in ("scorecam", "ablationcam") else {}
        if name == "cam-all":
            options["size"] = "native"  # 1,000 maps per image at the feature map's resolution
        t_ours = timed(lambda: explain(model, x, method, target=target, dtype=dtype, **options), args.repeats, dev)
        t_pgc = t_tc = None
        if method in peers.get("pgc", {}) and name != "cam-all":
            cam = peers["pgc"][method](model=model, target_layers=[layer])
            if method == "scorecam":
                cam.batch_size = args.chunk
            elif method == "ablationcam":
                cam.batch_size = args.chunk
            t_pgc = timed(lambda: cam(input_tensor=x, targets=[ClassifierOutputTarget(p) for p in pred]), max(1, args.repeats // 2), dev)
            cam.activations_and_grads.release()
        if method in peers.get("torchcam", {}) and name != "cam-all":
            if method == "cam":
                t_tc = None  # torchcam's CAM needs a Linear head; weakloc's head is a 1x1 conv (same maths)
            else:
                kwargs = {"batch_size": args.chunk} if method == "scorecam" else {}
                extractor = peers["torchcam"][method](model, target_layer="backbone.layer4", **kwargs)

                def run_tc():
                    if method == "scorecam":
                        with torch.no_grad():
                            model(x)
                        extractor(pred)
                    else:
                        scores = model(x)
                        extractor(scores.argmax(1).tolist(), scores)

                t_tc = timed(run_tc, args.repeats, dev)
                extractor.remove_hooks()
        ceiling = t_fwd if method in ("cam", "eigencam", "scorecam", "ablationcam") else t_grad
        rows.append((name, args.batch / t_ours, args.batch / t_pgc if t_pgc else None, args.batch / t_tc if t_tc else None, args.batch / ceiling))
    t_grad = min(t_grad, timed(ceiling_grad, args.repeats, dev))  # ceilings again at the end: the best of both
    t_fwd = min(t_fwd, timed(ceiling_fwd, args.repeats, dev))
    best: dict = {}
    for n, o, p, t, c in rows:
        keep = best.get(n)
        best[n] = (n, max(o, keep[1]) if keep else o, max(p, keep[2]) if keep and p else p, max(t, keep[3]) if keep and t else t, c)
    rows = [best[n] for n in dict.fromkeys(names)]
    rows = [(n, o, p, t, args.batch / (t_fwd if n in ("cam", "cam-all", "eigencam", "scorecam", "ablationcam") else t_grad))
            for n, o, p, t, _ in rows]
    machine = torch.cuda.get_device_name() if dev.startswith("cuda") else f"CPU {platform.machine()}, {torch.get_num_threads()} threads"
    print(f"{args.backbone}, {args.size} px, batch {args.batch}, weakloc {args.dtype} (peers fp32), {args.layout} weights, {machine}, torch {torch.__version__}")
    print("| method | weakloc img/s | pytorch-grad-cam img/s | TorchCAM img/s | ceiling img/s | vs pytorch-grad-cam | vs TorchCAM | of ceiling |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, ours, pgc_, tc, ceil in rows:
        f = lambda v: f"{v:.1f}" if v else "-"  # noqa: E731
        r = lambda a, b: f"{a / b:.2f}x" if b else "-"  # noqa: E731
        print(f"| {name} | {ours:.1f} | {f(pgc_)} | {f(tc)} | {ceil:.1f} | {r(ours, pgc_)} | {r(ours, tc)} | {ours / ceil:.2f} |")


if __name__ == "__main__":
    main()
