"""Model folders -- a corrupt or hand-edited ``config.json``, broken or hostile weights, hostile class
names -- through the commands that load a model (``localize``, ``explain``, ``evaluate``,
``calibrate``).

What the issue asks: a folder that is not a usable model is an error naming the folder or file and
the field, before any image is touched; NaN weights are refused rather than giving NaN
probabilities and a "predicted" class; a class name like ``../../x`` never writes outside ``-o``.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

from . import files as F
from .checks import calibrated, evaluated, explained, localized
from .harness import Case, Cli, Env
from .cases_labels import _Payload


def _imgs(env: Env) -> None:
    folder = env.dir("imgs")
    (folder / "good.png").write_bytes(F.good_png(seed=3))
    env.set(imgs=folder)


def model(edit_config=None, *, config_raw: bytes | None = None, edit_weights=None, folder_edit=None, arg: str = "{model}"):
    """Builder: a private model copy, its ``config.json`` edited (``edit_config(cfg)``) or replaced by
    bytes, its weights edited (``edit_weights(state) -> state``), or the folder changed (``folder_edit``)."""

    def build(env: Env) -> None:
        folder = env.model()
        env.data()
        _imgs(env)
        cfg_file = folder / "config.json"
        if edit_config is not None:
            cfg = json.loads(cfg_file.read_text())
            new = edit_config(cfg)
            cfg_file.write_text(json.dumps(cfg if new is None else new))
        if config_raw is not None:
            cfg_file.write_bytes(config_raw)
        if edit_weights is not None:
            from safetensors.torch import load_file, save_file

            state = load_file(str(folder / "model.safetensors"))
            save_file(edit_weights(state), str(folder / "model.safetensors"))
        if folder_edit is not None:
            folder_edit(folder, env)
        env.set(target=arg.format_map(env.vars))

    return build


def _set(**kw):
    def edit(cfg):
        cfg.update(kw)

    return edit


def _del(key):
    def edit(cfg):
        del cfg[key]

    return edit


def _maps(**kw):
    """Edit format 2's ``maps`` object (the map settings and calibration results)."""

    def edit(cfg):
        cfg["maps"] = {**cfg.get("maps", {}), **kw}

    return edit


def _v1(version: int | None = 1, **kw):
    """The config as a format-1 file (no ``maps`` / ``train``; ``format_version`` 1, or absent when
    ``version`` is None, as files written before the field existed) with ``kw`` set, e.g. its
    ``localization`` object."""

    def edit(cfg):
        for key in ("maps", "train", "format_version"):
            cfg.pop(key, None)
        if version is not None:
            cfg["format_version"] = version
        cfg.update(kw)

    return edit


def _v1_loc(version: int | None = 1, **kw):
    """A format-1 file whose ``localization`` object holds ``kw``."""
    return _v1(version, localization=dict(kw))


def _classes(*names):
    return _set(classes=list(names))


def _fill(value: float):
    def edit(state):
        return {k: (v.float().fill_(value).to(v.dtype) if v.is_floating_point() else v) for k, v in state.items()}

    return edit


def _half(state):
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def _extra_tensor(state):
    import torch

    return {**state, "smuggled.weight": torch.zeros(3)}


def _rm(name):
    def edit(folder: Path, env: Env) -> None:
        p = folder / name
        if p.is_dir():
            p.rmdir()
        else:
            p.unlink()

    return edit


def _replace_file(name, data: bytes | None = None, *, truncate: float | None = None, make_dir: bool = False, pickled: bool = False):
    def edit(folder: Path, env: Env) -> None:
        p = folder / name
        if truncate is not None:
            p.write_bytes(p.read_bytes()[: int(p.stat().st_size * truncate)])
        elif make_dir:
            p.unlink()
            p.mkdir()
            (p / "inside.txt").write_text("a folder where a file should be")
        elif pickled:
            p.write_bytes(pickle.dumps(_Payload(str(env.root / "PWNED"))))
        else:
            p.write_bytes(data)

    return edit


def _empty_folder(folder: Path, env: Env) -> None:
    for p in folder.iterdir():
        p.unlink()


