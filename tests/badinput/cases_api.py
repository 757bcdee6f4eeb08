"""Python API arguments: ``explain``, ``localize_images``, ``explain_images``, ``evaluate_model``,
``calibrate``, ``fine_tune``, ``load_model`` and the
region / threshold functions, called with tensors of the wrong shape or dtype, out-of-range numbers,
wrong types and unknown names.

What the issue asks: a bad argument raises a :class:`~weakloc.errors.WeaklocError` subclass whose
one-line message names the argument (the Python spelling: ``threshold``, ``chunk``); a valid edge
value works and gives a correct result.
"""

from __future__ import annotations

import math
from pathlib import Path

from . import files as F
from .harness import Api, Case, Env, Result

E, OK = "error", "ok"
TINY = {"backbone": "test_resnet", "pretrained": "none", "input_size": 32, "epochs": 1, "batch_size": 4, "progress": False,
        "workers": 0}
#: fine_tune's deprecated keywords (they warn and still work) -> the new ones
OLD_KEYWORDS = {"image_size": "input_size", "num_workers": "workers", "val_data": "val", "map_options": "maps"}


def _setup(env: Env) -> None:
    env.model()
    env.data()
    folder = env.dir("imgs")
    (folder / "good.png").write_bytes(F.good_png(seed=3))
    env.set(imgs=folder)


def _net(env: Env):
    from weakloc.models import load_model

    return load_model(env["model"], "cpu")


def _x(shape=(1, 3, 32, 32), dtype=None):
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    return x if dtype is None else x.to(dtype)


CASES: list[Case] = []


def api(cid: str, fn, expect, match=None, check=None, text: str = "", note: str = "", build=_setup):
    expect = (expect,) if isinstance(expect, str) else expect
    if match and match.replace("_", "").isalpha() and match.islower():  # a Python argument: its CLI spelling is fine too
        match = "|".join(dict.fromkeys([match, "--" + match.replace("_", "-"), match.replace("_", " ")]))
    CASES.append(Case(f"api/{cid}", "api", build, Api(fn, text or cid), expect, match=(match,) if match else (),
                      checks={OK: check} if OK in expect else {}, note=note))


def ok_if(pred, what: str):
    def check(env: Env, res: Result) -> None:
        assert pred(res.value), f"{what} (got {str(res.value)[:200]})"

    return check


# --- explain ------------------------------------------------------------------------------------


def _explain(images=None, **kw):
    def call(env: Env):
        from weakloc.explain import explain

        x = _x() if images is None else images() if callable(images) else images
        return explain(_net(env), x, **kw)

    return call


def _maps_ok(shape=None):
    def pred(h) -> bool:
        n = h.normalized
        return bool(n.isfinite().all()) and float(n.min()) >= 0 and float(n.max()) <= 1 and (shape is None or tuple(n.shape) == shape)

    return ok_if(pred, f"normalised maps finite in [0, 1]{f' of shape {shape}' if shape else ''}")


def _torch(attr):
    import torch

    return getattr(torch, attr)


api("explain/images_3d", _explain(lambda: _x((3, 32, 32))), E, "images", note="issue: a 3-D tensor crashes")
api("explain/images_one_channel", _explain(lambda: _x((1, 1, 32, 32))), E, "images", note="issue: a 1-channel batch crashes")
api("explain/images_uint8", _explain(lambda: (_x() * 50 + 128).clamp(0, 255).to(_torch("uint8"))), E, "images",
    note="issue: uint8 images crash")
api("explain/images_list", _explain(lambda: [[0.0] * 32] * 32), E, "images")
api("explain/images_numpy", _explain(lambda: _x().numpy()), E, "images")
api("explain/images_empty_batch", _explain(lambda: _x((0, 3, 32, 32))), (E, OK), "images",
    check=ok_if(lambda h: h.normalized.shape[0] == 0, "an empty batch gives no maps"))
