"""Label sources -- labels CSVs, class folders, counts CSVs -- through ``train`` (up to the start
of training: ``Trainer.fit`` is a stub here) and ``evaluate``; and a few real training runs for what
only training shows (undecodable images skipped and counted, a broken ``last.ckpt`` on ``--resume``).

Rows are numbered as a spreadsheet shows them: the header is row 1.
"""

from __future__ import annotations

import csv
import os
import pickle
import re
import shutil
from pathlib import Path

from . import files as F
from .checks import evaluate_skipped, evaluated, mentions_skip, reached_training
from .corpus import CLASSES
from .harness import Case, Cli, Env, Proc, Result

TRAIN = ["--backbone", "test_resnet", "--pretrained", "none", "--input-size", "32", "--epochs", "1", "--batch-size", "4",
         "--workers", "0"]


def train_argv(data: str = "{labels}", *extra: str) -> list[str]:
    return ["train", data, "-o", "{out}", *TRAIN, *extra]


def evaluate_argv(data: str = "{labels}", *extra: str) -> list[str]:
    return ["evaluate", "{model}", data, "-a", "{ann}", "--split", "all", "-o", "{out}/report.json", *extra]


def _rows(path: Path) -> list[list[str]]:
    return list(csv.reader(path.read_text().splitlines()))


def _write_rows(path: Path, rows: list[list[str]], newline: str = "\n", encoding: str = "utf-8", bom: bool = False) -> None:
    text = F.csv_text(rows, newline)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode(encoding, "surrogateescape"))


def labels(mutate=None, *, text: str | None = None, raw: bytes | None = None, name: str = "labels.csv", **write_kw):
    """Builder: the data copy with ``labels.csv`` replaced (rows mutated, or given text / bytes)."""

    def build(env: Env) -> None:
        env.model()
        data = env.data()
        path = data / name
        if raw is not None:
            path.write_bytes(raw)
        elif text is not None:
            path.write_text(text)
        elif mutate is not None:
            _write_rows(path, mutate(_rows(data / "labels.csv"), data), **write_kw)
        env.set(labels=path)

    return build


def counts(mutate=None, *, raw: bytes | None = None, **write_kw):
    def build(env: Env) -> None:
        data = env.data()
        path = data / "counts.csv"
        if raw is not None:
            path.write_bytes(raw)
        elif mutate is not None:
            _write_rows(path, mutate(_rows(path), data), **write_kw)

    return build


def _cell(row: int, col: int, value: str):
    """Mutation: the cell at spreadsheet row ``row`` (header = 1) and column ``col`` set to ``value``."""

    def m(rows, data):
        rows[row - 1][col] = value
        return rows

    return m


def _seq(*ms):
    def m(rows, data):
        for f in ms:
            rows = f(rows, data)
        return rows

    return m


def _n_images(rows) -> int:
    return len(rows) - 1


# --- checks -----------------------------------------------------------------------------------


def trains_on(n: int = 12, classes=CLASSES):
    """Training would start on all ``n`` images with these classes."""

    def check(env: Env, res: Result) -> None:
        reached_training(classes=classes)(env, res)
        got = res.reached_training
        total = len(got["train"].dataset) + len(got["val"].dataset)
        assert total == n, f"{total} image(s) in training + validation, expected {n}"

    return check


def counts_are(row_index: int, values: list[float]):
    """Counting training would start with image ``row_index`` (0-based data row) counted ``values``."""

    def check(env: Env, res: Result) -> None:
        got = res.reached_training
        assert got is not None, "training did not start"
        ds = got["train"].dataset
        import torch

        k = len(values)
        paths = [Path(p).name for p in ds.paths]
        name = f"{row_index:06d}.jpg"
        if name not in paths:
            ds = got["val"].dataset
            paths = [Path(p).name for p in ds.paths]
        i = paths.index(name)
        got_counts = ds.targets[i][k:].tolist()
        assert torch.allclose(torch.tensor(got_counts), torch.tensor(values, dtype=torch.float32)), f"counts {got_counts}, expected {values}"

    return check


