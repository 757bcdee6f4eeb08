"""Localization streamed to disk (issue 22): resumable after ``kill -9``, sharded under torchrun,
file lists as sources, a run's folder refusing another run, flat bookkeeping."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from weakloc.errors import WeaklocError
from weakloc.report import stream
from weakloc.report.localization import localize_images, localize_to_folder

N_IMAGES = 36


def _model(**extra):
    from weakloc.models import ModelConfig, WeaklocNet

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="test_resnet", classes=["a", "b", "c"], input_size=64, output_stride=8, drop_rate=0.0, **extra)
    return WeaklocNet(cfg, pretrained="none").eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """N_IMAGES small images of several sizes, two unreadable files among them."""
    root = tmp_path_factory.mktemp("stream")
    images = root / "imgs"
    images.mkdir()
    g = torch.Generator().manual_seed(0)
    for k in range(N_IMAGES):
        w, h = 40 + 7 * (k % 5), 36 + 5 * (k % 4)
        Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()).save(images / f"im{k:03d}.png")
    (images / "im007b.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (images / "im020b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    from weakloc.models import save_model

    save_model(_model(), root / "model")
    return root


def _cli(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "weakloc", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}, **kw)


def _localize(folder: Path, out: Path, *extra: str) -> subprocess.Popen:
    # batch size 1: an image's numbers do not depend on which others share its batch, whatever was done before a kill
    return _cli("localize", str(folder / "model"), str(folder / "imgs"), "-o", str(out), "--batch-size", "1", "--device", "cpu",
                "--workers", "0", "--threshold", "0.4", *extra)


def _done(proc: subprocess.Popen) -> str:
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, text
    return text


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for p in stream.parts(out) for line in p.read_text(encoding="utf-8").splitlines()]


def test_kill_9_then_resume_equals_an_uninterrupted_run(folder, tmp_path):
    whole = tmp_path / "whole"
    _done(_localize(folder, whole))
    expected = json.loads((whole / "detections.json").read_text(encoding="utf-8"))
    assert len(expected["images"]) == N_IMAGES and len(expected["skipped"]) == 2

    cut = tmp_path / "cut"
    proc = _localize(folder, cut)
    part = stream.part_path(cut, 0)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if part.is_file() and part.read_bytes().count(b"\n") >= 5:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = part.read_bytes().count(b"\n")
    assert 5 <= written < N_IMAGES + 2 and not (cut / "detections.json").exists()
    with open(part, "ab") as f:  # as if the kill had torn the line being written
        f.write(b'{"id": 999, "file_na')
    _done(_cli("assemble", str(cut)))  # on demand, from what a killed run left: its whole lines, nothing else
    partial = json.loads((cut / "detections.json").read_text(encoding="utf-8"))
    assert len(partial["images"]) + len(partial["skipped"]) == written
    assert all(im in expected["images"] for im in partial["images"])

    text = _done(_localize(folder, cut))
    assert "done by an earlier run" in text
    assert json.loads((cut / "detections.json").read_text(encoding="utf-8")) == expected
    ids = [line["id"] for line in _lines(cut)]
    assert sorted(ids) == list(range(1, N_IMAGES + 3))  # every file once: none missing, none twice
    assert sorted(p.name for p in (cut / "overlays").iterdir()) == sorted(p.name for p in (whole / "overlays").iterdir())

    again = _done(_localize(folder, cut))  # a finished run: nothing left to do, the same merge
    assert f"{N_IMAGES} image(s) ({N_IMAGES + 2} done by an earlier run)" in again
    assert json.loads((cut / "detections.json").read_text(encoding="utf-8")) == expected


def test_two_torchrun_ranks_merge_to_the_single_process_result(folder, tmp_path):
    single = tmp_path / "single"
    _done(_localize(folder, single, "--pictures", "none"))
    shared = tmp_path / "shared"
    env = {"OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "weakloc",
                          "localize", str(folder / "model"), str(folder / "imgs"), "-o", str(shared), "--batch-size", "1", "--device", "cpu",
                          "--workers", "0", "--threshold", "0.4", "--pictures", "none"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore", **env})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "rank 1 of 2" in run.stdout and "rank 0 of 2" in run.stdout
    assert json.loads((shared / "detections.json").read_text()) == json.loads((single / "detections.json").read_text())
    by_rank = {p.name: [json.loads(line)["id"] for line in p.read_text().splitlines()] for p in stream.parts(shared)}
    assert set(by_rank) == {"part-00000.jsonl", "part-00001.jsonl"}
    assert all(i % 2 == 1 for i in by_rank["part-00000.jsonl"]) and all(i % 2 == 0 for i in by_rank["part-00001.jsonl"])
    assert not (shared / "overlays").exists()


def test_another_model_or_setting_is_refused_and_restart_discards(folder, tmp_path):
    out = tmp_path / "out"
    model = _model()
    images = sorted((folder / "imgs").glob("im00*.png"))
    first = localize_to_folder(model, images, out, threshold=0.4, pictures="overlays")
    assert (first.images, first.resumed, first.computed) == (len(images), 0, len(images))
    with pytest.raises(WeaklocError, match=r"threshold 0\.4 then, 0\.5 now.*--restart"):
        localize_to_folder(model, images, out, threshold=0.5, pictures="overlays")
    with pytest.raises(WeaklocError, match="another image list"):
        localize_to_folder(model, images[:3], out, threshold=0.4, pictures="overlays")
    other = _model(task="multi")
    with pytest.raises(WeaklocError, match="another model"):
        localize_to_folder(other, images, out, threshold=0.4, pictures="overlays")
    again = localize_to_folder(model, images, out, threshold=0.5, pictures="overlays", restart=True)
    assert (again.resumed, again.computed) == (0, len(images))
    assert json.loads((out / stream.MANIFEST).read_text())["settings"]["threshold"] == 0.5


def test_file_lists_name_images_and_missing_entries_are_counted(folder, tmp_path):
    model = _model()
    listed = tmp_path / "list.txt"
    listed.write_text(f"# some images\n{folder / 'imgs' / 'im001.png'}\n\n../{tmp_path.name}/nowhere.png\n{folder / 'imgs' / 'im002.png'}\n")
    table = tmp_path / "table.csv"
    table.write_text(f"label,path\nx,{folder / 'imgs' / 'im003.png'}\ny,missing.jpg\n")
    with pytest.warns(UserWarning, match="2 image"):
        res = localize_images(model, [listed, table], tmp_path / "out", threshold=0.4, pictures="none")
    assert [Path(im.file_name).name for im in res.images] == ["im001.png", "im002.png", "im003.png"]
    assert [im.id for im in res.images] == [1, 3, 4]  # places in the list: nowhere.png was 2, missing.jpg 5
    assert sorted(Path(s.file).name for s in res.skipped) == ["missing.jpg", "nowhere.png"]
    assert all(im.overlay is None and im.masks is None for im in res.images) and not (tmp_path / "out" / "overlays").exists()
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\n,x\n")
    with pytest.raises(WeaklocError, match=r"bad\.csv, row 2: no image path"):
        localize_images(model, bad, tmp_path / "out2")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9.png\n".encode("latin-1"))
    with pytest.raises(WeaklocError, match=r"latin1\.txt: not a UTF-8 text file"):
        localize_images(model, tmp_path / "latin1.txt", tmp_path / "out3")
    (tmp_path / "empty.txt").write_text("# nothing yet\n\n")
    with pytest.raises(WeaklocError, match=r"empty\.txt: the file list names no image"):
        localize_images(model, tmp_path / "empty.txt", tmp_path / "out4")


def test_torn_last_line_is_cut_and_ordered_merge_skips_duplicates(tmp_path):
    part = tmp_path / "parts" / "part-00000.jsonl"
    part.parent.mkdir()
    part.write_bytes(b'{"id": 2, "file_name": "b", "skipped": "x"}\n{"id": 1, "file_name": "a", "skipped": "y"}\n{"id": 3, "fi')
    stream.repair(part)
    assert part.read_bytes().endswith(b'"y"}\n') and part.read_bytes().count(b"\n") == 2
    writer = stream.PartWriter(part)
    writer.write([stream.skipped_line(1, "a-again", "z"), stream.skipped_line(3, "c", "w")])
    writer.close()
    assert list(stream.done_ids(tmp_path, 4)) == [1, 1, 1, 0]
    assert [(r["id"], r["file_name"]) for r in stream._ordered(tmp_path)] == [(1, "a"), (2, "b"), (3, "c")]


def test_assemble_needs_a_run(tmp_path):
    with pytest.raises(WeaklocError, match="no localization run here"):
        stream.assemble(tmp_path)


def test_decoding_on_the_device_gives_the_cpu_records(tmp_path):
    """``decode="device"`` (nvJPEG on a GPU; libjpeg's batched call here) reads JPEGs as read_image
    does: EXIF rotation, grayscale, the same resize; PNGs and damaged files as before."""
    import io

    from weakloc.localize.run import localize

    folder = tmp_path / "jpegs"
    folder.mkdir()
    g = torch.Generator().manual_seed(3)
    for k, (w, h) in enumerate([(64, 40), (33, 71), (90, 90)]):
        Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()).save(folder / f"c{k}.jpg", quality=85)
    Image.fromarray((torch.rand(30, 50, generator=g) * 255).to(torch.uint8).numpy()).save(folder / "gray.jpg")
    rotated = Image.fromarray((torch.rand(20, 60, 3, generator=g) * 255).to(torch.uint8).numpy())
    exif = rotated.getexif()
    exif[0x0112] = 6  # shown turned by 90 degrees: (H, W) = (60, 20)
    rotated.save(folder / "rot.jpg", exif=exif.tobytes())
    Image.fromarray((torch.rand(30, 30, 3, generator=g) * 255).to(torch.uint8).numpy()).save(folder / "p.png")
    buf = io.BytesIO()
    Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()).save(buf, "JPEG")
    (folder / "torn.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    model = _model()
    with pytest.warns(UserWarning, match="1 image"):
        on_cpu = localize(model, folder, threshold=0.4, batch_size=4, workers=1)
    with pytest.warns(UserWarning, match="1 image"):
        on_device = localize(model, folder, threshold=0.4, batch_size=4, decode="device")
    assert on_device.to_dict() == on_cpu.to_dict()
    rot = next(im for im in on_cpu.images if im.file_name.endswith("rot.jpg"))
    assert (rot.width, rot.height) == (20, 60) and len(on_cpu.images) == 6 and on_cpu.skipped[0].file.endswith("torn.jpg")