api("explain/images_nan", _explain(lambda: _x() * float("nan")), (E, OK), "images|NaN|finite", check=_maps_ok())
api("explain/images_float64", _explain(lambda: _x(dtype=_torch("float64"))), (OK, E), "images", check=_maps_ok((1, 1, 32, 32)))
api("explain/method_unknown", _explain(method="no_such_method"), E, "no_such_method")
api("explain/target_true", _explain(target=True), E, "target", note="issue: explain(target=True) is accepted")
api("explain/target_float", _explain(target=1.5), E, "target", note="issue: float targets are accepted")
api("explain/target_none", _explain(target=None), OK, check=_maps_ok((1, 1, 32, 32)))
api("explain/target_top0", _explain(target="top0"), E, "top0")
api("explain/target_negative", _explain(target=-1), E, "-1")
api("explain/target_out_of_range", _explain(target=3), E, "3")
api("explain/target_wrong_length", _explain(target=["star", "square"]), E, "target")
api("explain/target_unknown_class", _explain(target="hexagon"), E, "hexagon")
api("explain/layer_unknown", _explain(layer="no.such.layer"), E, "no.such.layer|layer")
api("explain/fusion_unknown", _explain(fusion="foo"), E, "fusion", note="an unknown fusion is ignored with one layer")
api("explain/dtype_string", _explain(dtype="fp16"), E, "dtype")
api("explain/dtype_word_int8", _explain(dtype="int8"), E, "dtype")
api("explain/normalization_unknown", _explain(normalization="foo"), E, "foo")
api("explain/size_zero", _explain(size=(0, 0)), E, "size", note="issue: size=(0, 0) crashes")
api("explain/size_negative", _explain(size=(-1, 5)), E, "size")
api("explain/size_word", _explain(size="big"), E, "size")
api("explain/chunk_zero", _explain(method="scorecam", chunk=0), E, "chunk", note="issue: chunk=0 crashes")
api("explain/chunk_negative", _explain(method="scorecam", chunk=-4), E, "chunk")
api("explain/num_samples_zero", _explain(method="sscam", num_samples=0), E, "num_samples")
api("explain/std_negative", _explain(method="sscam", std=-1.0), E, "std")
api("explain/unknown_option", _explain(nosuch=1), E, "nosuch")
api("explain/relu_word", _explain(relu="yes"), E, "relu")
api("explain/target_all", _explain(target="all"), OK, check=_maps_ok((1, 3, 32, 32)))
api("explain/size_16", _explain(size=(16, 16)), OK, check=_maps_ok((1, 1, 16, 16)))
api("explain/gradcam_batch_of_two", _explain(lambda: _x((2, 3, 32, 32)), method="gradcam"), OK, check=_maps_ok((2, 1, 32, 32)))


def _explain_tensor_target(env: Env):
    import torch

    from weakloc.explain import explain

    return explain(_net(env), _x(), target=torch.tensor([0.5]))


def _explain_dtype_int8(env: Env):
    import torch

    from weakloc.explain import explain

    return explain(_net(env), _x(), dtype=torch.int8)


def _explain_not_a_model(env: Env):
    from weakloc.explain import explain

    return explain("model", _x())


api("explain/target_float_tensor", _explain_tensor_target, E, "target", note="issue: float targets are accepted")
api("explain/dtype_torch_int8", _explain_dtype_int8, E, "dtype")
api("explain/model_is_a_string", _explain_not_a_model, E, "model")


# --- localize_images ------------------------------------------------------------------------------


def _localize(images="{imgs}", out="{out}", **kw):
    def call(env: Env):
        from weakloc.report.localization import localize_images

        imgs = [Path(i.format_map(env.vars)) for i in images] if isinstance(images, list) else (
            images.format_map(env.vars) if isinstance(images, str) else images)
        return localize_images(_net(env), imgs, None if out is None else out.format_map(env.vars), **kw)

    return call


