"""Effect of calibrating from K annotated images per class (K = 0, 5, 10) on a trained model.

    uv run python benchmarks/calibration_effect.py MODEL LABELS ANNOTATIONS --methods cam,gradcam

K = 0: the uncalibrated default (threshold 0.2 as in the CAM paper, the model's own map method).
K > 0: `weakloc calibrate` on K images per class of the train split picks the threshold and the
method; the test split is then scored. MaxBoxAccV2 does not depend on the threshold (it takes the
best one), so the table gives GT-known Loc at the chosen threshold, the chosen method's MaxBoxAccV2
and the thresholds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from weakloc.evaluate.calibrate import calibrate
from weakloc.evaluate.run import evaluate_model
from weakloc.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("labels", type=Path)
    ap.add_argument("annotations", type=Path)
    ap.add_argument("--methods", default="cam")
    ap.add_argument("--ks", default="0,5,10")
    ap.add_argument("--split", default="test")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    methods = tuple(args.methods.split(","))
    print(f"{args.model}: calibration from K annotated train images per class; {args.split} split scored")
    print("| K | method | threshold | GT-known Loc | MaxBoxAccV2 |")
    print("|---:|---|---:|---:|---:|")
    for k in (int(v) for v in args.ks.split(",")):
        model = load_model(args.model)
        if k == 0:
            method, tau = methods[0], 0.2
        else:
            res = calibrate(model, args.labels, args.annotations, per_class=k, methods=methods, seed=args.seed)
            method, tau = res.method, res.threshold
        rep = evaluate_model(model, args.labels, args.annotations, method=method, split=args.split, gt_known_tau=tau)
        loc = rep.localization
        print(f"| {k} | {method} | {tau:.2f} | {loc.gt_known_loc:.1f} | {loc.max_box_acc_v2:.1f} |")


if __name__ == "__main__":
    main()
