"""``weakloc serve``'s JSON API through FastAPI's test client: every endpoint, every bad input
(4xx naming the problem, never a 500), the bounded queue (503 with Retry-After), batching, and
results equal to ``weakloc localize``'s on the same image and settings."""

from __future__ import annotations

import io
import json
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from weakloc.explain import pipeline
from weakloc.serve.app import BackgroundServer, bind_warning, create_app, under
from weakloc.serve.batching import Batcher, Job, QueueFull
from weakloc.serve.service import Service, mask_rle, rle_mask


def _model(classes=("a", "b", "c"), **extra):
    from weakloc.models import ModelConfig, WeaklocNet

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="test_resnet", classes=list(classes), input_size=48, output_stride=8, drop_rate=0.0, **extra)
    return WeaklocNet(cfg, pretrained="none").eval()


def _png(w: int, h: int, seed: int = 0) -> bytes:
    g = np.random.default_rng(seed)
    small = g.integers(0, 256, (max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(small).resize((w, h), Image.BILINEAR).save(buffer, "PNG")
    return buffer.getvalue()


def _bomb_png(w: int = 40000, h: int = 40000) -> bytes:
    """A small PNG whose header claims ``w x h`` pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from weakloc.models import save_model

    return save_model(_model(), tmp_path_factory.mktemp("serve_model") / "model")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve_images")
    (root / "images" / "sub").mkdir(parents=True)
    (root / "images" / "one.png").write_bytes(_png(64, 48, 1))
    (root / "images" / "sub" / "two.png").write_bytes(_png(40, 56, 2))
    (root / "images" / "notes.txt").write_text("not an image")
    (root / "secret.png").write_bytes(_png(32, 32, 3))
    (root / "images" / "link.png").symlink_to(root / "secret.png")
    return root


@pytest.fixture(scope="module")
def served(model_dir, folder):
    from weakloc.models import load_model

    service = Service(load_model(model_dir), max_batch=4, window=0.005, max_queue=32)
    client = TestClient(create_app(service, images=folder / "images", max_upload_bytes=300_000, max_files=3))
    yield service, client
    service.close()


def _upload(client, name="x.png", data=None, kind="image/png", **form):
    return client.post("/api/localize", files={"files": (name, data if data is not None else _png(60, 50), kind)}, data=form)


def _cli_localize(model_dir: Path, image: Path, out: Path, *args: str) -> dict:
    from weakloc.cli import app

    res = CliRunner().invoke(app, ["localize", str(model_dir), str(image), "-o", str(out), *args])
    assert res.exit_code == 0, res.output
    return json.loads((out / "detections.json").read_text())


def _strip(doc: dict) -> dict:
    """The records of a served answer or detections.json without what differs by design: the file
    name (an upload's own name / the path given), the API's extra keys, and picture files."""
    extra = {"file_name", "result", "method", "threshold", "masks_rle", "maps", "masks", "overlay"}
    return {"images": [{k: v for k, v in im.items() if k not in extra} for im in doc["images"]],
            "annotations": doc["annotations"], "categories": doc["categories"]}


# --- the model, the page ---------------------------------------------------------------------------


def test_model_info_lists_every_method_with_its_cost(served):
    _, client = served
    info = client.get("/api/model").json()
    assert info["classes"] == ["a", "b", "c"] and info["counting"] is False and info["test_size"] == 48
    assert info["threshold"] == {"default": 0.3, "calibrated": None} and info["method"] == "cam"
    methods = {m["name"]: m for m in info["methods"]}
    from weakloc.explain import METHODS

    assert set(methods) == set(METHODS)
    assert (methods["cam"]["cost"], methods["gradcam"]["cost"], methods["scorecam"]["cost"]) == ("low", "medium", "high")
    assert methods["attention"]["usable"] is False and "attention head" in methods["attention"]["problem"]
    assert methods["cam"]["usable"] is True and len(info["colormap"]) == 256


def test_the_page_and_its_assets_are_served_from_the_package(served):
    _, client = served
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for asset in ("/static/app.js", "/static/app.css"):
        assert client.get(asset).status_code == 200
    assert "http" not in page.text.replace('xmlns="http://www.w3.org/2000/svg"', "")  # no CDN: nothing from another origin
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/api/localize", "/api/jobs", "/api/results/{result_id}"}
    docs = client.get("/docs")  # the OpenAPI page works offline too: its script and style are packaged
    assert docs.status_code == 200 and "/docs-static/swagger-ui-bundle.js" in docs.text and "cdn" not in docs.text.lower()
    for asset in ("/docs-static/swagger-ui-bundle.js", "/docs-static/swagger-ui.css"):
        assert client.get(asset).status_code == 200


def test_the_page_writes_names_as_text_only():
    """The page's script never turns data into markup (a file or class called <script> stays text);
    tests/test_serve_browser.py checks it in a browser."""
    from weakloc.serve.app import STATIC

    js = (STATIC / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in js, sink
    assert "<script>" not in (STATIC / "index.html").read_text().replace('<script src="/static/app.js" defer></script>', "")


# --- results equal weakloc localize's ------------------------------------------------------------------


@pytest.mark.parametrize("args", [[], ["--method", "gradcam", "--threshold", "0.45"], ["--target", "all", "--keep", "largest"]],
                         ids=["defaults", "gradcam", "all-largest"])
def test_served_result_equals_weakloc_localize(served, model_dir, tmp_path, args):
    service, client = served
    image = tmp_path / "photo.png"
    image.write_bytes(_png(70, 52, 5))
    expected = _cli_localize(model_dir, image, tmp_path / "out", *args)
    form = dict(zip([a.lstrip("-") for a in args[::2]], args[1::2]))
    got = _upload(client, "photo.png", image.read_bytes(), masks="rle", **form)
    assert got.status_code == 200, got.text
    doc = got.json()
    assert _strip(doc) == _strip(expected) and doc["annotations"]  # same boxes, same scores, same probabilities
    assert doc["images"][0]["file_name"] == "photo.png" and doc["skipped"] == []
    # the masks (COCO RLE) are the mask files localize writes
    for name, rle in doc["images"][0]["masks_rle"].items():
        written = np.asarray(Image.open(tmp_path / "out" / expected["images"][0]["masks"][name])) > 127
        assert torch.equal(rle_mask(rle), torch.from_numpy(written))


def test_served_counts_equal_weakloc_localize(tmp_path):
    from weakloc.models import save_model

    model = _model(task="multi", counting="density")
    model_dir = save_model(model, tmp_path / "model")
    image = tmp_path / "cells.png"
    image.write_bytes(_png(64, 64, 7))
    expected = _cli_localize(model_dir, image, tmp_path / "out")
    service = Service(model, max_batch=2, window=0.0)
    try:
        doc = _upload(TestClient(create_app(service)), "cells.png", image.read_bytes(), maps="array").json()
        assert _strip(doc) == _strip(expected) and "counts" in doc["images"][0]
        assert doc["images"][0]["maps"][0]["label"] == "density"
        # counts have no threshold: a new one changes nothing
        rid = doc["images"][0]["result"]
        again = TestClient(create_app(service)).get(f"/api/results/{rid}", params={"threshold": 0.9}).json()
        assert again["annotations"] == doc["annotations"]
    finally:
        service.close()


@pytest.mark.parametrize("threshold", ["0.1", "0.55", "otsu", "percentile:80"])
def test_a_new_threshold_gives_localize_boxes_without_a_model_pass(served, model_dir, tmp_path, monkeypatch, threshold):
    _, client = served
    image = tmp_path / "photo.png"
    image.write_bytes(_png(80, 60, 9))
    rid = _upload(client, "photo.png", image.read_bytes()).json()["images"][0]["result"]
    expected = _cli_localize(model_dir, image, tmp_path / "out", "--threshold", threshold)
    calls = []
    monkeypatch.setattr(pipeline, "make_maps", lambda *a, **k: calls.append(1))
    got = client.get(f"/api/results/{rid}", params={"threshold": threshold, "masks": "rle"})
    assert got.status_code == 200 and not calls  # from the kept maps
    assert _strip(got.json()) == _strip(expected)
    for name, rle in got.json()["images"][0]["masks_rle"].items():
        written = np.asarray(Image.open(tmp_path / "out" / expected["images"][0]["masks"][name])) > 127
        assert torch.equal(rle_mask(rle), torch.from_numpy(written))


def test_result_downloads_and_maps(served):
    service, client = served
    doc = _upload(client, maps="array").json()
    rid = doc["images"][0]["result"]
    entry = doc["images"][0]["maps"][0]
    values = np.frombuffer(__import__("base64").b64decode(entry["data"]), np.uint8).reshape(entry["shape"])
    kept = service.results.get(rid)
    assert entry["shape"] == [48, 48] and np.array_equal(values, (kept.maps[0].clamp(0, 1) * 255).round().byte().numpy())
    grey = np.asarray(Image.open(io.BytesIO(client.get(f"/api/results/{rid}/maps/0.png").content)))
    assert np.array_equal(grey, values)
    png = client.get(f"/api/results/{rid}/overlay.png", params={"threshold": 0.5, "opacity": 0.7})
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG") and "attachment" in png.headers["content-disposition"]
    coco = client.get(f"/api/results/{rid}/coco.json", params={"threshold": 0.5}).json()
    assert coco == client.get(f"/api/results/{rid}", params={"threshold": 0.5}).json() | {"skipped": []}
    picture = Image.open(io.BytesIO(client.get(f"/api/results/{rid}/image.png").content))
    assert picture.size == tuple(kept.display.shape[-1:-3:-1])
    assert client.get("/api/results/nope").status_code == 404
    assert client.get(f"/api/results/{rid}/maps/9.png").status_code == 404
    assert client.get(f"/api/results/{rid}/overlay.png", params={"map": 5}).status_code == 422


def test_rle_round_trip():
    g = torch.Generator().manual_seed(0)
    for shape in [(5, 7), (1, 1), (16, 3)]:
        mask = torch.rand(shape, generator=g) > 0.5
        rle = mask_rle(mask)
        assert sum(rle["counts"]) == mask.numel() and torch.equal(rle_mask(rle), mask)
    assert mask_rle(torch.tensor([[True, False], [True, True]]))["counts"] == [0, 2, 1, 1]  # column-major, zeros first


# --- the job API: progress, cancel, batching, the bounded queue -------------------------------------


class _Gate:
    """``pipeline.make_maps`` held until released; records each call's batch size."""

    def __init__(self, monkeypatch):
        self.open, self.entered, self.sizes = threading.Event(), threading.Event(), []
        real = pipeline.make_maps

        def held(model, images, *a, **k):
            self.sizes.append(len(images))
            self.entered.set()
            assert self.open.wait(30)
            return real(model, images, *a, **k)

        monkeypatch.setattr(pipeline, "make_maps", held)


def _wait(client, job_id, states=("done", "failed", "cancelled"), timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = client.get(f"/api/jobs/{job_id}").json()
        if state["status"] in states:
            return state
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} still {state}")


def test_full_queue_answers_503_with_retry_after(monkeypatch):
    gate = _Gate(monkeypatch)
    service = Service(_model(), max_batch=1, window=0.0, max_queue=1)
    client = TestClient(create_app(service))
    try:
        first = client.post("/api/jobs", files={"files": ("1.png", _png(40, 40), "image/png")}).json()
        assert gate.entered.wait(30)  # running, held
        second = client.post("/api/jobs", files={"files": ("2.png", _png(40, 40), "image/png")})
        assert second.status_code == 202 and second.json()["status"] == "queued" and second.json()["position"] == 0
        third = client.post("/api/jobs", files={"files": ("3.png", _png(40, 40), "image/png")})
        assert third.status_code == 503 and int(third.headers["retry-after"]) >= 1 and "busy" in third.json()["detail"]
        sync = _upload(client)
        assert sync.status_code == 503 and "retry-after" in sync.headers
        assert len(list(service.workdir.iterdir())) == 2  # the refused uploads are not kept
        gate.open.set()
        assert _wait(client, first["job"])["status"] == "done"
        done = _wait(client, second.json()["job"])
        assert done["status"] == "done" and done["done"] == done["total"] == 1 and done["result"]["images"][0]["file_name"] == "2.png"
        assert _upload(client).status_code == 200  # room again
        assert list(service.workdir.iterdir()) == []  # uploads removed once done
    finally:
        gate.open.set()
        service.close()


def test_cancel_a_queued_and_a_running_job(monkeypatch):
    gate = _Gate(monkeypatch)
    service = Service(_model(), max_batch=1, window=0.0, max_queue=4)
    client = TestClient(create_app(service))
    try:
        running = client.post("/api/jobs", files={"files": ("1.png", _png(40, 40), "image/png")}).json()["job"]
        assert gate.entered.wait(30)
        queued = client.post("/api/jobs", files={"files": ("2.png", _png(40, 40), "image/png")}).json()["job"]
        assert client.delete(f"/api/jobs/{queued}").json()["status"] == "cancelled"
        assert service.batcher.stats()["queued"] == 0
        client.delete(f"/api/jobs/{running}")
        gate.open.set()
        state = _wait(client, running)
        assert state["status"] == "cancelled" and "result" not in state
        assert len(gate.sizes) == 1  # the cancelled queued job never ran
        assert client.get("/api/jobs/unknown").status_code == 404
    finally:
        gate.open.set()
        service.close()


def test_concurrent_requests_share_a_device_batch(monkeypatch, tmp_path):
    sizes = []
    real = pipeline.make_maps
    monkeypatch.setattr(pipeline, "make_maps", lambda model, images, *a, **k: sizes.append(len(images)) or real(model, images, *a, **k))
    service = Service(_model(), max_batch=4, window=1.0, max_queue=8)
    try:
        with BackgroundServer(create_app(service)) as url:
            import httpx

            images = [_png(50 + 4 * i, 40, 20 + i) for i in range(3)]
            answers = [None] * 3

            def send(i):
                answers[i] = httpx.post(f"{url}/api/localize", files={"files": (f"{i}.png", images[i], "image/png")}, timeout=60)

            threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert sizes == [3]  # one batch on the device for the three requests
        # each answer is its own image's, numbered as a run of that image alone
        for i, a in enumerate(answers):
            doc = a.json()
            assert doc["images"][0]["file_name"] == f"{i}.png" and doc["images"][0]["id"] == 1
            assert all(box["image_id"] == 1 for box in doc["annotations"])
            alone = tmp_path / f"{i}.png"
            alone.write_bytes(images[i])
            from weakloc.localize import localize

            ref = localize(service.model, alone).to_dict()
            assert [im["width"] for im in ref["images"]] == [doc["images"][0]["width"]]
            assert [b["bbox"] for b in ref["annotations"]] == [b["bbox"] for b in doc["annotations"]]
            assert np.allclose([b["score"] for b in ref["annotations"]], [b["score"] for b in doc["annotations"]], atol=2e-4)
    finally:
        service.close()


def test_batcher_groups_by_key_and_keeps_order():
    ran = []
    batcher = Batcher(lambda jobs: ran.append([(j.key, len(j.items)) for j in jobs]), max_queue=10, window=0.2, max_batch=3)
    try:
        jobs = [batcher.submit(Job(key=k, items=[0] * n)) for k, n in [("a", 1), ("b", 1), ("a", 2), ("a", 1)]]
        for j in jobs:
            assert j.wait(10) and j.state == "done"
        assert ran[0] == [("a", 1), ("a", 2)] and ran[1:] == [[("b", 1)], [("a", 1)]]
        with pytest.raises(QueueFull):
            batcher.submit(Job(key="a", items=[0] * 11))
    finally:
        batcher.close()


# --- bad input: a 4xx naming the problem, never a 500 ---------------------------------------------


def _truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()[:400]


@pytest.mark.parametrize("name, data, kind, status, words", [
    ("notes.png", b"hello, not an image", "image/png", 415, ["notes.png", "not an image"]),
    ("cut.png", _png(60, 50)[:200], "image/png", 422, ["cut.png", "truncated"]),
    ("cut.jpg", _truncated_jpeg(), "image/jpeg", 422, ["cut.jpg", "JPEG"]),
    ("doc.png", _png(60, 50), "text/plain", 415, ["doc.png", "text/plain", "not an image"]),
    ("bomb.png", _bomb_png(), "image/png", 413, ["bomb.png", "over the limit"]),
    ("empty.png", b"", "image/png", 422, ["empty.png"]),
    ("big.png", b"\x89PNG" + b"\0" * 400_000, "image/png", 413, ["upload limit"]),
], ids=["not-an-image", "truncated-png", "truncated-jpeg", "content-type", "pixel-bomb", "empty", "too-large"])
def test_bad_uploads_get_a_clear_4xx(served, name, data, kind, status, words):
    service, client = served
    r = _upload(client, name, data, kind)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail
    for w in words:
        assert w in detail, detail
    assert str(service.workdir) not in detail  # named by the upload's name, not the server's copy
    assert list(service.workdir.iterdir()) == []


def test_a_streamed_body_over_the_limit_is_refused(served):
    _, client = served

    def body():
        for _ in range(100):
            yield b"x" * 10_000

    r = client.post("/api/localize", content=body(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and "upload limit" in r.json()["detail"]


@pytest.mark.parametrize("form, words", [
    ({"threshold": "1.5"}, ["threshold"]), ({"threshold": "nan"}, ["threshold"]), ({"threshold": "calibrated"}, ["calibrated"]),
    ({"method": "nope"}, ["method", "nope"]), ({"method": "attention"}, ["attention head"]), ({"target": "zebra"}, ["target"]),
    ({"keep": "some"}, ["keep"]), ({"min_area": "-1"}, ["min_area"]), ({"min_area": "x"}, ["min_area"]),
    ({"maps": "jpeg"}, ["maps"]), ({"masks": "svg"}, ["masks"]),
])
def test_bad_settings_get_422_naming_the_field(served, form, words):
    _, client = served
    r = _upload(client, **form)
    assert r.status_code == 422, r.text
    for w in words:
        assert w in r.json()["detail"]


def test_bad_requests_get_a_4xx(served):
    service, client = served
    assert client.post("/api/localize").status_code == 422
    assert "no image" in client.post("/api/localize", data={"method": "cam"}).json()["detail"]
    many = [("files", (f"{i}.png", _png(20, 20), "image/png")) for i in range(4)]
    r = client.post("/api/localize", files=many)
    assert r.status_code == 413 and "at most 3 images" in r.json()["detail"]
    assert client.post("/api/localize", json={"files": []}).status_code == 422
    assert client.get(f"/api/results/{'x' * 5}", params={"threshold": "2"}).status_code == 404
    rid = _upload(client).json()["images"][0]["result"]
    assert client.get(f"/api/results/{rid}", params={"threshold": "2"}).status_code == 422
    assert client.get(f"/api/results/{rid}/overlay.png", params={"opacity": "3"}).status_code == 422
    assert client.get(f"/api/results/{rid}", params={"min_area": "many"}).status_code == 422


# --- --images DIR: only files under it ----------------------------------------------------------------


def test_images_folder_lists_and_localizes_by_path(served, folder):
    _, client = served
    listed = client.get("/api/images").json()
    assert listed == {"images": ["one.png", "sub/two.png"], "truncated": False}  # the link out is not listed
    doc = client.post("/api/localize", data={"path": "sub/two.png"}).json()
    assert doc["images"][0]["file_name"] == "sub/two.png" and (doc["images"][0]["width"], doc["images"][0]["height"]) == (40, 56)
    assert client.get("/api/images/file", params={"path": "one.png"}).content == (folder / "images" / "one.png").read_bytes()
    assert (folder / "images" / "one.png").exists()  # a folder's images are never removed


@pytest.mark.parametrize("path, status", [
    ("../secret.png", 400), ("sub/../../secret.png", 400), ("/etc/passwd", 400), ("..", 400), ("link.png", 400),
    ("C:/x.png", 400), ("sub\\..\\..\\secret.png", 400), ("missing.png", 404), ("notes.txt", 404), ("sub", 404), ("", 400),
])
def test_paths_outside_the_images_folder_are_refused(served, folder, path, status):
    _, client = served
    for r in (client.get("/api/images/file", params={"path": path}), client.post("/api/localize", data={"path": path})):
        assert r.status_code in ((422, status) if path == "" else (status,)), (path, r.status_code, r.text)
        assert "secret" not in r.text or "path" in r.json()["detail"]
    encoded = client.get("/api/images/file?path=%2e%2e%2fsecret.png")
    assert encoded.status_code == 400


def test_under_resolves_inside_only(folder):
    root = folder / "images"
    assert under(root, "sub/two.png") == (root / "sub" / "two.png").resolve()
    with pytest.raises(Exception) as e:
        under(root, "link.png")
    assert e.value.status_code == 400


def test_no_images_folder(model_dir):
    from weakloc.models import load_model

    service = Service(load_model(model_dir), window=0.0)
    try:
        client = TestClient(create_app(service))
        assert client.get("/api/images").status_code == 404
        assert "no images folder" in client.post("/api/localize", data={"path": "a.png"}).json()["detail"]
    finally:
        service.close()


# --- names are data, never markup ---------------------------------------------------------------------


def test_names_come_back_as_they_were_given(tmp_path):
    service = Service(_model(classes=("<script>alert(1)</script>", "b&amp;", "c")), window=0.0)
    try:
        client = TestClient(create_app(service))
        info = client.get("/api/model").json()
        assert info["classes"][0] == "<script>alert(1)</script>"
        doc = _upload(client, "../../<img src=x onerror=alert(1)>.png", target="all").json()
        assert doc["images"][0]["file_name"] == "<img src=x onerror=alert(1)>.png"  # the last component only, as given
        assert {a["label"] for a in doc["annotations"]} <= {"<script>alert(1)</script>", "b&amp;", "c"}
        assert client.get("/").headers["x-content-type-options"] == "nosniff"
    finally:
        service.close()


# --- binding, hosts, the command ----------------------------------------------------------------------


def test_loopback_by_default_and_another_address_is_logged(model_dir, monkeypatch):
    import uvicorn

    from weakloc.cli import app

    assert bind_warning("127.0.0.1") is None and bind_warning("localhost") is None
    assert "reachable from other machines" in bind_warning("0.0.0.0")
    runs = []
    monkeypatch.setattr(uvicorn, "run", lambda asgi, host, port, **k: runs.append((asgi, host, port)))
    res = CliRunner().invoke(app, ["serve", str(model_dir), "--port", "8123"])
    assert res.exit_code == 0, res.output
    assert runs[-1][1:] == ("127.0.0.1", 8123) and "http://127.0.0.1:8123/" in res.output and "warning" not in res.output
    assert runs[-1][0].allowed_hosts is not None  # loopback: other Host names refused
    res = CliRunner().invoke(app, ["serve", str(model_dir), "--host", "0.0.0.0"])
    assert res.exit_code == 0 and runs[-1][1] == "0.0.0.0" and "reachable from other machines" in res.output
    assert runs[-1][0].allowed_hosts is None
    res = CliRunner().invoke(app, ["serve", str(model_dir), "--images", str(model_dir / "nope")])
    assert res.exit_code != 0 and "--images" in str(res.exception) and "not a folder" in str(res.exception)


def test_a_foreign_host_name_is_refused(model_dir):
    from weakloc.models import load_model

    service = Service(load_model(model_dir), window=0.0)
    try:
        client = TestClient(create_app(service, allowed_hosts=["127.0.0.1", "localhost"]), base_url="http://127.0.0.1:8000")
        assert client.get("/api/model").status_code == 200
        assert client.get("/api/model", headers={"host": "evil.example:8000"}).status_code == 400
    finally:
        service.close()


def test_an_unexpected_error_is_a_500_without_a_stack_trace(served, monkeypatch):
    service, _ = served
    client = TestClient(create_app(service), raise_server_exceptions=False)
    monkeypatch.setattr(Service, "info", lambda self: 1 / 0)
    r = client.get("/api/model")
    assert r.status_code == 500 and r.json() == {"detail": "internal error (ZeroDivisionError); the server log has the details"}


def test_demo_says_how_to_open_its_model():
    text = (Path(__file__).resolve().parents[1] / "src" / "weakloc" / "demo.py").read_text()
    assert "weakloc serve" in text


def test_results_store_is_bounded(model_dir):
    from weakloc.models import load_model

    service = Service(load_model(model_dir), window=0.0, keep_results=2)
    try:
        client = TestClient(create_app(service))
        ids = [_upload(client, f"{i}.png", _png(30, 30, i)).json()["images"][0]["result"] for i in range(3)]
        assert len(service.results) == 2 and client.get(f"/api/results/{ids[0]}").status_code == 404
        assert client.get(f"/api/results/{ids[2]}").status_code == 200
    finally:
        service.close()