def skipped_count(n: int):
    """A real training run finished and said how many undecodable images it skipped."""

    def check(env: Env, res: Result) -> None:
        low = res.text.lower()
        assert re.search(rf"\b{n}\b[^\n]*(skip|could not|undecodable|unreadable)", low), f"the output does not say {n} image(s) were skipped"
        assert (env.out / "model" / "model.safetensors").is_file(), "no model was saved"

    return check


# --- labels CSV ---------------------------------------------------------------------------------


def _dup_rows(times: int):
    def m(rows, data):
        return rows + [list(rows[1]) for _ in range(times)]

    return m


def _conflict(rows, data):
    other = next(c for c in CLASSES if c != rows[1][1])
    return rows + [[rows[1][0], other, rows[1][2]]]


def _leak(rows, data):
    return rows + [[rows[1][0], rows[1][1], "val" if rows[1][2] == "train" else "train"]]


def _case_variants(rows, data):
    rows = [list(r) for r in rows]
    stars = [r for r in rows[1:] if r[1] == "star"] or rows[1:4]
    for r, v in zip(stars, ["Star", "STAR", "star"]):
        r[1] = v
    return rows


def _absolute(rows, data):
    return [rows[0]] + [[str((data / r[0]).resolve()), *r[1:]] for r in rows[1:]]


def _dotdot(rows, data):
    return [rows[0]] + [[f"../{data.name}/{r[0]}", *r[1:]] for r in rows[1:]]


def _all_train(rows, data):
    return [rows[0]] + [[*r[:2], "train"] for r in rows[1:]]


def _one_class(rows, data):
    return [rows[0]] + [[r[0], "star", r[2]] for r in rows[1:]]


def _extra_col(rows, data):
    return [rows[0] + ["notes"]] + [r + ["a note, with a comma"] for r in rows[1:]]


def _trailing_space(rows, data):
    return [rows[0]] + [[r[0], r[1] + "  ", r[2]] for r in rows[1:]]


def _caps_header(rows, data):
    return [["Path", "Label", "Split"]] + rows[1:]


def _no_split_col(rows, data):
    return [["path", "label"]] + [r[:2] for r in rows[1:]]


def _backslash(rows, data):
    return [rows[0]] + [[r[0].replace("/", "\\"), *r[1:]] for r in rows[1:]]


def _one_row(rows, data):
    return [["path", "label"], rows[1][:2]]


def _huge_field(rows, data):
    rows[2][1] = "x" * 200_000
    return rows


def _semicolons(rows, data):
    return [[";".join(r)] for r in rows]