def _wrong_classes(cfg):
    cfg["classes"] = cfg["classes"] + ["hexagon"]


MODEL_CASES = [
    # (slug, builder, expect, match, commands "l"ocalize "e"xplain "v"aluate "c"alibrate, note)
    ("missing_folder", model(arg="{root}/no-model"), "error", "no-model", "le", None),
    ("empty_folder", model(folder_edit=_empty_folder), "error", "config.json", "le", None),
    ("config_empty", model(config_raw=b""), "error", "config.json", "le", "issue: a corrupt config.json crashes"),
    ("config_null", model(config_raw=b"null"), "error", "config.json", "lev", "issue: config.json holding null"),
    ("config_list", model(config_raw=b"[1, 2]"), "error", "config.json", "l", None),
    ("config_latin1", model(config_raw='{"classes": ["étoile"]}'.encode("latin-1")), "error", "config.json", "l", None),
    ("config_truncated", model(config_raw=b'{"backbone": "test_resnet", "classes": ["a", "b"'), "error", "config.json", "l", None),
    ("config_is_folder", model(folder_edit=_replace_file("config.json", make_dir=True)), "error", "config.json", "l", None),
    ("classes_missing", model(_del("classes")), "error", "config.json", "l", None),
    ("classes_string", model(_set(classes="abc")), "error", "classes", "le", "a string would read as three classes a, b, c"),
    ("classes_empty", model(_set(classes=[])), "error", "config.json", "l", None),
    ("classes_duplicate", model(_classes("star", "star", "square")), "error", "star", "le", None),
    ("classes_numbers", model(_classes(1, 2, 3)), "error", "classes", "l", None),
    ("task_unknown", model(_set(task="regression")), "error", "regression", "lev", "issue: an unknown task crashes"),
    ("backbone_unknown", model(_set(backbone="no_such_net")), "error", "no_such_net", "le", None),
    ("backbone_number", model(_set(backbone=123)), "error", "backbone", "l", "issue: wrong types in config.json crash"),
    ("input_size_word", model(_set(input_size="big")), "error", "input_size", "l", None),
    ("input_size_zero", model(_set(input_size=0)), "error", "input_size", "le", None),
    ("input_size_negative", model(_set(input_size=-32)), "error", "input_size", "l", None),
    ("input_size_huge", model(_set(input_size=10**6)), "error", "input_size", "l", "a million-pixel side would allocate terabytes"),
    ("mean_short", model(_set(mean=[0.5, 0.5])), "error", "mean", "lev", "issue: a wrong-length mean crashes"),
    ("mean_words", model(_set(mean=["a", "b", "c"])), "error", "mean", "l", None),
    ("std_zero", model(_set(std=[0, 0, 0])), "error", "std", "lev", "issue: a zero std crashes"),
    ("std_negative", model(_set(std=[-1, -1, -1])), "error", "std", "l", None),
    ("output_stride_7", model(_set(output_stride=7)), "error", "output_stride", "l", None),
    ("head_unknown", model(_set(head="mlp")), "error", "mlp", "l", None),
    ("unknown_key", model(_set(favourite_colour="blue")), "error", "favourite_colour", "l", None),
    ("format_version_99", model(_set(format_version=99)), "error", "format_version|99", "l", "a model from a newer weakloc"),
    # format 2: the map settings live in "maps"
    ("maps_string", model(_set(maps="calibrated")), "error", "maps", "l", None),
    ("maps_list", model(_set(maps=[0.3])), "error", "maps", "l", None),
    ("maps_threshold_5", model(_maps(threshold=5)), "error", "threshold", "lev", "a hand-edited calibrated threshold"),
    ("maps_threshold_word", model(_maps(threshold="high")), "error", "threshold", "l", None),
    ("maps_test_size_0", model(_maps(test_size=0)), "error", "test_size", "le", "a silent fall back to the training size"),
    ("maps_test_size_huge", model(_maps(test_size=10**6)), "error", "test_size", "l", None),
    ("maps_method_unknown", model(_maps(method="no_such_method")), "error", "no_such_method", "le", None),
    ("maps_fusion_unknown", model(_maps(fusion="sideways")), "error", "sideways|fusion", "l", None),
    ("maps_normalization_unknown", model(_maps(normalization="foo")), "error", "normalization|foo", "l", None),
    ("maps_count_views_unknown", model(_maps(count_views="sideways")), "error", "sideways|count_views", "l", None),
    ("maps_options_not_object", model(_maps(options=[1, 2])), "error", "options", "l", None),
    ("maps_unknown_key", model(_maps(favourite_colour="blue")), "error", "favourite_colour", "l", None),
    ("maps_old_key_input_size", model(_maps(input_size=64)), "error", "input_size", "l", "format 1's key inside format 2's maps"),
    ("train_string", model(_set(train="yes")), "error", "train", "l", None),
    ("localization_in_format_2", model(_set(localization={"threshold": 0.3})), "error", "localization", "l",
     "format 1's object in a format-2 file would be ignored"),
    ("format_version_0", model(_set(format_version=0)), "error", "format_version", "l", None),
    ("format_version_word", model(_set(format_version="2")), "error", "format_version", "l", None),
    # format 1 (hand-edited before issue 17): still read, and a bad value still named
    ("v1_localization_string", model(_v1(localization="calibrated")), "error", "localization", "l", None),
    ("v1_localization_threshold_5", model(_v1_loc(threshold=5)), "error", "threshold", "lev", "a hand-edited calibrated threshold"),
    ("v1_localization_input_size_0", model(_v1_loc(input_size=0)), "error", "input_size", "l", None),
    ("v1_localization_method_unknown", model(_v1_loc(method="no_such_method")), "error", "no_such_method", "l", None),
    ("v1_localization_count_tta_unknown", model(_v1_loc(count_tta="sideways")), "error", "sideways|count_tta", "l", None),
    ("v1_no_version_threshold_5", model(_v1_loc(None, threshold=5)), "error", "threshold", "l",
     "no format_version: format 1, written before the field existed"),
    ("v1_holding_maps", model(_v1(maps={"threshold": 0.3})), "error", "maps", "l", "format 2's object in a format-1 file"),
    ("positive_class_7", model(_set(positive_class=7)), "error", "positive_class", "l", None),
    ("decision_threshold_2", model(_set(decision_threshold=2.0)), "error", "decision_threshold", "l", None),
    ("counting_unknown", model(_set(counting="sometimes")), "error", "sometimes", "l", None),
    ("attention_stage_99", model(_set(head="attention", attention_stages=[99])), "error", "99", "l", None),
    ("drop_rate_2", model(_set(drop_rate=2.0)), ("error", "ok"), "drop_rate", "l", None),
    ("weights_missing", model(folder_edit=_rm("model.safetensors")), "error", "model.safetensors", "le", None),
    ("weights_truncated", model(folder_edit=_replace_file("model.safetensors", truncate=0.5)), "error", "model.safetensors", "le", None),
    ("weights_garbage", model(folder_edit=_replace_file("model.safetensors", b"\x00" * 100)), "error", "model.safetensors", "l", None),
    ("weights_pickle", model(folder_edit=_replace_file("model.safetensors", pickled=True)), "error", "model.safetensors", "l",
     "a pickle must never be loaded"),
    ("weights_folder", model(folder_edit=_replace_file("model.safetensors", make_dir=True)), "error", "model.safetensors", "l", None),
    ("weights_nan", model(edit_weights=_fill(float("nan"))), "error", "model.safetensors", "lev",
     "issue: NaN weights give NaN probabilities and a 'predicted' class"),
    ("weights_inf", model(edit_weights=_fill(float("inf"))), "error", "model.safetensors", "l", None),
    ("weights_extra_tensor", model(edit_weights=_extra_tensor), "error", "model.safetensors", "l", None),
    ("weights_wrong_shape", model(_wrong_classes), "error", "model.safetensors", "l", None),
    # valid variations
    ("weights_fp16", model(edit_weights=_half), "ok", None, "le", "half-precision weights load as the model's dtype"),
    ("safetensors_path", model(arg="{model}/model.safetensors"), "ok", None, "l", "the weights file instead of its folder"),
    ("config_compact_json", model(edit_config=lambda cfg: None), "ok", None, "l", "config.json rewritten without indentation"),
    ("v1_calibrated", model(_v1_loc(threshold=0.25, method="gradcam", input_size=48, calibrated_on=6, per_class=2)), "ok", None,
     "lev", "a format-1 folder calibrated before issue 17 still loads"),
    ("v1_no_version", model(_v1_loc(None, threshold=0.25)), "ok", None, "l", "format 1 without format_version"),
    ("maps_calibrated", model(_maps(threshold=0.25, method="gradcam", test_size=48)), "ok", None, "lev", None),
]