def _boxes_inside(res) -> bool:
    sizes = {im["id"]: (im["width"], im["height"]) for im in res["images"]}
    for a in res["annotations"]:
        x, y, w, h = a["bbox"]
        W, H = sizes[a["image_id"]]
        if not (w > 0 and h > 0 and x >= -0.1 and y >= -0.1 and x + w <= W + 0.11 and y + h <= H + 0.11):
            return False
    return len(res["images"]) == 1


for name, value in [("1.5", 1.5), ("negative", -0.1), ("nan", float("nan")), ("inf", float("inf")), ("true", True),
                    ("word", "foo"), ("percentile_101", "percentile:101")]:
    api(f"localize_images/threshold_{name}", _localize(threshold=value), E, "threshold",
        note="issue: a float threshold outside [0, 1] is accepted in Python" if name in ("1.5", "negative") else "")
api("localize_images/keep_unknown", _localize(keep="foo"), E, "keep")
api("localize_images/batch_size_zero", _localize(batch_size=0), E, "batch_size")
api("localize_images/min_area_negative", _localize(min_area=-1), E, "min_area")
api("localize_images/display_size_zero", _localize(display_size=0), E, "display_size")
api("localize_images/images_empty_list", _localize(images=[]), E, "image")
api("localize_images/images_missing", _localize(images="{root}/no-such-images"), E, "no-such-images")
api("localize_images/target_unknown", _localize(target="hexagon"), E, "hexagon")
api("localize_images/method_unknown", _localize(method="no_such_method"), E, "no_such_method")
api("localize_images/count_views_unknown", _localize(count_views="sideways"), E, "count_views|sideways")
api("localize_images/threshold_0.3", _localize(threshold=0.3), OK, check=ok_if(_boxes_inside, "one image, boxes inside it"))
api("localize_images/no_out_folder", _localize(out=None), OK, check=ok_if(_boxes_inside, "one image, boxes inside it"))


def _localize_out_is_file(env: Env):
    from weakloc.report.localization import localize_images

    env.out.parent.mkdir(parents=True, exist_ok=True)
    env.out.write_text("a file")
    return localize_images(_net(env), env["imgs"], env.out)


api("localize_images/out_is_a_file", _localize_out_is_file, E, "out")


def _mapcfg(**kw):
    from weakloc.config import MapConfig

    return MapConfig(**kw)


def _typed(pred):
    """``pred`` of a typed result, which must also be a Result whose ``to_dict()`` item access mirrors."""

    def check(res) -> bool:
        from weakloc.results import Result as Typed

        d = res.to_dict() if isinstance(res, Typed) else None
        return d is not None and all(res[k] == d[k] for k in d) and pred(res)

    return check


# maps= (issue 17: explain_options= -> maps=, a flat dict of settings and method options, or a MapConfig)
api("localize_images/maps_method_unknown", _localize(maps={"method": "no_such_method"}), E, "no_such_method")
api("localize_images/maps_unknown_key", _localize(maps={"nosuch": 1}), E, "nosuch")
api("localize_images/maps_test_size_zero", _localize(maps={"test_size": 0}), E, "test_size",
    note="a test size of 0 must not fall back to the training size")
api("localize_images/maps_test_size_huge", _localize(maps={"test_size": 100000}), E, "test_size")
api("localize_images/maps_normalization_unknown", _localize(maps={"normalization": "foo"}), E, "normalization|foo")
api("localize_images/maps_string", _localize(maps="gradcam"), E, "maps")
api("localize_images/maps_num_samples_zero", _localize(maps={"method": "sscam", "num_samples": 0}), E, "num_samples")
api("localize_images/mapconfig_test_size_zero", lambda env: _localize(maps=_mapcfg(test_size=0))(env), E, "test_size")
api("localize_images/maps_test_size_48", _localize(maps={"test_size": 48}), OK,
    check=ok_if(_typed(_boxes_inside), "a typed result, one image, boxes inside it"))