LABEL_CASES = [
    # (slug, builder, {command: (expect, match)}, note)
    ("missing_file", labels(), {"train": ("error", "nope.csv"), "evaluate": ("error", "nope.csv")}, "{data}/nope.csv"),
    ("empty_file", labels(text=""), {"train": ("error", "labels.csv"), "evaluate": ("error", "labels.csv")}, None),
    ("header_only", labels(text="path,label,split\n"), {"train": ("error", "labels.csv"), "evaluate": ("error", "labels.csv")}, None),
    ("latin1", labels(raw="path,label\nimages/000000.jpg,étoile\n".encode("latin-1")),
     {"train": ("error", "labels.csv"), "evaluate": ("error", "labels.csv")}, "issue: a non-UTF-8 CSV crashes"),
    ("utf16", labels(raw="path,label\nimages/000000.jpg,star\n".encode("utf-16")),
     {"train": ("error", "labels.csv"), "evaluate": ("error", "labels.csv")}, None),
    ("nul_byte", labels(raw=b"path,label,split\nimages/000000.jpg,st\x00ar,train\nimages/000001.jpg,square,val\n"),
     {"train": ("error", "labels.csv"), "evaluate": ("error", "labels.csv")}, None),
    ("one_cell_row", labels(lambda rows, d: rows[:2] + [[rows[2][0]]] + rows[3:]),
     {"train": ("error", "row 3"), "evaluate": ("error", "row 3")}, None),
    ("empty_path", labels(_cell(3, 0, "")), {"train": ("error", "row 3"), "evaluate": ("error", "row 3")}, None),
    ("missing_image", labels(_cell(3, 0, "images/missing.jpg")),
     {"train": ("error", "missing.jpg"), "evaluate": ("error", "missing.jpg")}, None),
    ("path_is_folder", labels(_cell(3, 0, "images")), {"train": ("error", "row 3"), "evaluate": ("error", "row 3")}, None),
    ("path_not_image", labels(_cell(3, 0, "synthetic.json")),
     {"train": (("error", "ok"), "synthetic.json"), "evaluate": (("error", "skip"), "synthetic.json")},
     "training reads it as an undecodable image (skipped and counted, see train/*); evaluate must name it"),
    ("empty_label_cell", labels(_cell(3, 1, "")), {"train": ("error", "row 3"), "evaluate": ("error", "row 3")},
     "issue: one empty label cell switches the whole dataset to multi-label"),
    ("blank_label_cell", labels(_cell(4, 1, "   ")), {"train": ("error", "row 4"), "evaluate": ("error", "row 4")}, None),
    ("case_variants", labels(_case_variants), {"train": ("error", "STAR|Star"), "evaluate": ("error", "STAR|Star")},
     "issue: Star/STAR/star become three classes"),
    ("conflicting_duplicate", labels(_conflict), {"train": ("error", "000000.jpg"), "evaluate": ("error", "000000.jpg")},
     "issue: conflicting duplicate rows"),
    ("repeated_20x", labels(_dup_rows(20)),
     {"train": (("error", "skip"), "000000.jpg|row 14|rows 14"), "evaluate": (("error", "skip"), "000000.jpg|row 14|rows 14")},
     "issue: rows repeated 20 times weigh 20 times"),
    ("train_val_leak", labels(_leak), {"train": ("error", "000000.jpg"), "evaluate": (("error", "ok"), "000000.jpg")},
     "one image in both the train and the val split"),
    ("unknown_class", labels(_cell(3, 1, "hexagon")), {"evaluate": ("error", "hexagon")}, None),
    ("bad_split", labels(_cell(3, 2, "training")), {"train": ("error", "row 3"), "evaluate": ("error", "row 3")}, None),
    ("empty_split", labels(_cell(3, 2, "")), {"train": ("error", "row 3"), "evaluate": ("error", "row 3")}, None),
    ("semicolon_delimited", labels(_semicolons), {"train": ("error", "labels.csv"), "evaluate": ("error", "labels.csv")}, None),
    ("huge_field", labels(_huge_field), {"train": ("error", "labels.csv"), "evaluate": ("error", "labels.csv")},
     "a cell over the csv module's field limit"),
    ("newline_in_label", labels(_cell(3, 1, "star\nsquare")), {"train": ("error", "row 3"), "evaluate": ("error", "row 3")}, None),
    ("one_class", labels(_one_class), {"train": ("error", "star")}, None),
    ("one_row", labels(_one_row), {"train": ("error", "labels.csv|split")}, None),
    ("backslash_paths", labels(_backslash), {"train": (("ok", "error"), "row 2")}, "Windows separators"),
    # valid variations: read as the plain file would be
    ("absolute_paths", labels(_absolute), {"train": ("ok", None), "evaluate": ("ok", None)}, None),
    ("dotdot_paths", labels(_dotdot), {"train": ("ok", None), "evaluate": ("ok", None)}, None),
    ("caps_header", labels(_caps_header), {"train": ("ok", None), "evaluate": ("ok", None)}, None),
    ("crlf", labels(lambda rows, d: rows, newline="\r\n"), {"train": ("ok", None), "evaluate": ("ok", None)}, None),
    ("utf8_bom", labels(lambda rows, d: rows, bom=True), {"train": ("ok", None), "evaluate": ("ok", None)}, None),
    ("extra_column", labels(_extra_col), {"train": ("ok", None), "evaluate": ("ok", None)}, None),
    ("trailing_spaces", labels(_trailing_space), {"train": ("ok", None), "evaluate": ("ok", None)}, None),
    ("no_split_column", labels(_no_split_col), {"train": ("ok", None), "evaluate": ("ok", None)}, None),
    ("no_val_rows", labels(_all_train), {"train": ("ok", None)}, "no val rows: a seeded split of the train rows"),
]


