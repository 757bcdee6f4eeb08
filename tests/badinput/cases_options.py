"""Command-line options of every command with out-of-range, wrong-type and unknown values.

What the issue asks: a bad value stops the command before any work with one line naming the
option as typed (``--epochs``); a value at the edge of the valid range is accepted and works.
``train`` and ``demo`` run up to the start of training (``Trainer.fit`` is a stub): an option that
reaches it unchecked is a silent acceptance.
"""

from __future__ import annotations

import json

from . import files as F
from .cases_labels import TRAIN
from .checks import calibrated, evaluated, explained, localized, reached_training
from .harness import Case, Cli, Env, Result

E, OK = "error", "ok"


def _imgs(env: Env) -> None:
    folder = env.dir("imgs")
    (folder / "good.png").write_bytes(F.good_png(seed=3))
    env.set(imgs=folder)


def _with_model(env: Env) -> None:
    env.model()
    env.data()
    _imgs(env)


def _with_data(env: Env) -> None:
    env.model()
    env.data()


def _nothing(env: Env) -> None:
    pass


def _synth_ok(env: Env, res: Result) -> None:
    rows = (env.out / "labels.csv").read_text().splitlines()
    assert len(rows) >= 2, "labels.csv holds no image"
    assert list((env.out / "images").glob("*.jpg")), "no image written"


def _ee_ok(env: Env, res: Result) -> None:
    doc = json.loads((env.out / "ee.json").read_text())
    assert doc["rows"] and all(r["method"] for r in doc["rows"]), "no method scored"


COMMANDS = {
    # command: (base argv, builder, ok-check, folders it may write)
    "synth": (["synth", "{out}", "--n", "4", "--size", "32"], _nothing, _synth_ok, ("{out}",)),
    "train": (["train", "{labels}", "-o", "{out}", *TRAIN], _with_data, reached_training(), ("{out}",)),
    "localize": (["localize", "{model}", "{imgs}", "-o", "{out}"], _with_model, localized(["good.png"], n_images=1), ("{out}",)),
    "explain": (["explain", "{model}", "{imgs}", "-o", "{out}"], _with_model, explained(["good.png"], n_images=1), ("{out}",)),
    "evaluate": (["evaluate", "{model}", "{labels}", "-a", "{ann}", "--split", "all", "-o", "{out}/report.json"], _with_data,
                 evaluated(min_images=12), ("{out}",)),
    "calibrate": (["calibrate", "{model}", "{labels}", "-a", "{ann}", "--per-class", "2"], _with_data, calibrated(), ("{model}",)),
    "explain-eval": (["explain-eval", "{model}", "{labels}", "--methods", "cam", "--limit", "2", "--steps", "2", "-o",
                      "{out}/ee.json"], _with_data, _ee_ok, ("{out}",)),
    "demo": (["demo", "-o", "{out}", "--n", "50", "--epochs", "1"], _nothing, reached_training(), ("{out}",)),
}


def with_option(base: list[str], option: str, values: list[str]) -> list[str]:
    """``base`` with ``option`` set to ``values`` (replacing the base's own value, if it has one)."""
    argv = list(base)
    if option in argv:
        i = argv.index(option)
        n = 1 if option not in ("--crop-scale",) else 2
        argv[i + 1:i + 1 + n] = values
        return argv
    return argv + [option, *values]


def _file_at_out(env: Env) -> None:
    env.out.parent.mkdir(parents=True, exist_ok=True)
    env.out.write_text("an existing file where the output folder should go\n")


def _dir_at_report(env: Env) -> None:
    (env.out / "report.json").mkdir(parents=True)


def _garbage_weights(env: Env) -> None:
    (env.root / "weights.safetensors").write_bytes(b"\x00garbage" * 20)


def _and(*builders):
    def build(env: Env) -> None:
        for b in builders:
            b(env)

    return build


def option_names(option: str) -> str:
    """The ways a message may name an option: ``--crop-scale``, ``crop_scale``, ``crop scale``, ``crop-scale``."""
    bare = option.lstrip("-")
    return "|".join(dict.fromkeys([option, bare, bare.replace("-", "_"), bare.replace("-", " ")]))