# hostile class names: either refused with a clear error naming the class, or used -- and then every
# file stays inside -o and the gallery shows the name escaped
HOSTILE = [
    ("dotdot", "../../../../evil", "evil"),
    ("slash", "a/b", "a/b"),
    ("absolute", "/tmp/evil-absolute", "evil-absolute"),
    ("empty", "", "class"),
    ("dot", ".", "class"),
    ("newline", "tri\nangle", "tri"),
    ("html", "<script>alert(1)</script>", "script"),
    ("undecodable", "st\udcffar", "st"),
    ("very_long", "x" * 300, "xxxx"),
    ("nul", "a\x00b", "class"),
    ("reserved_windows", "CON", "CON"),
]


def _hostile_cases() -> list[Case]:
    out = []
    for slug, name, match in HOSTILE:
        build = model(_classes("triangle", "square", name))
        for cmd in ("localize", "explain"):
            html = "<script>alert(1)</script>" if slug == "html" else None
            check = localized(["good.png"], escaped_html=html) if cmd == "localize" else explained(["good.png"], escaped_html=html)
            argv = [cmd, "{target}", "{imgs}", "-o", "{out}", "--target", "all"]
            out.append(Case(f"model/class_{slug}/{cmd}", "model", build, Cli(argv), ("ok", "error"), match=(match,),
                            checks={"ok": check}, note="issue: a class name like ../../x writes outside -o"))
    return out