def _label_case(slug, build, cmd, expect, match, note) -> Case:
    data = "{data}/nope.csv" if slug == "missing_file" else "{labels}"
    argv = train_argv(data) if cmd == "train" else evaluate_argv(data)
    expect = (expect,) if isinstance(expect, str) else expect
    checks = {}
    if "ok" in expect:
        checks["ok"] = trains_on() if cmd == "train" else evaluated(min_images=12)
    if "skip" in expect:
        checks["skip"] = _mentions(match) if cmd == "train" else evaluate_skipped(match)
    return Case(f"labels/{slug}/{cmd}", "labels", build, Cli(argv), expect, match=(match,) if match else (), checks=checks,
                note=note or "")


def _mentions(name: str):
    def check(env: Env, res: Result) -> None:
        mentions_skip(res.text, name)

    return check


# --- class folders ------------------------------------------------------------------------------


def class_folders(layout=None):
    """Builder: ``{cls}`` = a folder per class made from the synthetic images (``layout`` edits it)."""

    def build(env: Env) -> None:
        env.model()
        data = env.data()
        root = env.dir("cls")
        for r in _rows(data / "labels.csv")[1:]:
            d = root / r[1]
            d.mkdir(exist_ok=True)
            shutil.copy(data / r[0], d / Path(r[0]).name)
        if layout is not None:
            layout(root)
        env.set(cls=root)

    return build


def _flat(root: Path) -> None:
    for d in list(root.iterdir()):
        for f in d.iterdir():
            f.rename(root / f.name)
        d.rmdir()


def _split_tree(extra_val_class: bool):
    def layout(root: Path) -> None:
        train, val = root / "train", root / "val"
        train.mkdir()
        val.mkdir()
        for d in [d for d in root.iterdir() if d.name not in ("train", "val")]:
            files = sorted(d.iterdir())
            (train / d.name).mkdir()
            (val / d.name).mkdir()
            for n, f in enumerate(files):
                f.rename((val if n % 3 == 2 else train) / d.name / f.name)
            if not any((val / d.name).iterdir()):
                (train / d.name / files[0].name).rename(val / d.name / files[0].name)
            d.rmdir()
        if extra_val_class:
            (val / "hexagon").mkdir()
            shutil.copy(next((val / "star").iterdir()), val / "hexagon" / "h.jpg")

    return layout


def _mkdir(name: str, files: dict | None = None):
    def layout(root: Path) -> None:
        d = root / name
        d.mkdir()
        for n, data in (files or {}).items():
            (d / n).write_bytes(data)

    return layout


def _only(name: str):
    def layout(root: Path) -> None:
        for d in root.iterdir():
            if d.name != name:
                shutil.rmtree(d)

    return layout


def _case_folder(root: Path) -> None:
    src = next((root / "star").iterdir())
    (root / "Star").mkdir()
    shutil.copy(src, root / "Star" / "s.jpg")


def _symlink_loop(root: Path) -> None:
    os.symlink(root / "star", root / "star" / "loop")


def _nested(root: Path) -> None:
    d = root / "star" / "deeper" / "still"
    d.mkdir(parents=True)
    shutil.copy(next((root / "star").glob("*.jpg")), d / "n.jpg")


def _undecodable_name(root: Path) -> None:
    os.rename(root / "star", root / os.fsdecode(b"st\xffar"))