# (command, option, values, expect, extra argv, extra builder, note)
# values is a string (one value) or a list (several tokens, e.g. --crop-scale 1 0.2); None: a flag
OPTIONS: list[tuple] = []


def opt(command, option, values, expect, extra=(), build=None, note="", match=None, check=None, warns=()):
    """One option case; ``check`` replaces the command's ok-check, ``warns`` are strings a
    ``warning:`` line of the output must name (``Case.warns``)."""
    OPTIONS.append((command, option, values, expect, list(extra), build, note, match, check, tuple(warns)))


def trained_with(**want):
    """The ok-check of ``train``: training would start, with these settings reached -- ``model.X``
    (ModelConfig) or ``train.X`` (TrainConfig) keys, e.g. ``{"train.hide_prob": 0.5}``."""
    started = reached_training()

    def check(env: Env, res: Result) -> None:
        started(env, res)
        got = res.reached_training["module"]
        for key, value in want.items():
            where, name = key.split(".")
            obj = got.model.config if where == "model" else got.settings
            have = getattr(obj, name)
            have = list(have) if isinstance(have, tuple) else have
            assert have == value, f"{key} = {have!r}, expected {value!r}"

    return check


def _backbone_file(env: Env) -> None:
    """A test_resnet backbone's weights as safetensors, every tensor filled with 0.25 (a value no
    random initialisation gives), for ``--pretrained FILE``."""
    import timm
    from safetensors.torch import save_file

    net = timm.create_model("test_resnet", pretrained=False, num_classes=0, global_pool="")
    state = {k: (v.detach().clone().fill_(0.25) if v.is_floating_point() else v.clone()) for k, v in net.state_dict().items()}
    save_file(state, str(env.root / "backbone.safetensors"))


def _loaded_backbone(env: Env, res: Result) -> None:
    reached_training()(env, res)
    weights = res.reached_training["module"].model.backbone.state_dict()
    w = next(v for k, v in weights.items() if k.endswith("conv1.weight"))
    assert bool((w == 0.25).all()), "the backbone did not get the weights of the --pretrained file"


# --- synth
for v in ("0", "-1"):
    opt("synth", "--n", v, E)
for v in ("0", "31", "100000"):
    opt("synth", "--size", v, E, note="100000: a 10-gigapixel image per sample" if v == "100000" else "")
opt("synth", "--mode", "foo", E)
for v in ("", "hexagon", "star,star"):
    opt("synth", "--classes", v, E)
for v in ("0", "1000000"):
    opt("synth", "--max-instances", v, E, note="a million shapes per image never finishes" if v != "0" else "")
opt("synth", "--target", "hexagon", E, extra=["--mode", "binary"])
for v in ("1", "-0.1", "nan"):
    opt("synth", "--val-fraction", v, E)
opt("synth", "--test-fraction", "1", E)
opt("synth", "--test-fraction", "0.9", E, note="val 0.2 + test 0.9 > 1")
opt("synth", "--seed", "-1", (OK, E))
opt("synth", "--n", "1", OK)
opt("synth", "--mode", "multi", OK)

# --- train (Trainer.fit is a stub: these must fail before it)
for v in ("0", "-1"):
    opt("train", "--epochs", v, E, note="issue: --epochs 0 crashes")
opt("train", "--epochs", "1", OK)
opt("train", "--freeze-epochs", "-1", E)
for v in ("0", "5"):
    opt("train", "--freeze-epochs", v, OK)
for v in ("-1", "9", "x"):  # 9: more stages than the backbone has, known once it is built
    opt("train", "--frozen-stages", v, E)
opt("train", "--frozen-stages", "2", OK)
for v in ("0", "-1"):
    opt("train", "--batch-size", v, E, note="issue: --batch-size 0 crashes")
opt("train", "--batch-size", "1000", OK, note="a batch larger than the data set is one batch")
for v in ("0", "-1", "nan", "inf"):
    opt("train", "--lr", v, E, note="issue: --lr -1 crashes")
for v in ("0", "-1", "100000"):
    opt("train", "--input-size", v, E, note="issue: --image-size 0 crashes")