api("localize_images/mapconfig_gradcam", lambda env: _localize(maps=_mapcfg(method="gradcam"))(env), OK,
    check=ok_if(_typed(_boxes_inside), "a typed result, one image, boxes inside it"))


# --- explain_images -------------------------------------------------------------------------------


def _explain_images(out="{out}", **kw):
    def call(env: Env):
        from weakloc.report.explanation import explain_images

        return explain_images(_net(env), env["imgs"], out.format_map(env.vars), **kw)

    return call


def _explained_one(res) -> bool:
    return len(res["images"]) == 1


api("explain_images/method_unknown", _explain_images(method="no_such_method"), E, "no_such_method")
api("explain_images/maps_test_size_zero", _explain_images(maps={"test_size": 0}), E, "test_size")
api("explain_images/maps_unknown_key", _explain_images(maps={"nosuch": 1}), E, "nosuch")
api("explain_images/batch_size_zero", _explain_images(batch_size=0), E, "batch_size")
api("explain_images/maps_test_size_48", _explain_images(maps={"test_size": 48}), OK,
    check=ok_if(_typed(_explained_one), "a typed result, one image explained"))


# --- evaluate_model -------------------------------------------------------------------------------


def _evaluate(annotations="{ann}", **kw):
    def call(env: Env):
        from weakloc.evaluate.run import evaluate_model

        kw.setdefault("split", "all")
        return evaluate_model(_net(env), env["labels"], annotations.format_map(env.vars), **kw)

    return call


def _report_ok(rep) -> bool:
    loc = rep["localization"]
    return all(math.isfinite(loc[k]) and 0 <= loc[k] <= 100 for k in ("MaxBoxAccV2", "IoU50")) and rep["images"] == 12


for name, value in [("zero", 0), ("two", 2), ("nan", float("nan")), ("negative", -0.1)]:
    api(f"evaluate_model/step_{name}", _evaluate(step=value), E, "step")
for name, value in [("5", 5), ("nan", float("nan"))]:
    api(f"evaluate_model/gt_known_tau_{name}", _evaluate(gt_known_tau=value), E, "gt_known_tau")
api("evaluate_model/split_unknown", _evaluate(split="foo"), E, "foo")
api("evaluate_model/batch_size_zero", _evaluate(batch_size=0), E, "batch_size")
api("evaluate_model/annotations_missing", _evaluate(annotations="{root}/no-ann.json"), E, "no-ann.json")
api("evaluate_model/method_unknown", _evaluate(method="no_such_method"), E, "no_such_method")
api("evaluate_model/gt_class_unknown", _evaluate(gt_class={"triangle": "hexagon"}), E, "hexagon")
api("evaluate_model/step_0.05", _evaluate(step=0.05), OK, check=ok_if(_typed(_report_ok), "metrics in [0, 100] over 12 images"))
api("evaluate_model/maps_test_size_zero", _evaluate(maps={"test_size": 0}), E, "test_size")
api("evaluate_model/maps_method_unknown", _evaluate(maps={"method": "no_such_method"}), E, "no_such_method")
api("evaluate_model/maps_unknown_key", _evaluate(maps={"nosuch": 1}), E, "nosuch")
api("evaluate_model/maps_test_size_48", _evaluate(maps={"test_size": 48}), OK,
    check=ok_if(_typed(_report_ok), "metrics in [0, 100] over 12 images"))


# --- calibrate ------------------------------------------------------------------------------------


def _calibrate(**kw):
    def call(env: Env):
        from weakloc.evaluate.calibrate import calibrate

        kw.setdefault("per_class", 2)
        return calibrate(_net(env), env["labels"], env["ann"], **kw)

    return call


def _calibration_ok(sizes):
    def pred(res) -> bool:
        return 0 <= res.threshold <= 1 and res.test_size in (*sizes, 32) and res["method"] == res.method

    return pred