FOLDER_CASES = [
    ("no_class_folders", _flat, ("error", "cls"), True),
    ("empty_class_folder", _mkdir("hexagon"), ("error", "hexagon"), True),
    ("class_folder_without_images", _mkdir("hexagon", {"readme.txt": b"no images"}), ("error", "hexagon"), True),
    ("split_trees_differ", _split_tree(True), ("error", "hexagon"), True),
    ("one_class_folder", _only("star"), ("error", "star"), False),
    ("case_variant_folders", _case_folder, ("error", "Star"), True),
    ("symlink_loop", _symlink_loop, (("ok", "error"), "loop"), False),
    ("hidden_folder", _mkdir(".git", {"HEAD.jpg": b"not an image"}), ("ok", None), True),
    ("nested_subfolders", _nested, ("ok", None), False),
    ("undecodable_folder_name", _undecodable_name, (("ok", "error"), "st"), False),
    ("train_val_trees", _split_tree(False), ("ok", None), True),
]


def _folder_cases() -> list[Case]:
    out = []
    for slug, layout, (expect, match), with_eval in FOLDER_CASES:
        expect = (expect,) if isinstance(expect, str) else expect
        n = 13 if slug == "nested_subfolders" else 12
        for cmd in ("train", "evaluate") if with_eval else ("train",):
            argv = train_argv("{cls}") if cmd == "train" else evaluate_argv("{cls}")
            checks = {"ok": trains_on(n, classes=None) if cmd == "train" else evaluated(min_images=1)} if "ok" in expect else {}
            out.append(Case(f"labels/folders_{slug}/{cmd}", "labels", class_folders(layout), Cli(argv), expect,
                            match=(match,) if match else (), checks=checks))
    return out


# --- counts CSV ---------------------------------------------------------------------------------

# the counts CSV's columns: path, triangle, square, star, split
COUNT_CASES = [
    ("no_header", counts(lambda rows, d: rows[1:]), "error", "counts.csv"),
    ("negative", counts(_cell(3, 1, "-1")), "error", "row 3"),
    ("fraction", counts(_cell(3, 1, "1.5")), "error", "row 3"),
    ("nan", counts(_cell(3, 1, "nan")), "error", "row 3"),
    ("inf", counts(_cell(3, 1, "inf")), "error", "row 3"),
    ("1e12", counts(_cell(3, 1, "1e12")), "error", "row 3"),
    ("1e308", counts(_cell(3, 1, "1e308")), "error", "row 3"),
    ("word", counts(_cell(3, 1, "three")), "error", "row 3"),
    ("empty_cell", counts(_cell(3, 1, "")), "error", "row 3"),
    ("short_row", counts(lambda rows, d: rows[:2] + [rows[2][:2]] + rows[3:]), "error", "row 3"),
    ("duplicate_column", counts(lambda rows, d: [["path", "star", "square", "star", "split"]] + rows[1:]), "error", "star"),
    ("missing_image", counts(_cell(3, 0, "images/missing.jpg")), "error", "missing.jpg"),
    ("latin1", counts(raw="path,étoile\nimages/000000.jpg,1\n".encode("latin-1")), "error", "counts.csv"),
    ("header_only", counts(raw=b"path,triangle,square,star\n"), "error", "counts.csv"),
    ("path_column_only", counts(lambda rows, d: [[r[0]] for r in rows]), "error", "counts.csv"),
    ("bad_split", counts(_cell(3, 4, "training")), "error", "row 3"),
    ("whole_float", counts(_cell(2, 1, "1.0")), "ok", None),
    ("spaces", counts(_cell(2, 1, " 2 ")), "ok", None),
    ("bom", counts(lambda rows, d: rows, bom=True), "ok", None),
]


def _count_cases() -> list[Case]:
    out = []
    for slug, build, expect, match in COUNT_CASES:
        checks = {}
        if expect == "ok":
            checks["ok"] = counts_are(0, [1.0, 0.0, 0.0]) if slug == "whole_float" else \
                counts_are(0, [2.0, 0.0, 0.0]) if slug == "spaces" else reached_training(classes=CLASSES)
        out.append(Case(f"counts/{slug}/train", "counts", build, Cli(train_argv("{counts}", "--counts")), expect,
                        match=(match,) if match else (), checks=checks))
    # the reader on its own, against a model's classes
    out.append(Case("counts/unknown_column/read_counts_csv", "counts",
                    counts(lambda rows, d: [["path", "hexagon", "split"]] + [[r[0], "1", r[-1]] for r in rows[1:]]),
                    _api_counts(CLASSES), "error", match=("hexagon",)))
    out.append(Case("counts/1e12/read_counts_csv", "counts", counts(_cell(3, 1, "1e12")), _api_counts(None), "error",
                    match=("row 3",), note="issue: counts of 1e12 are accepted"))
    return out