for v in ("7", "0", "-8"):
    opt("train", "--output-stride", v, E, note="issue: --output-stride 7 is accepted")
opt("train", "--output-stride", "16", OK)
opt("train", "--schedule", "foo", E, note="issue: an unknown --schedule is accepted")
opt("train", "--schedule", "cosine", OK)
for v in ("0", "1", "-0.5", "nan"):
    opt("train", "--val-fraction", v, E)
for v in (["1", "0.2"], ["0", "1"], ["-1", "1"], ["0.5", "2"], ["nan", "1"]):
    opt("train", "--crop-scale", v, E, note="issue: --crop-scale 1 0.2 crashes" if v == ["1", "0.2"] else "")
opt("train", "--crop-scale", ["1", "1"], OK)
for v in ("-1", str(2**40)):
    opt("train", "--seed", v, E, note="Lightning replaces an out-of-range seed by 0 with a warning")
opt("train", "--precision", "foo", E, note="issue: --precision foo crashes")
opt("train", "--precision", "32", OK)
opt("train", "--accelerator", "foo", E)
opt("train", "--accelerator", "gpu", E, note="no GPU in the test process")
opt("train", "--accelerator", "cpu", OK)
for v in ("3", "0", "foo"):
    opt("train", "--devices", v, E, note="issue: --devices 3 on a CPU machine is accepted" if v == "3" else "")
opt("train", "--devices", "1", OK)
opt("train", "--workers", "-1", E)
opt("train", "--workers", "0", OK)
opt("train", "--head", "foo", E)
opt("train", "--head", "attention", OK)
opt("train", "--attention-stages", "a,b", E)
opt("train", "--attention-stages", "99", E, extra=["--head", "attention"])
opt("train", "--attention-norm", "foo", E)
for v in ("99", "a"):
    opt("train", "--cbam-stages", v, E)
opt("train", "--adl-stages", "99", E)
for v in ("-1", "1.5", "nan"):
    opt("train", "--tap-threshold", v, E)
opt("train", "--loss", "foo", E)
opt("train", "--loss", "focal", OK)
for v in ("-1", "nan"):
    opt("train", "--focal-gamma", v, E, note="issue: negative gammas are accepted")
opt("train", "--counting", "foo", E)
opt("train", "--counting", "density", E, note="a counting head without counting labels")
opt("train", "--count-loss", "foo", E, extra=["--counts"], build=lambda env: env.set(labels=env["counts"]))
opt("train", "--count-weight", "-1", E)
for name in ("--density-l1", "--density-tv", "--density-gather", "--crop-consistency", "--cutmix-alpha", "--align-weight",
             "--consistency-weight"):
    opt("train", name, "-1", E)
for v in ("1", "-0.1", "nan"):
    opt("train", "--ema-decay", v, E)
    opt("train", "--swa", v, E)
opt("train", "--swa", "0.25", E, extra=["--ema-decay", "0.9"], match="--swa and --ema-decay")
for v in ("1.5", "-0.1"):
    opt("train", "--hide-prob", v, E)
opt("train", "--teacher", "{root}/no-teacher", E, match="no-teacher")
opt("train", "--teacher-threshold", "1.5", E, extra=["--teacher", "{model}"])
opt("train", "--teacher-method", "foo", E, extra=["--teacher", "{model}"])
opt("train", "--box-backbone", "test_resnet", E, match="--teacher")
opt("train", "--box-backbone", "no_such_net", E, extra=["--teacher", "{model}"], match="no_such_net")
opt("train", "--density-stage", "x", E)
opt("train", "--density-stage", "99", E, extra=["--counts"], build=lambda env: env.set(labels=env["counts"]))
opt("train", "--density-hidden", "-1", E)
for v in ("0", "-1", "nan"):
    opt("train", "--test-scale", v, E, note="issue: --test-scale 0 is accepted")