for name, value in [("zero", (0,)), ("negative", (-32,)), ("huge", (100000,)), ("word", ("big",))]:
    api(f"calibrate/test_sizes_{name}", _calibrate(test_sizes=value), E, "test_sizes|test_size")
api("calibrate/methods_unknown", _calibrate(methods=("no_such_method",)), E, "no_such_method")
api("calibrate/per_class_zero", _calibrate(per_class=0), E, "per_class")
api("calibrate/maps_unknown_key", _calibrate(maps={"nosuch": 1}), E, "nosuch")
api("calibrate/test_sizes_32_48", _calibrate(test_sizes=(32, 48)), OK,
    check=ok_if(_typed(_calibration_ok((32, 48))), "a typed result: threshold in [0, 1], a candidate test size"))


# --- fine_tune (Trainer.fit is a stub) --------------------------------------------------------------


def _fine_tune(data="{labels}", **kw):
    def call(env: Env):
        from weakloc.train import fine_tune

        # an old keyword replaces its new one (both given would be refused as given twice)
        args = {**{k: v for k, v in TINY.items() if k not in {OLD_KEYWORDS.get(o) for o in kw}},
                **{k: v.format_map(env.vars) if isinstance(v, str) else v for k, v in kw.items()}}
        src = data(env) if callable(data) else data.format_map(env.vars)
        return fine_tune(src, env.out, **args)

    return call


def _reached(env: Env, res: Result) -> None:
    assert res.reached_training is not None, "training did not start"


FT_BAD = [
    ("epochs_zero", {"epochs": 0}, "epochs"), ("batch_size_zero", {"batch_size": 0}, "batch_size"),
    ("lr_negative", {"lr": -1.0}, "lr"), ("lr_nan", {"lr": float("nan")}, "lr"),
    ("image_size_zero", {"image_size": 0}, "image_size"), ("crop_scale_reversed", {"crop_scale": (1.0, 0.2)}, "crop_scale"),
    ("val_fraction_1.5", {"val_fraction": 1.5}, "val_fraction"), ("schedule_unknown", {"schedule": "foo"}, "schedule"),
    ("precision_unknown", {"precision": "foo"}, "precision"), ("devices_3", {"devices": 3}, "devices"),
    ("focal_gamma_negative", {"focal_gamma": -1.0, "loss": "focal"}, "focal_gamma"), ("hide_prob_2", {"hide_prob": 2.0}, "hide_prob"),
    ("hide_grid_zero", {"hide_grid": 0, "hide_prob": 0.5}, "hide_grid"), ("test_scale_zero", {"test_scale": 0.0}, "test_scale"),
    ("num_workers_negative", {"num_workers": -1}, "num_workers"), ("output_stride_7", {"output_stride": 7}, "output_stride"),
    ("cutmix_negative", {"cutmix_alpha": -1.0}, "cutmix_alpha"), ("backbone_lr_negative", {"backbone_lr": (-1.0, 1.0)}, "backbone_lr"),
    ("weight_decay_negative", {"weight_decay": -1.0}, "weight_decay"), ("monitor_unknown", {"monitor": "val_nothing"}, "val_nothing"),
    ("limit_batches_zero", {"limit_batches": 0}, "limit_batches"), ("ema_decay_one", {"ema_decay": 1.0}, "ema_decay"),
    ("swa_one", {"swa": 1.0}, "swa"), ("swa_with_ema", {"swa": 0.25, "ema_decay": 0.9}, "ema_decay"),
    ("frozen_stages_negative", {"frozen_stages": -1}, "frozen-stages"), ("frozen_stages_9", {"frozen_stages": 9}, "frozen-stages"),
    ("box_backbone_without_teacher", {"box_backbone": "test_resnet"}, "box-backbone"),
    ("box_backbone_blank", {"box_backbone": " "}, "box-backbone"),
    ("loss_unknown", {"loss": "foo"}, "loss|foo"), ("map_options_unknown_method", {"map_options": {"no_such_method": {}}}, "no_such_method"),
    ("tap_threshold_2", {"head": "tap", "tap_threshold": 2.0}, "tap_threshold"), ("seed_negative", {"seed": -1}, "seed"),
    # the new keywords of the deprecated ones above (image_size, num_workers, map_options)
    ("input_size_zero", {"input_size": 0}, "input_size"), ("workers_negative", {"workers": -1}, "workers"),
    ("val_data_missing", {"val_data": "{root}/no-val.csv"}, "no-val.csv"), ("val_missing", {"val": "{root}/no-val.csv"}, "no-val.csv"),
    ("pretrained_missing_file", {"pretrained": "{root}/no-weights.safetensors"}, "no-weights"),
]
for name, kw, match in FT_BAD:
    api(f"fine_tune/{name}", _fine_tune(**kw), E, match)