def _api_counts(classes):
    from .harness import Api

    def call(env: Env):
        from weakloc.data.counts import read_counts_csv

        return read_counts_csv(Path(env["counts"]), classes=classes)

    return Api(call, "read_counts_csv(path)")


# --- real training runs ---------------------------------------------------------------------------


def _corrupt_images(which: str):
    """Builder: the data copy with two train (or one val) images overwritten by a cut JPEG."""

    def build(env: Env) -> None:
        data = env.data()
        rows = _rows(data / "labels.csv")[1:]
        if which == "all":
            chosen = rows
        else:
            chosen = [r for r in rows if r[2] == which][: 2 if which == "train" else 1]
        for r in chosen:
            p = data / r[0]
            p.write_bytes(F.jpeg_cut(p.read_bytes(), 0.3))
        env.info["bad"] = [r[0] for r in chosen]

    return build


def _resume(content: str):
    """Builder: the data, and ``{out}/checkpoints/last.ckpt`` broken in the way ``content`` says."""

    def build(env: Env) -> None:
        env.data()
        ck = env.out / "checkpoints"
        ck.mkdir(parents=True)
        last = ck / "last.ckpt"
        if content == "garbage":
            last.write_bytes(b"PK\x03\x04 this is not a checkpoint" * 10)
        elif content == "empty":
            last.write_bytes(b"")
        elif content == "dir":
            last.mkdir()
        elif content == "pickle":
            marker = env.root / "PWNED"
            last.write_bytes(pickle.dumps(_Payload(str(marker))))
        env.info["marker"] = str(env.root / "PWNED")

    return build


class _Payload:
    """Unpickling this runs ``open(marker, 'w')``: a checkpoint must never be unpickled freely."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _train_cases() -> list[Case]:
    out = [
        Case("train/undecodable_train_images/train", "train", _corrupt_images("train"), Cli(train_argv("{labels}")), "skip",
             checks={"skip": skipped_count(2)}, train=True, timeout=180,
             note="undecodable training images are skipped and counted"),
        Case("train/undecodable_val_image/train", "train", _corrupt_images("val"), Cli(train_argv("{labels}")), "skip",
             checks={"skip": skipped_count(1)}, train=True, timeout=180,
             note="issue: undecodable validation images are dropped uncounted"),
        Case("train/all_images_undecodable/train", "train", _corrupt_images("all"), Cli(train_argv("{labels}")), "error",
             match=("labels.csv|000000.jpg|decod|read",), train=True, timeout=180),
    ]
    for content in ("garbage", "empty", "dir", "pickle"):
        out.append(Case(f"train/resume_{content}_last_ckpt/train", "train", _resume(content),
                        Cli(train_argv("{labels}", "--resume")), "error", match=("last.ckpt|checkpoint",), train=True, timeout=180,
                        note="issue: a truncated last.ckpt crashes --resume"))
    # the real entry point, as a process: its exit code, no traceback
    out.append(Case("train/missing_data/process", "train", lambda env: None,
                    Proc(["train", "{root}/no-such-data", "-o", "{out}"]), "error", match=("no-such-data",), timeout=240,
                    note="python -m weakloc.cli, a fresh process"))
    return out


def cases() -> list[Case]:
    out: list[Case] = []
    for slug, build, per_cmd, note in LABEL_CASES:
        for cmd, (expect, match) in per_cmd.items():
            out.append(_label_case(slug, build, cmd, expect, match, note if note and not note.startswith("{") else None))
    out += _folder_cases()
    out += _count_cases()
    out += _train_cases()
    return out