opt("train", "--pretrained", "{root}/no-weights.safetensors", E, match="no-weights")
opt("train", "--pretrained", "{root}/weights.safetensors", E, build=_garbage_weights, match="weights.safetensors")
opt("train", "--backbone", "no_such_net", E, match="no_such_net")
opt("train", "--pretrained", "foo", E, match="foo")
opt("train", "--val", "{root}/no-val.csv", E, match="no-val.csv")
opt("train", "--counts-from", "{root}/no-ann.json", E, match="no-ann.json")
opt("train", "--resume", None, E, match="last.ckpt|checkpoint")
opt("train", "-o", "{out}", E, build=_file_at_out, match="out", note="-o names an existing file")

# --- localize
for v in ("1.5", "-0.1", "nan", "inf", "1", "foo", "percentile:150", "percentile:-5", "p", "calibrated"):
    opt("localize", "--threshold", v, E, note="a fixed threshold lies in [0, 1)" if v[0].isdigit() else "")
for v in ("otsu", "percentile:90", "0", "0.5"):
    opt("localize", "--threshold", v, OK)
opt("localize", "--keep", "foo", E, note="issue: --keep foo crashes")
opt("localize", "--keep", "largest", OK)
for v in ("0", "-1", "100000"):
    opt("localize", "--test-size", v, E, note="issue: --input-size 0 is accepted")
opt("localize", "--test-size", "64", OK)
for v in ("0", "-1"):
    opt("localize", "--batch-size", v, E)
opt("localize", "--method", "foo", E)
opt("localize", "--method", "gradcam", OK)
for v in ("foo", "top0", "top99", "7", "-1"):
    opt("localize", "--target", v, E)
for v in ("all", "top2", "star"):
    opt("localize", "--target", v, OK)
opt("localize", "--layer", "no.such.layer", E, match="no.such.layer|layer")
opt("localize", "--fusion", "foo", E)
opt("localize", "--dtype", "foo", E)
opt("localize", "--dtype", "bf16", OK)
for v in ("x", "nosuch=1", "normalization=foo", "normalization=pas:2"):
    opt("localize", "--option", v, E, match="--option|" + v.split("=")[0] + ("|normalisation" if "normal" in v else ""))
opt("localize", "--option", "chunk=0", E, extra=["--method", "scorecam"], match="chunk")
for v in ("foo", "", "ALL"):
    opt("localize", "--pictures", v, E, match="--pictures")
opt("localize", "--pictures", "overlays", OK)
opt("localize", "--pictures", "none", OK, check=localized(["good.png"], n_images=1, pictures=False))
for v in ("-1", "x", "1.5"):
    opt("localize", "--workers", v, E, match="--workers|workers")
opt("localize", "--workers", "1", OK)
for v in ("gpu", "foo"):
    opt("localize", "--decode", v, E, match="--decode")
opt("localize", "--decode", "device", OK)
opt("localize", "--restart", [], OK)
opt("localize", "--workers", "0", OK, extra=["--decode", "device", "--pictures", "none"],
    check=localized(["good.png"], n_images=1, pictures=False))
opt("localize", "--option", "num_samples=0", E, extra=["--method", "sscam"], match="num_samples")
opt("localize", "--option", "std=-1", E, extra=["--method", "sscam"], match="std")
opt("localize", "--count-views", "foo", E)
for v in ("cuda", "foo", "cuda:7"):
    opt("localize", "--device", v, E, note="issue: --device cuda on a CPU machine crashes" if v == "cuda" else "")
opt("localize", "--device", "cpu", OK)
opt("localize", "-o", "{out}", E, build=_file_at_out, match="out", note="-o names an existing file")

# --- explain
opt("explain", "--method", "foo", E)
for v in ("foo", "top0"):
    opt("explain", "--target", v, E)
opt("explain", "--layer", "no.such.layer", E, match="no.such.layer|layer")
opt("explain", "--fusion", "foo", E)
opt("explain", "--dtype", "foo", E)
opt("explain", "--option", "normalization=foo", E, match="normalization|normalisation")
opt("explain", "--batch-size", "0", E)
opt("explain", "--device", "cuda", E)
opt("explain", "-o", "{out}", E, build=_file_at_out, match="out")
opt("explain", "--method", "layercam", OK)
opt("explain", "--target", "all", OK)
opt("explain", "--tta", None, OK)