def _fine_tune_maps(**maps):
    def call(env: Env):
        return _fine_tune(maps=_mapcfg(**maps))(env)

    return call


def _fine_tune_twice(env: Env):
    """``input_size`` given twice, by its name and by its old name ``image_size``: refused, not one silently winning."""
    from weakloc.train import fine_tune

    return fine_tune(env["labels"], env.out, **{**TINY, "image_size": 48})


api("fine_tune/maps_options_unknown_method", _fine_tune_maps(options={"no_such_method": {}}), E, "no_such_method")
api("fine_tune/maps_threshold_5", _fine_tune_maps(threshold=5), E, "threshold",
    note="a stored threshold config.json's reader refuses would save a model that cannot be loaded")
api("fine_tune/maps_test_size_zero", _fine_tune_maps(test_size=0), E, "test_size")
api("fine_tune/maps_method_unknown", _fine_tune_maps(method="no_such_method"), E, "no_such_method")
api("fine_tune/maps_not_a_mapconfig", _fine_tune(maps="gradcam"), E, "maps")
api("fine_tune/old_and_new_keyword", _fine_tune_twice, E, "image_size|input_size")


def _fine_tune_old_keywords(env: Env):
    """fine_tune with its deprecated keywords, the DeprecationWarnings it gives kept in ``env.info``."""
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            return _fine_tune(image_size=48, num_workers=0, val_data="{labels}")(env)
        finally:
            env.info["deprecations"] = [str(w.message) for w in seen if issubclass(w.category, DeprecationWarning)]


def _old_keywords_reached(env: Env, res: Result) -> None:
    _reached(env, res)
    module = res.reached_training["module"]
    assert module.model.config.input_size == 48, f"image_size=48 gave input_size {module.model.config.input_size}"
    assert module.settings.workers == 0, f"num_workers=0 gave workers {module.settings.workers}"
    said = " ".join(env.info["deprecations"])
    for old, new in (("image_size", "input_size"), ("num_workers", "workers"), ("val_data", "val")):
        assert old in said and new in said, f"no DeprecationWarning naming {old} and {new} (got {env.info['deprecations']})"


api("fine_tune/old_keywords_work", _fine_tune_old_keywords, OK, check=_old_keywords_reached,
    note="deprecated keywords keep working, each with a DeprecationWarning naming its new name")


def _empty_labels(env: Env):
    import torch

    from weakloc.data.labels import LabeledImages

    return LabeledImages([], torch.zeros(0, dtype=torch.long), ["a", "b"], "single")


api("fine_tune/data_empty", _fine_tune(data=_empty_labels), E, "image")
api("fine_tune/data_missing", _fine_tune(data="{root}/no-data"), E, "no-data")
api("fine_tune/valid", _fine_tune(), OK, check=_reached)


# --- regions and thresholds -------------------------------------------------------------------------


def _maps(shape=(2, 8, 8), fill=None):
    import torch

    if fill is not None:
        return torch.full(shape, fill)
    g = torch.Generator().manual_seed(1)
    return torch.rand(*shape, generator=g)