def _read_only(folder: Path, env: Env) -> None:
    for p in folder.iterdir():
        p.chmod(0o444)
    folder.chmod(0o555)


def cases() -> list[Case]:
    out: list[Case] = []
    for slug, build, expect, match, commands, note in MODEL_CASES:
        expect = (expect,) if isinstance(expect, str) else expect
        for c in commands:
            if c == "l":
                argv, cmd, check = ["localize", "{target}", "{imgs}", "-o", "{out}"], "localize", localized(["good.png"], n_images=1)
            elif c == "e":
                argv, cmd, check = ["explain", "{target}", "{imgs}", "-o", "{out}"], "explain", explained(["good.png"], n_images=1)
            else:
                argv = ["evaluate", "{target}", "{labels}", "-a", "{ann}", "--split", "all", "-o", "{out}/report.json"]
                cmd, check = "evaluate", evaluated(min_images=12)
            out.append(Case(f"model/{slug}/{cmd}", "model", build, Cli(argv), expect, match=(match,) if match else (),
                            checks={"ok": check} if "ok" in expect else {}, note=note or ""))
    out += _hostile_cases()
    out.append(Case("model/read_only_folder/calibrate", "model", model(folder_edit=_read_only),
                    Cli(["calibrate", "{model}", "{labels}", "-a", "{ann}", "--per-class", "2"]), "error", match=("model",),
                    writes=(), requires=lambda: "running as root: a read-only folder is writable" if os.geteuid() == 0 else None,
                    note="issue: a read-only model folder crashes calibrate after the work is done"))
    out.append(Case("model/valid/calibrate", "model", model(), Cli(["calibrate", "{model}", "{labels}", "-a", "{ann}", "--per-class", "2"]),
                    "ok", checks={"ok": calibrated()}, writes=("{model}",)))
    return out
