"""Trust on first contact: labels, counts and annotations are checked when read, two classes are
two classes unless one is an absence (or --positive says so), and evaluation scores every class
with boxes and names the images it could not score."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from weakloc.data.annotations import match_annotations, read_annotations, read_coco, read_yolo
from weakloc.data.counts import MAX_COUNT, count_labels_or_annotated, read_counts_csv
from weakloc.data.labels import load_labels, read_class_folders, read_labels_csv, with_positive
from weakloc.errors import AnnotationError, LabelError, WeaklocError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def _images(root, names, size=(16, 16)):
    root.mkdir(parents=True, exist_ok=True)
    for n in names:
        Image.new("RGB", size, (90, 90, 90)).save(root / n)
    return root


def _tree(root, classes, n=3):
    for c in classes:
        _images(root / c, [f"{c}{i}.png" for i in range(n)])
    return root


def _csv(tmp_path, text, name="labels.csv", images=("a.png", "b.png", "c.png", "d.png")):
    _images(tmp_path, images)
    p = tmp_path / name
    p.write_text(text)
    return p


# --- two classes: yes/no only when one is an absence, or when the user says which is "yes" ---

def test_two_object_classes_are_two_classes_not_yes_no(tmp_path):
    d = load_labels(_tree(tmp_path, ["raccoon", "kangaroo"]))
    assert d.classes == ["kangaroo", "raccoon"] and d.positive_index is None
    assert d.task_description.startswith("2 object classes: kangaroo, raccoon")
    assert "--positive" in d.task_description


@pytest.mark.parametrize("classes, positive", [(["melanoma", "normal"], "melanoma"), (["no", "yes"], "yes"),
                                               (["0", "1"], "1"), (["dog", "no_dog"], "dog"), (["Platelets", "none"], "Platelets")])
def test_an_absence_class_makes_a_yes_no_task(tmp_path, classes, positive):
    d = load_labels(_tree(tmp_path, classes))
    assert d.classes[d.positive_index] == positive
    assert d.task_description.startswith(f"yes/no task: positive class {positive!r}") and "'no' word" in d.task_description
    assert d.subset([0, 1]).positive_index == d.positive_index


def test_positive_option_chooses_the_yes_class_and_unknown_names_are_errors(tmp_path):
    root = _tree(tmp_path / "two", ["raccoon", "kangaroo"])
    d = load_labels(root, positive="raccoon")
    assert d.positive_index == d.classes.index("raccoon") and "chosen with --positive" in d.task_description
    assert load_labels(root, positive="Raccoon").positive == "raccoon"  # one case-insensitive match
    with pytest.raises(LabelError, match=r"--positive 'zebra' is not a class .*kangaroo, raccoon"):
        load_labels(root, positive="zebra")
    with pytest.raises(LabelError, match="two single-label classes.*3 class"):
        load_labels(_tree(tmp_path / "three", ["a", "b", "c"]), positive="a")


def test_multi_and_single_tasks_describe_themselves(tmp_path):
    m = read_labels_csv(_csv(tmp_path, "a.png,cat;dog\nb.png,dog\n"))
    assert m.positive_index is None and m.task_description.startswith("multi-label task: 2 class(es)")
    with pytest.raises(LabelError, match="two single-label classes"):
        with_positive(m, "cat")


def test_fine_tune_stores_the_positive_class_it_is_given(tmp_path):
    from weakloc.train import fine_tune

    root = _tree(tmp_path / "data", ["raccoon", "kangaroo"], n=4)
    res = fine_tune(root, tmp_path / "run", positive="raccoon", backbone="test_resnet", pretrained="none", input_size=64,
                    epochs=1, batch_size=4, progress=False, limit_batches=1, workers=0, test_scale=1)
    cfg = res.model.config
    assert cfg.classes == ["kangaroo", "raccoon"] and cfg.positive_class == 1
    with pytest.raises(LabelError, match="is not a class"):
        fine_tune(root, tmp_path / "run2", positive="zebra", backbone="test_resnet", pretrained="none", epochs=1)


# --- labels CSV and class folders ---

@pytest.mark.parametrize("cell", ["", "   "])
def test_empty_label_cell_in_a_single_label_file_is_an_error(tmp_path, cell):
    with pytest.raises(LabelError, match="row 3: empty label"):
        read_labels_csv(_csv(tmp_path, f"path,label\na.png,cat\nb.png,{cell}\nc.png,dog\n"))


def test_multi_label_file_may_have_images_with_no_class(tmp_path):
    m = read_labels_csv(_csv(tmp_path, "a.png,cat;dog\nb.png,\nc.png,;\n"))
    assert m.task == "multi" and m.targets.tolist() == [[1, 1], [0, 0], [0, 0]]


def test_case_variant_classes_are_an_error_naming_the_rows(tmp_path):
    with pytest.raises(LabelError, match=r"row [34]: class '(STAR|star)' differs only in case from 'Star' \(.*row 2\)"):
        read_labels_csv(_csv(tmp_path, "path,label\na.png,Star\nb.png,STAR\nc.png,star\n"))
    root = _tree(tmp_path / "folders", ["Cat", "cat"])
    with pytest.raises(LabelError, match="differs only in case"):
        read_class_folders(root)


def test_conflicting_duplicate_rows_are_an_error_naming_both_rows(tmp_path):
    with pytest.raises(LabelError, match=r"row 4: image 'a.png' is listed again with label 'dog'.*row 2 gives 'cat'"):
        read_labels_csv(_csv(tmp_path, "path,label\na.png,cat\nb.png,dog\na.png,dog\n"))
    with pytest.raises(LabelError, match=r"row 3: image './a.png' .*split val.*row 2.*split train"):
        read_labels_csv(_csv(tmp_path, "path,label,split\na.png,cat,train\n./a.png,cat,val\nb.png,dog,val\n"))


def test_exact_duplicate_rows_are_read_once_with_one_warning(tmp_path):
    text = "path,label\n" + "a.png,cat\n" * 20 + "b.png,dog\n"
    with pytest.warns(UserWarning) as caught:
        d = read_labels_csv(_csv(tmp_path, text))
    assert len(caught) == 1 and "19 row(s) repeat an earlier row" in str(caught[0].message)
    assert len(d) == 2 and d.targets.tolist() == [0, 1]


@pytest.mark.parametrize("label, message", [
    ("../../../../some/dir/NAME", "path separator"), ("a\\b", "path separator"), ("bad\x01name", "control character"),
    (".", "not a class name"), ("..", "not a class name"),
])
def test_class_names_that_could_not_name_a_class_are_refused(tmp_path, label, message):
    with pytest.raises(LabelError, match=f"row 3: .*{message}"):
        read_labels_csv(_csv(tmp_path, f"path,label\na.png,cat\nb.png,{label}\n"))


def test_a_line_break_inside_a_quoted_label_is_not_glued_into_a_new_class(tmp_path):
    with pytest.raises(LabelError, match=r"row 3: class name 'star\\nsquare' holds a control character"):
        read_labels_csv(_csv(tmp_path, 'path,label\na.png,star\nb.png,"star\nsquare"\nc.png,square\n'))


def test_non_utf8_csv_files_are_an_error(tmp_path):
    _images(tmp_path, ["a.png"])
    (tmp_path / "labels.csv").write_bytes("path,label\na.png,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(LabelError, match="not a UTF-8 text file"):
        read_labels_csv(tmp_path / "labels.csv")
    (tmp_path / "counts.csv").write_bytes("path,caf\u00e9\na.png,1\n".encode("latin-1"))
    with pytest.raises(LabelError, match="not a UTF-8 text file"):
        read_counts_csv(tmp_path / "counts.csv")


# --- counts ---

@pytest.mark.parametrize("cell, message", [("1e12", "more than"), ("1e308", "more than"), ("inf", "is inf"), ("-inf", "is -inf"),
                                           ("nan", "is nan"), ("-2", "negative"), ("2.5", "not a whole number"),
                                           (str(MAX_COUNT + 1), "more than")])
def test_absurd_or_non_finite_counts_are_an_error_naming_the_row(tmp_path, cell, message):
    with pytest.raises(LabelError, match=f"row 3: count of 'rbc' .*{message}|row 3: count of 'rbc' is {message}"):
        read_counts_csv(_csv(tmp_path, f"path,rbc\na.png,1\nb.png,{cell}\n", name="counts.csv"))


def test_counts_csv_checks_columns_duplicates_and_keeps_the_ceiling(tmp_path):
    ok = read_counts_csv(_csv(tmp_path, f"path,rbc\na.png,{MAX_COUNT}\n", name="counts.csv"))
    assert ok.counts.tolist() == [[MAX_COUNT]]
    for header, message in [("path,rbc,RBC", "differs only in case"), ("path,rbc,rbc", "more than once"),
                            ("path,rbc,../x", "path separator")]:
        with pytest.raises(LabelError, match=message):
            read_counts_csv(_csv(tmp_path, f"{header}\na.png,1,1\n", name="counts.csv"))
    with pytest.raises(LabelError, match="row 3: image 'a.png' is listed again.*row 2"):
        read_counts_csv(_csv(tmp_path, "path,rbc\na.png,1\na.png,2\n", name="counts.csv"))
    with pytest.warns(UserWarning, match="1 row"):
        assert len(read_counts_csv(_csv(tmp_path, "path,rbc\na.png,1\na.png,1\n", name="counts.csv"))) == 1


def _coco_doc(images, anns, cats=("cell",)):
    return {"images": [{"id": i + 1, "file_name": n, "width": w, "height": h} for i, (n, w, h) in enumerate(images)],
            "categories": [{"id": k + 1, "name": c} for k, c in enumerate(cats)],
            "annotations": [{"id": j + 1, "image_id": i, "category_id": c, "bbox": b} for j, (i, c, b) in enumerate(anns)]}


def test_a_bad_counts_csv_is_an_error_not_replaced_by_annotation_counts(tmp_path):
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps(_coco_doc([("a.png", 16, 16), ("b.png", 16, 16)], [(1, 1, [1, 1, 4, 4]), (1, 1, [6, 6, 4, 4])])))
    _csv(tmp_path, "path,cell\na.png,1e12\nb.png,0\n", name="counts.csv")
    with pytest.raises(LabelError, match="counts.csv, row 2: count of 'cell'"):
        count_labels_or_annotated(tmp_path, gt)
    with pytest.raises(LabelError, match="counts.csv, row 2"):
        count_labels_or_annotated(tmp_path / "counts.csv", gt)
    labels = _csv(tmp_path / "lab", "path,label\na.png,cell\nb.png,cell\n")
    counted = count_labels_or_annotated(labels, gt)  # no counts CSV: the annotated objects are counted
    assert counted.counts.tolist() == [[2], [0]]


# --- annotations ---

@pytest.mark.parametrize("ann, message", [
    ({"bbox": "1,2,3,4"}, "annotation 5 of a.png: needs a 4-number bbox"),
    ({"bbox": None}, "annotation 5 of a.png: needs a 4-number bbox"),
    ({"bbox": [1, 2, "3", 4]}, "annotation 5 of a.png: needs a 4-number bbox"),
    ({"bbox": [1, 2, 3, 4], "segmentation": [[1, 2, 3, 4, 5]]}, "annotation 5 .*odd number"),
    ({"bbox": [1, 2, 3, 4], "segmentation": [["x", 1, 2, 3, 4, 5]]}, "annotation 5 .*not a list of finite numbers"),
    ({"bbox": [1, 2, 3, 4], "segmentation": {"size": [16, 16], "counts": [10, 5]}}, "annotation 5 .*RLE .*cover 15 pixels"),
    ({"bbox": [1, 2, 3, 4], "segmentation": {"size": [8, 8], "counts": [64]}}, "annotation 5 .*RLE .*differs from the image"),
    ({"bbox": [1, 2, 3, 4], "segmentation": {"size": [16, 16], "counts": "\x01\x02"}}, "annotation 5 .*not a valid compressed RLE"),
    ({"bbox": [1, 2, 3, 4], "point": [1]}, "annotation 5 .*point must be"),
])
def test_malformed_coco_entries_name_the_annotation(tmp_path, ann, message):
    doc = _coco_doc([("a.png", 16, 16)], [])
    doc["annotations"] = [{"id": 5, "image_id": 1, "category_id": 1, **ann}]
    (tmp_path / "gt.json").write_text(json.dumps(doc))
    with pytest.raises(AnnotationError, match=message):
        read_coco(tmp_path / "gt.json")


def test_coco_valid_rle_and_repeated_ids(tmp_path):
    doc = _coco_doc([("a.png", 4, 4)], [])
    doc["annotations"] = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2],
                           "segmentation": {"size": [4, 4], "counts": [0, 2, 2, 2, 10]}}]
    (tmp_path / "gt.json").write_text(json.dumps(doc))
    assert read_coco(tmp_path / "gt.json").find("a.png").mask_of("cell", (4, 4)).sum() == 4
    doc["images"].append(dict(doc["images"][0], file_name="b.png"))
    (tmp_path / "gt.json").write_text(json.dumps(doc))
    with pytest.raises(AnnotationError, match="image id 1 appears twice"):
        read_coco(tmp_path / "gt.json")
    (tmp_path / "gt.json").write_bytes('{"images": [], "categories": [{"id": 1, "name": "caf\u00e9"}]}'.encode("latin-1"))
    with pytest.raises(AnnotationError, match="not a UTF-8"):
        read_coco(tmp_path / "gt.json")


def test_degenerate_boxes_are_dropped_or_clipped_with_one_warning_per_kind(tmp_path):
    boxes = [[2, 2, 4, 4], [3, 3, 0, 5], [3, 3, 5, 0], [20, 20, 4, 4], [-5, 2, 10, 4], [10, 10, 10, 10], [14, 0, 2.5, 2]]
    doc = _coco_doc([("a.png", 16, 16)], [(1, 1, b) for b in boxes])
    (tmp_path / "gt.json").write_text(json.dumps(doc))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gt = read_coco(tmp_path / "gt.json")
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 3
    assert any("2 zero-size box(es) dropped" in m for m in messages)
    assert any("1 box(es) entirely outside their image dropped" in m and "annotation 4" in m for m in messages)
    assert any("2 box(es) reaching past the image edge clipped" in m for m in messages)
    assert {k: len(v) for k, v in gt.issues.items()} == {"zero_size": 2, "outside": 1, "clipped": 2}
    b = gt.find("a.png").boxes
    assert b.tolist() == [[2, 2, 6, 6], [0, 2, 5, 6], [10, 10, 15, 15], [14, 0, 15, 2]]
    assert (b[:, 2:] >= b[:, :2]).all() and b.min() >= 0 and b.max() <= 15


def _yolo(tmp_path, text: bytes | str, size=(20, 10)):
    tmp_path.mkdir(parents=True)
    (tmp_path / "data.yaml").write_text("names: ['fish', 'shark']\n")
    _images(tmp_path / "images", ["a.jpg"], size=size)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.txt").write_bytes(text if isinstance(text, bytes) else text.encode())
    return tmp_path


def test_yolo_non_utf8_file_is_an_error_and_edge_boxes_are_clipped_once(tmp_path):
    with pytest.raises(AnnotationError, match=r"a.txt: not a UTF-8 text file"):
        read_yolo(_yolo(tmp_path / "bad", b"0 0.5 0.5 0.2 0.2 \xff\n"))
    with pytest.raises(AnnotationError, match=r"a.txt:1: coordinates must be finite"):
        read_yolo(_yolo(tmp_path / "nan", "0 nan 0.5 0.2 0.2\n"))
    text = "0 0.5 0.5 0.2 0.4\n1 0.95 0.5 0.3 0.4\n1 0.5 0.5 0 0.3\n0 0.1 0.1 0.3 0.1 0.3 0.3 0.1 0.3\n"
    with pytest.warns(UserWarning) as caught:
        gt = read_yolo(_yolo(tmp_path / "ok", text))
    assert sorted(str(w.message).split(": ", 1)[1].split(":")[0] for w in caught) == [
        "1 box(es) reaching past the image edge clipped to it", "1 zero-size box(es) dropped"]
    a = gt.find("a.jpg")
    assert a.labels == ["fish", "shark", "fish"]
    assert torch.allclose(a.boxes, torch.tensor([[8.0, 3.0, 12.0, 7.0], [16.0, 3.0, 19.0, 7.0], [2.0, 1.0, 6.0, 3.0]]))


@pytest.mark.parametrize("names, message", [
    ("{0: fish, x: shark}", r"keys of 'names' must be class indices.*'x'"),
    ("{0: fish, 2: shark}", r"class indices 0\.\.1 without gaps, got \[0, 2\]"),
    ("{-1: fish}", r"class indices 0\.\.0"),
    ("{true: fish}", r"keys of 'names' must be class indices"),
    ("{0: fish, 0: shark}", r"line 1, column \d+: key 0 appears twice"),
    ("[fish, fish]", r"'names' gives 'fish' to classes 0 and 1"),
    ("{0: fish, 1: [shark]}", r"class 1 in 'names' must be a non-empty name"),
    ("[fish, null]", r"class 1 in 'names' must be a non-empty name"),
    ("[fish, '  ']", r"class 1 in 'names' must be a non-empty name"),
    ("[]", r"needs a 'names' list"),
    ("fish", r"needs a 'names' list"),
    ("[" * 5000, r"nested too deeply|not valid YAML"),
])
def test_yolo_names_that_cannot_be_class_indices_are_an_error_naming_data_yaml(tmp_path, names, message):
    root = _yolo(tmp_path / "ds", "0 0.5 0.5 0.2 0.4\n")
    (root / "data.yaml").write_text(f"names: {names}\n")
    with pytest.raises(AnnotationError, match=r"data.yaml: .*" + message):
        read_yolo(root)


def test_yolo_names_mapping_is_read_by_index(tmp_path):
    root = _yolo(tmp_path / "ds", "0 0.5 0.5 0.2 0.4\n1 0.5 0.5 0.2 0.4\n")
    (root / "data.yaml").write_text("names: {1: shark, 0: fish}\n")
    gt = read_yolo(root)
    assert gt.classes == ["fish", "shark"] and gt.find("a.jpg").labels == ["fish", "shark"]


def test_deeply_nested_coco_json_is_an_error_naming_the_file(tmp_path):
    (tmp_path / "deep.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(AnnotationError, match=r"deep.json: JSON nested too deeply"):
        read_annotations(tmp_path / "deep.json")


def test_coco_with_a_byte_order_mark_reads_and_degenerate_polygons_are_dropped_by_name(tmp_path):
    doc = _coco_doc([("a.png", 16, 16)], [(1, 1, [1, 1, 8, 8]), (1, 1, [2, 2, 4, 4])])
    doc["annotations"][0]["segmentation"] = [[1, 1, 8, 8]]  # two points: no area
    doc["annotations"][1]["segmentation"] = [[2, 2, 6, 2, 6, 6], [1, 1, 2, 2]]
    (tmp_path / "gt.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(doc).encode())
    with pytest.warns(UserWarning, match=r"gt.json: 2 segmentation polygon\(s\) of fewer than 3 points dropped.*a.png, annotation 1"):
        gt = read_coco(tmp_path / "gt.json")
    a = gt.find("a.png")
    assert a.segmentations == [None, [[2, 2, 6, 2, 6, 6]]] and len(a.boxes) == 2
    assert not a.has_masks("cell")  # the first object has no mask left: not scored as background by PxAP


def test_evaluate_names_the_annotation_file_when_no_image_has_a_box(tmp_path):
    from weakloc.evaluate.run import evaluate_model

    model, labels, names = _eval_setup(tmp_path, ["raccoon", "kangaroo"])
    doc = _coco_doc([(n, 64, 64) for n in names], [], cats=["raccoon", "kangaroo"])
    (tmp_path / "empty.json").write_text(json.dumps(doc))
    with pytest.raises(WeaklocError, match=r"empty.json: none of the 7 images has a box of an evaluated class"):
        evaluate_model(model, labels, tmp_path / "empty.json", split="all", batch_size=4)


def test_annotation_image_sizes_are_checked_against_the_images(tmp_path):
    _images(tmp_path, ["a.png", "b.png", "c.png"], size=(64, 32))
    doc = _coco_doc([("a.png", 64, 32), ("b.png", 128, 64), ("c.png", 50, 50)], [(1, 1, [1, 1, 4, 4])])
    (tmp_path / "gt.json").write_text(json.dumps(doc))
    gt = read_coco(tmp_path / "gt.json")
    anns, unannotated = match_annotations(gt, [tmp_path / "a.png", tmp_path / "d.png"])
    assert anns[0] is gt.find("a.png") and anns[1] is None and unannotated == [str(tmp_path / "d.png")]
    with pytest.warns(UserWarning, match=r"1 image\(s\) are resized copies.*b.png: the image is 64x32 pixels but .* give 128x64"):
        match_annotations(gt, [tmp_path / "b.png"])
    with pytest.raises(AnnotationError, match=r"c.png: the image is 64x32 pixels but .*gt.json give 50x50"):
        match_annotations(gt, [tmp_path / "a.png", tmp_path / "c.png"])
    doc["images"][2].update(width=32, height=64)
    (tmp_path / "gt.json").write_text(json.dumps(doc))
    with pytest.raises(AnnotationError, match="width and height swapped"):
        match_annotations(read_coco(tmp_path / "gt.json"), [tmp_path / "c.png"])


# --- evaluate and calibrate ---

def _eval_setup(tmp_path, classes):
    from weakloc.models import ModelConfig, WeaklocNet

    names = [f"{c}{i}.png" for c in classes for i in range(3)]
    _images(tmp_path, names, size=(64, 64))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (tmp_path / "labels.csv").write_text("path,label\n" + "".join(f"{n},{n[:-5]}\n" for n in names) + f"broken.png,{classes[0]}\n")
    annotated = names[:-1]  # the last image has no annotation
    doc = _coco_doc([(n, 64, 64) for n in annotated], [(i + 1, classes.index(n[:-5]) + 1, [8, 8, 30, 30])
                                                       for i, n in enumerate(annotated)], cats=classes)
    (tmp_path / "gt.json").write_text(json.dumps(doc))
    torch.manual_seed(0)
    labels = load_labels(tmp_path / "labels.csv")
    cfg = ModelConfig(backbone="test_resnet", classes=labels.classes, input_size=64, output_stride=8, drop_rate=0.0,
                      positive_class=labels.positive_index)
    return WeaklocNet(cfg, pretrained="none").eval(), labels, names


def test_evaluate_scores_every_class_with_boxes_and_names_what_it_could_not_score(tmp_path):
    from weakloc.evaluate.run import evaluate_model

    model, labels, names = _eval_setup(tmp_path, ["raccoon", "kangaroo"])
    assert model.config.positive_class is None
    rep = evaluate_model(model, labels, tmp_path / "gt.json", split="all", batch_size=4)
    assert rep["samples_per_class"] == {"raccoon": 3, "kangaroo": 2}
    assert rep["localization_samples"] == 5 and rep["unscored_boxes"] == {}
    assert rep["unannotated_images"] == [str(tmp_path / names[-1]), str(tmp_path / "broken.png")]
    assert [s["file"] for s in rep["skipped_images"]] == [str(tmp_path / "broken.png")]
    assert "broken.png" in rep["skipped_images"][0]["reason"]  # the image reader's own reason, naming the file


def test_evaluate_localizes_only_the_positive_class_of_a_yes_no_model(tmp_path):
    from weakloc.evaluate.run import evaluate_model

    model, labels, _ = _eval_setup(tmp_path, ["lesion", "normal"])
    assert model.config.positive_class == 0
    gt = json.loads((tmp_path / "gt.json").read_text())  # boxes of the 'no' class too: counted, not scored
    rep = evaluate_model(model, labels, tmp_path / "gt.json", split="all", batch_size=4)
    assert rep["samples_per_class"] == {"lesion": 3}
    assert rep["unscored_boxes"] == {"normal": sum(a["category_id"] == 2 for a in gt["annotations"])}


def test_calibration_never_stores_a_threshold_from_degenerate_boxes(tmp_path):
    import copy

    from weakloc.evaluate.calibrate import calibrate

    model, labels, names = _eval_setup(tmp_path, ["raccoon", "kangaroo"])
    doc = _coco_doc([(n, 64, 64) for n in names], [(i + 1, 1, [8, 8, 0, 0]) for i in range(len(names))], cats=["raccoon", "kangaroo"])
    (tmp_path / "zero.json").write_text(json.dumps(doc))
    before = copy.deepcopy(model.config.maps)
    with pytest.warns(UserWarning, match="zero-size"), pytest.raises(WeaklocError, match="no train image has a box"):
        calibrate(model, labels, tmp_path / "zero.json", per_class=2, split="train")
    assert model.config.maps == before
    # the typed reports calibrated_threshold reads: tests/test_evaluation_pipeline.py::test_calibrated_threshold_reads_the_typed_report


# --- the real datasets still load: warnings, no errors ---

@pytest.mark.parametrize("source, images", [("bccd/BCCD", "bccd/BCCD/JPEGImages"), ("aquarium", "aquarium")])
def test_real_datasets_load(source, images):
    if not (SHARED / source).exists():
        pytest.skip(f"{SHARED / source} is not here")
    from weakloc.data.images import list_images

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        gt = read_annotations(SHARED / source)
        anns, unannotated = match_annotations(gt, list_images(SHARED / images))
    assert len(gt) > 300 and not unannotated and all(a is not None for a in anns)
    if source == "aquarium":
        assert len(gt.issues["zero_size"]) == 2
    np.testing.assert_array_less(-1e-6, torch.cat([a.boxes for a in anns]).numpy())