def _region(keep="all", min_area=1, masks=None, maps=None):
    def call(env: Env):
        from weakloc.localize.regions import region_boxes

        m = _maps() if maps is None else maps()
        k = (m > 0.5) if masks is None else masks()
        return region_boxes(k, m, keep=keep, min_area=min_area)

    return call


def _thr(spec, maps=None):
    def call(env: Env):
        from weakloc.localize.threshold import thresholds_for

        return thresholds_for(_maps() if maps is None else maps(), spec)

    return call


def _full_box(dets) -> bool:
    return len(dets) == 2 and all(d.boxes.tolist() == [[0.0, 0.0, 7.0, 7.0]] for d in dets)


def _finite01(t) -> bool:
    return bool(t.isfinite().all()) and float(t.min()) >= 0 and float(t.max()) <= 1


api("regions/keep_unknown", _region(keep="foo"), E, "keep", build=lambda env: None)
api("regions/masks_2d", _region(masks=lambda: _maps((8, 8)) > 0.5), E, "masks", build=lambda env: None)
api("regions/maps_shape_differs", _region(maps=lambda: _maps((2, 8, 8)), masks=lambda: _maps((2, 4, 4)) > 0.5), E, "shape|maps",
    build=lambda env: None)
api("regions/min_area_negative", _region(min_area=-1), E, "min_area", build=lambda env: None)
api("regions/all_foreground", _region(keep="largest", masks=lambda: _maps((2, 8, 8), 1.0) > 0.5), OK,
    check=ok_if(_full_box, "one box covering the whole 8x8 map, corners inclusive"), build=lambda env: None)


def _binarize_bad(env: Env):
    import torch

    from weakloc.localize.regions import binarize

    return binarize(_maps(), torch.tensor([0.5, 0.5, 0.5]))


def _scale_from_zero(env: Env):
    import torch

    from weakloc.localize.regions import scale_boxes

    return scale_boxes(torch.tensor([[0.0, 0.0, 3.0, 3.0]]), (0, 0), (10, 10))


def _otsu(maps):
    def call(env: Env):
        from weakloc.localize.threshold import otsu_threshold

        return otsu_threshold(maps())

    return call


def _percentile(q):
    def call(env: Env):
        from weakloc.localize.threshold import percentile_threshold

        return percentile_threshold(_maps(), q)

    return call


api("regions/binarize_threshold_shape", _binarize_bad, E, "threshold", build=lambda env: None)
api("regions/scale_boxes_from_zero_size", _scale_from_zero, E, "size", build=lambda env: None)
for name, spec in [("1.5", 1.5), ("nan", float("nan")), ("true", True), ("negative", -0.5), ("percentile_101", "percentile:101"),
                   ("p_alone", "p"), ("inf_text", "inf")]:
    api(f"thresholds/thresholds_for_{name}", _thr(spec), E, "threshold|percentile", build=lambda env: None,
        note="a number outside [0, 1) passed as a float skips the range check" if name in ("1.5", "nan", "negative", "true") else "")
api("thresholds/percentile_2", _percentile(2.0), E, "percentile", build=lambda env: None)
api("thresholds/otsu_nan_maps", _otsu(lambda: _maps() * float("nan")), (OK, E), "maps|NaN|finite",
    check=ok_if(_finite01, "thresholds finite in [0, 1]"), build=lambda env: None)
api("thresholds/otsu_empty_maps", _otsu(lambda: _maps((2, 0, 0))), E, "maps", build=lambda env: None)
api("thresholds/otsu_constant_maps", _otsu(lambda: _maps(fill=0.5)), OK, check=ok_if(_finite01, "thresholds finite in [0, 1]"),
    build=lambda env: None)
api("thresholds/percentile_90", _thr("percentile:90"), OK, check=ok_if(_finite01, "thresholds finite in [0, 1]"),
    build=lambda env: None)


def cases() -> list[Case]:
    return list(CASES)