# --- evaluate
for v in ("0", "-0.1", "2", "nan", "1e-9"):
    opt("evaluate", "--step", v, E, note={"0": "issue: --step 0 crashes", "2": "issue: --step 2 is accepted",
                                         "1e-9": "a billion thresholds"}.get(v, ""))
opt("evaluate", "--step", "0.05", OK)
for v in ("5", "-1", "nan"):
    opt("evaluate", "--gt-known-tau", v, E, note="issue: --gt-known-tau 5 crashes" if v == "5" else "")
opt("evaluate", "--gt-known-tau", "0.5", OK)
opt("evaluate", "--split", "foo", E)
opt("evaluate", "--split", "test", E, note="the data has no test split")
opt("evaluate", "--gt-class", "noequals", E, match="--gt-class")
opt("evaluate", "--gt-class", "triangle=hexagon", E, match="hexagon")
opt("evaluate", "--method", "foo", E)
opt("evaluate", "--batch-size", "0", E)
for v in ("0", "-1"):
    opt("evaluate", "--test-size", v, E)
opt("evaluate", "--count-views", "foo", E)
opt("evaluate", "--device", "cuda", E)
opt("evaluate", "-o", "{out}/report.json", E, build=_dir_at_report, match="report.json", note="-o names a folder")
opt("evaluate", "-a", "{root}/no-ann.json", E, match="no-ann.json")

# --- calibrate
for v in ("0", "-1"):
    opt("calibrate", "--per-class", v, E)
for v in ("", "foo"):
    opt("calibrate", "--methods", v, E)
opt("calibrate", "--methods", "cam,gradcam", OK)
opt("calibrate", "--split", "foo", E)
opt("calibrate", "--split", "test", E)
for v in ("0", "-32", "abc"):
    opt("calibrate", "--test-sizes", v, E)
opt("calibrate", "--test-sizes", "32,64", OK, check=calibrated(test_sizes=(32, 64)))
opt("calibrate", "--normalizations", "foo", E)
opt("calibrate", "--normalizations", "minmax,pas", OK)
opt("calibrate", "--gt-class", "noequals", E, match="--gt-class")
opt("calibrate", "--device", "cuda", E)

# --- explain-eval
for name in ("--limit", "--steps"):
    for v in ("0", "-1"):
        opt("explain-eval", name, v, E)
opt("explain-eval", "--baseline", "foo", E)
for v in ("", "foo"):
    opt("explain-eval", "--methods", v, E)
opt("explain-eval", "--target", "foo", E)
opt("explain-eval", "--batch-size", "0", E)
opt("explain-eval", "--split", "foo", E)
opt("explain-eval", "--dtype", "foo", E)
opt("explain-eval", "--methods", "cam,random", OK)

# --- new options of issue 17 (one name per setting): the map options on every map-drawing command
opt("train", "--pretrained", "{root}/backbone.safetensors", OK, build=_backbone_file, check=_loaded_backbone)
opt("train", "--hide-prob", "0.5", OK, check=trained_with(**{"train.hide_prob": 0.5}))
opt("train", "--cbam-stages", "2", OK, check=trained_with(**{"model.cbam_stages": [2]}))
opt("train", "--input-size", "48", OK, check=trained_with(**{"model.input_size": 48}))
for command in ("explain", "explain-eval"):
    for v in ("0", "100000"):
        opt(command, "--test-size", v, E)
opt("explain", "--test-size", "48", OK)
for command in ("localize", "evaluate", "explain"):
    opt(command, "--normalization", "foo", E, match="--normalization|normalization|normalisation|'foo'")
opt("localize", "--normalization", "pas", OK)
for command in ("localize", "evaluate", "explain"):  # issue 18: maps refined with the image
    for v in ("foo", "guided:2", "guided:0.1,0.1,0.1"):
        opt(command, "--refine", v, E, match="--refine|refine")
opt("localize", "--refine", "guided", OK)
opt("train", "--refine", "foo", E, match="--refine|refine")
opt("train", "--refine", "none", OK)
opt("explain", "--refine", "guided:0.1,0.001", OK)
for command in ("localize", "evaluate"):  # issue 18: regions split at the map's peaks
    opt(command, "--keep", "split", E, match="--keep|keep")
    opt(command, "--keep", "peaks", OK)
opt("localize", "--tta", None, OK)

# --- old spellings (docs/changelog.md): each still works, with a one-line warning naming the new
# option first; a bad value gives the same error as the new spelling
# (command, old, new, a bad value, a good value or None, ok-check or None: the command's own)
DEPRECATED = [
    ("train", "--image-size", "--input-size", "0", "48", trained_with(**{"model.input_size": 48})),
    ("train", "--weights", "--pretrained", "{root}/no-weights.safetensors", "{root}/backbone.safetensors", _loaded_backbone),
    ("train", "--hide-and-seek", "--hide-prob", "1.5", "0.5", trained_with(**{"train.hide_prob": 0.5})),
    ("train", "--cutmix", "--cutmix-alpha", "-1", "1", trained_with(**{"train.cutmix_alpha": 1.0})),
    ("train", "--align", "--align-weight", "-1", "0.5", trained_with(**{"train.align_weight": 0.5})),
    ("train", "--consistency", "--consistency-weight", "-1", "0.5", trained_with(**{"train.consistency_weight": 0.5})),
    ("train", "--cbam", "--cbam-stages", "99", "2", trained_with(**{"model.cbam_stages": [2]})),
    ("train", "--adl", "--adl-stages", "99", "-1", trained_with(**{"model.adl_stages": [-1]})),
    ("localize", "--input-size", "--test-size", "-1", "48", None),
    ("localize", "--count-tta", "--count-views", "sideways", None, None),
    ("evaluate", "--input-size", "--test-size", "-1", "48", None),
    ("evaluate", "--count-tta", "--count-views", "sideways", None, None),
    ("calibrate", "--input-sizes", "--test-sizes", "0", "32,64", calibrated(test_sizes=(32, 64))),
]
for command, old, new, bad, good, check in DEPRECATED:
    warns = (old, new, "deprecated")
    build = _backbone_file if old == "--weights" else None
    opt(command, old, bad, E, match=option_names(new) + "|" + option_names(old) + (f"|{bad.split('/')[-1]}" if "/" in bad else ""),
        warns=warns, note=f"old spelling of {new}")
    if good is not None:
        opt(command, old, good, OK, build=build, check=check, warns=warns, note=f"old spelling of {new}")
opt("evaluate", "--calibrate", None, E, match="weakloc calibrate",
    note="removed: it chose the threshold on the images it then scored")

# --- demo (synthesises, then stops where training would start)
for name in ("--n", "--epochs"):
    for v in ("0", "-1"):
        opt("demo", name, v, E)
opt("demo", "-o", "{out}", E, build=_file_at_out, match="out")
opt("demo", "--seed", "3", OK)
for v in ("-1", "6", "two"):
    opt("demo", "--frozen-stages", v, E)
opt("demo", "--frozen-stages", "2", OK)


def _slug(values) -> str:
    if values is None:
        return "flag"
    text = " ".join(values) if isinstance(values, list) else values
    return text.replace("/", "_").replace(" ", "_") or "empty"


def cases() -> list[Case]:
    out: list[Case] = []
    seen: dict[str, int] = {}
    for command, option, values, expect, extra, build, note, match, check, warns in OPTIONS:
        base, builder, ok_check, writes = COMMANDS[command]
        ok_check = check or ok_check
        vals = [] if values is None else (values if isinstance(values, list) else [values])
        argv = with_option(base, option, vals) + extra
        expect = (expect,) if isinstance(expect, str) else expect
        cid = f"option/{command}{option}={_slug(values)}"
        if cid in seen:
            seen[cid] += 1
            cid += f"#{seen[cid]}"
        else:
            seen[cid] = 1
        default = option_names(option)
        if len(vals) == 1 and vals[0].isalpha() and vals[0].isascii():
            default += f"|'{vals[0]}'"  # an unknown word named as given is as clear as the option's name
        out.append(Case(cid, "option", _and(builder, build) if build else builder, Cli(argv), expect,
                        match=(match or default,) if E in expect else (), checks={OK: ok_check} if OK in expect else {},
                        writes=writes, note=note, warns=warns, timeout=90 if command in ("demo", "synth") else 60))
    return out
