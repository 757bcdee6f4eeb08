"""The web app of ``weakloc serve``: a page and a JSON API (FastAPI, served by uvicorn).

FastAPI because it is what Python model services are built on: request checking, multipart
uploads and an OpenAPI description (``/docs``, ``/openapi.json``) come with it, and uvicorn is its
ordinary ASGI server. The page is three static files shipped in the package (``static/``): no
build step, no CDN, it works offline.

Safe by default: the server listens on 127.0.0.1 (another address is logged as reachable by
others); request bodies over ``max_upload_bytes`` are refused with 413 before they are read;
images go through :func:`weakloc.data.images.read_image` (pixel limit, damaged files) and a bad one
is a 4xx naming it; ``--images DIR`` serves only image files under ``DIR``; every error is one
line of JSON (``{"detail": ...}``), never a stack trace; the page puts names in the document only
as text, under a content security policy that allows no inline script.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import shutil
from collections import OrderedDict
from pathlib import Path, PurePosixPath
from typing import Annotated

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from weakloc.data.images import is_image_file, list_images, read_image
from weakloc.errors import ImageReadError, OptionError, WeaklocError
from weakloc.serve.batching import Job, QueueFull
from weakloc.serve.service import Kept, Service, Settings
from weakloc.text import display_path, escape_text

log = logging.getLogger("weakloc.serve")

STATIC = Path(__file__).resolve().parent / "static"
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
#: the page's content security policy: its own files only, no inline script, no other origin
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_FILES = 16
LISTED_IMAGES_MAX = 5000


class _TooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body over the upload limit of {limit:,} bytes (weakloc serve --max-upload-mb)")


class Guard:
    """ASGI wrapper of the app: request bodies over ``limit`` bytes refused with 413 (at once from
    ``Content-Length``, or as soon as a streamed body passes it: the app's request handling turns
    the :class:`HTTPException` raised while reading into the response); a ``Host`` not in
    ``allowed_hosts`` refused with 400 (a page of another site cannot reach a loopback server
    through a name it controls); the page's security headers on every answer.

    Attributes:
        app: the FastAPI app inside.
    """

    def __init__(self, app, limit: int, allowed_hosts: list[str] | None = None):
        self.app, self.limit, self.allowed_hosts = app, limit, allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.allowed_hosts is not None:
            host = headers.get(b"host", b"").decode("latin-1")
            name = host.split("]")[0] + "]" if host.startswith("[") else host.rsplit(":", 1)[0]
            if name not in self.allowed_hosts:
                return await JSONResponse({"detail": f"host {escape_text(host)!r} is not served here"}, status_code=400)(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            response = JSONResponse({"detail": _TooLarge(self.limit).detail}, status_code=413, headers={"Connection": "close"})
            return await response(scope, receive, send)
        seen = 0
        docs = scope.get("path", "").startswith(("/docs", "/redoc"))

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge(self.limit)
            return message

        async def secured(message):
            if message["type"] == "http.response.start":
                extra = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
                if not docs:  # FastAPI's own docs page loads its script from elsewhere
                    extra.append((b"content-security-policy", CSP.encode()))
                message = message | {"headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, counted, secured)


def upload_name(filename: str | None) -> str:
    """The shown name of an uploaded file: its last path component (a client may send a path), as
    text JSON carries; ``upload`` when it has none."""
    name = re.split(r"[/\\]", filename or "")[-1].strip()
    return escape_text(name, controls=False) or "upload"


def read_error_status(error: ImageReadError) -> int:
    """413 for an image over the pixel limit, 415 for a file that is no image weakloc reads, else 422."""
    reason = getattr(error, "reason", str(error))
    if "over the limit" in reason:
        return 413
    if "not an image of a supported kind" in reason or reason.startswith("cannot identify"):
        return 415
    return 422


def under(root: Path, relative: str) -> Path:
    """The image file ``relative`` names under ``root``; 400 for a path that leaves it (``..``,
    absolute, a link out), 404 for one that is not an image file there."""
    bad = HTTPException(400, f"path {escape_text(relative)!r}: must name an image under the images folder (relative, no '..')")
    if not relative or "\x00" in relative or "\\" in relative or relative.startswith("/") or re.match(r"^[A-Za-z]:", relative):
        raise bad
    if ".." in PurePosixPath(relative).parts:
        raise bad
    base = root.resolve()
    path = (base / relative).resolve()
    if not path.is_relative_to(base):
        raise bad
    if not path.is_file() or not is_image_file(path):
        raise HTTPException(404, f"path {escape_text(relative)!r}: no such image under the images folder")
    return path


# the API's parameters (module level: FastAPI reads the annotations from the module)
Files = Annotated[list[UploadFile], File(description="image files (repeat the field for several)")]
Paths = Annotated[list[str], Form(description="images under --images DIR, by relative path (instead of files)")]
Method = Annotated[str | None, Form(description="heatmap method (GET /api/model lists them with their cost); default: the model's")]
Target = Annotated[str | None, Form(description="predicted | all | topK | a class name or index; default as weakloc localize")]
Threshold = Annotated[str, Form(description="auto (the calibrated one, else 0.3) | a number in [0, 1) | otsu | percentile:Q | calibrated")]
Keep = Annotated[str, Form(description="all regions, the largest per map, or peaks: every region split at its peaks")]
MinArea = Annotated[int, Form(description="drop regions smaller than this many map pixels")]
Maps = Annotated[str, Form(description="none | png | array: each map, normalised, as a grey PNG or uint8 array (base64)")]
Masks = Annotated[str, Form(description="none | rle (COCO RLE at the image's size) | map (RLE at the map's size)")]
ThresholdQ = Annotated[str | None, Query(description="a new threshold (boxes from the kept maps, no model pass); default: its own")]


def _validation_message(error: RequestValidationError) -> str:
    parts = []
    for e in error.errors():
        where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path"))
        parts.append(f"{where}: {e.get('msg', 'invalid')}" if where else str(e.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request"


class _Jobs:
    """The jobs of the job API by id, the newest ``size`` kept."""

    def __init__(self, size: int = 1024):
        self.size = size
        self.items: OrderedDict[str, tuple[Job, dict]] = OrderedDict()

    def add(self, job: Job, options: dict) -> None:
        self.items[job.id] = (job, options)
        while len(self.items) > self.size:
            self.items.popitem(last=False)

    def get(self, key: str) -> tuple[Job, dict]:
        if key not in self.items:
            raise HTTPException(404, "no such job (finished jobs are kept for a while; localize again)")
        return self.items[key]


def create_app(service: Service, *, images: str | Path | None = None, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               max_files: int = DEFAULT_MAX_FILES, allowed_hosts: list[str] | None = None) -> Guard:
    """The ASGI app (a :class:`Guard` around the FastAPI app): the page at ``/``, the API under
    ``/api`` (OpenAPI at ``/docs``).

    Args:
        service: the loaded model's :class:`~weakloc.serve.service.Service`.
        images: a folder whose images the page lists and the API localizes by ``path``; nothing
            outside it is served.
        max_upload_bytes: largest request body.
        max_files: most images in one request.
        allowed_hosts: the ``Host`` names accepted (a page on another site cannot reach a
            loopback server through a name it controls); None: any.
    """
    from weakloc.checks import check_int

    max_upload_bytes = check_int("max_upload_bytes", max_upload_bytes, 1)
    max_files = check_int("max_files", max_files, 1)
    root = Path(images).resolve() if images is not None else None
    if root is not None and not root.is_dir():
        raise WeaklocError(f"--images {display_path(images)}: not a folder")
    app = FastAPI(title="weakloc serve", version="1", docs_url=None,  # /docs below, from packaged files: no CDN
                  description="Heatmaps, boxes, masks and counts of a weakloc model. Results use the COCO-style schema of "
                              "`weakloc localize`'s detections.json.")
    jobs = _Jobs()
    app.state.service = service

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):
        return JSONResponse({"detail": e.detail}, status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        return JSONResponse({"detail": _validation_message(e)}, status_code=422)

    @app.exception_handler(WeaklocError)
    async def _weakloc_error(request: Request, e: WeaklocError):
        return JSONResponse({"detail": escape_text(str(e))}, status_code=read_error_status(e) if isinstance(e, ImageReadError) else 422)

    @app.exception_handler(QueueFull)
    async def _busy(request: Request, e: QueueFull):
        return JSONResponse({"detail": str(e)}, status_code=503, headers={"Retry-After": str(e.retry_after)})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error ({type(e).__name__}); the server log has the details"}, status_code=500)

    # --- the page -------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/docs-static", StaticFiles(directory=swagger_ui_path), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    async def _api_docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} API",
                                   swagger_js_url="/docs-static/swagger-ui-bundle.js", swagger_css_url="/docs-static/swagger-ui.css",
                                   swagger_favicon_url="/docs-static/favicon-32x32.png")

    # --- model and images ---------------------------------------------------------------------

    @app.get("/api/model", summary="The model: classes, task, methods (with their cost), default threshold, limits")
    async def model_info():
        return service.info() | {"images": root is not None,
                                 "limits": {"max_upload_bytes": max_upload_bytes, "max_files": max_files,
                                            "max_queue": service.max_queue, "keep_results": service.keep_results}}

    @app.get("/api/images", summary="The images under --images DIR (relative paths)")
    async def image_list():
        if root is None:
            raise HTTPException(404, "no images folder: start the server with --images DIR")
        try:
            found = await service.call(list_images, root)
        except WeaklocError:
            found = []
        names = [p.relative_to(root).as_posix() for p in found if p.resolve().is_relative_to(root)]
        return {"images": names[:LISTED_IMAGES_MAX], "truncated": len(names) > LISTED_IMAGES_MAX}

    @app.get("/api/images/file", summary="One image file under --images DIR, as stored")
    async def image_file(path: Annotated[str, Query(description="relative path under the images folder")]):
        if root is None:
            raise HTTPException(404, "no images folder: start the server with --images DIR")
        return FileResponse(under(root, path))

    # --- localizing ---------------------------------------------------------------------------

    async def gather(files: list[UploadFile], paths: list[str]) -> tuple[list[tuple[Path, str]], bool]:
        """The request's images as files: uploads saved (and read once, so a bad one is a 4xx
        now), or paths under the images folder."""
        if files and paths:
            raise HTTPException(422, "send either files (uploads) or path (images under --images), not both")
        if not files and not paths:
            raise HTTPException(422, "no image: send files (multipart uploads) or path (images under --images DIR)")
        if len(files) + len(paths) > max_files:
            raise HTTPException(413, f"at most {max_files} images per request, got {len(files) + len(paths)}")
        if paths:
            if root is None:
                raise HTTPException(422, "path: the server has no images folder (start it with --images DIR)")
            items = [(under(root, p), p) for p in paths]
            for path, name in items:
                await _check_image(service, path, name)
            return items, False
        items: list[tuple[Path, str]] = []
        try:
            for f in files:
                name = upload_name(f.filename)
                kind = (f.content_type or "").split(";")[0].strip().lower()
                if kind and not (kind.startswith("image/") or kind == "application/octet-stream"):
                    raise HTTPException(415, f"{escape_text(name)}: content type {escape_text(kind)!r} is not an image")
                dest = service.workdir / f"{secrets.token_hex(8)}{_suffix(name)}"
                items.append((dest, name))
                await service.call(_save, f, dest)
                await _check_image(service, dest, name)
        except BaseException:
            for dest, _ in items:
                dest.unlink(missing_ok=True)
            raise
        return items, True

    async def submit(files, paths, method, target, threshold, keep, min_area, on_finish=None) -> Job:
        settings = service.check(method, target, threshold, keep, min_area)
        items, temporary = await gather(files, paths)
        return service.submit(settings, items, temporary=temporary, on_finish=on_finish)

    def answer(job: Job, maps: str, masks: str) -> dict:
        kept = job.result or []
        errors = [r for r in kept if not isinstance(r, Kept)]
        if errors:
            raise HTTPException(422, escape_text(str(errors[0])))
        return service.document(kept, maps=maps, masks=masks) | {"skipped": []}

    @app.post("/api/localize", summary="Localize uploaded images (or images under --images); waits for the result")
    async def localize(request: Request, files: Files = [], path: Paths = [], method: Method = None, target: Target = None,
                       threshold: Threshold = "auto", keep: Keep = "all", min_area: MinArea = 4, maps: Maps = "none",
                       masks: Masks = "none"):
        _check_formats(maps, masks)
        loop = asyncio.get_running_loop()
        finished = loop.create_future()

        def wake(_job):
            loop.call_soon_threadsafe(lambda: finished.done() or finished.set_result(None))

        job = await submit(files, path, method, target, threshold, keep, min_area, on_finish=wake)
        while not finished.done():
            await asyncio.wait({finished}, timeout=0.25)
            if not finished.done() and await request.is_disconnected():
                service.batcher.cancel(job)  # the client gave up: its images leave the queue
                return Response(status_code=499)
        if job.state == "failed":
            raise job.error if isinstance(job.error, WeaklocError) else RuntimeError(f"localization failed: {job.error!r}")
        return answer(job, maps, masks)

    @app.post("/api/jobs", status_code=202, summary="Queue a localization; poll GET /api/jobs/{id} for progress and the result")
    async def start_job(files: Files = [], path: Paths = [], method: Method = None, target: Target = None, threshold: Threshold = "auto",
                        keep: Keep = "all", min_area: MinArea = 4, maps: Maps = "none", masks: Masks = "none"):
        _check_formats(maps, masks)
        job = await submit(files, path, method, target, threshold, keep, min_area)
        jobs.add(job, {"maps": maps, "masks": masks})
        return job_state(job, {"maps": maps, "masks": masks})

    def job_state(job: Job, options: dict) -> dict:
        out = {"job": job.id, "status": job.state, "done": job.done, "total": len(job.items),
               "position": service.batcher.position(job) if job.state == "queued" else 0}
        if job.state == "done":
            try:
                out["result"] = answer(job, **options)
            except HTTPException as e:
                out |= {"status": "failed", "error": e.detail}
        elif job.state == "failed":
            out["error"] = escape_text(str(job.error)) if isinstance(job.error, WeaklocError) else "localization failed (see the server log)"
            if not isinstance(job.error, WeaklocError):
                log.error("job %s failed: %r", job.id, job.error)
        return out

    @app.get("/api/jobs/{job_id}", summary="A job's progress (status, position in the queue, images done) and, once done, its result")
    async def get_job(job_id: str):
        job, options = jobs.get(job_id)
        return job_state(job, options)

    @app.delete("/api/jobs/{job_id}", summary="Cancel a job (queued: leaves the queue; running: its result is dropped)")
    async def cancel_job(job_id: str):
        job, options = jobs.get(job_id)
        service.batcher.cancel(job)
        return job_state(job, options)

    # --- kept results ---------------------------------------------------------------------------

    def kept_result(result_id: str) -> Kept:
        kept = service.results.get(result_id)
        if kept is None:
            raise HTTPException(404, f"no such result (the last {service.keep_results} images' results are kept; localize again)")
        return kept


    @app.get("/api/results/{result_id}", summary="A localized image at another threshold (from its kept maps: no recomputation)")
    async def result(result_id: str, threshold: ThresholdQ = None, keep: str | None = None, min_area: int | None = None,
                     maps: str = "none", masks: str = "none"):
        kept = kept_result(result_id)
        return await service.call(service.document, [kept], threshold, keep, min_area, maps, masks)

    @app.get("/api/results/{result_id}/coco.json", summary="Download: the result (COCO-style) at a threshold")
    async def result_json(result_id: str, threshold: ThresholdQ = None):
        kept = kept_result(result_id)
        doc = await service.call(service.document, [kept], threshold)
        return JSONResponse(doc | {"skipped": []}, headers={"Content-Disposition": _attachment(kept.name, ".json")})

    @app.get("/api/results/{result_id}/overlay.png", summary="Download: the overlay picture (heatmap, boxes) at a threshold")
    async def result_overlay(result_id: str, threshold: ThresholdQ = None, map: int = 0, opacity: float = 0.5):
        kept = kept_result(result_id)
        data = await service.call(service.overlay_png, kept, map, threshold, opacity)
        return Response(data, media_type="image/png", headers={"Content-Disposition": _attachment(kept.name, ".png")})

    @app.get("/api/results/{result_id}/image.png", summary="The image as shown under the overlay (longest side at most 512)")
    async def result_image(result_id: str):
        from weakloc.serve.service import png_bytes

        kept = kept_result(result_id)
        return Response(await service.call(png_bytes, kept.display), media_type="image/png")

    @app.get("/api/results/{result_id}/maps/{index}.png", summary="One normalised map as a grey PNG (map pixels)")
    async def result_map(result_id: str, index: int):
        from weakloc.serve.service import map_uint8, png_bytes

        kept = kept_result(result_id)
        if not 0 <= index < len(kept.targets):
            raise HTTPException(404, f"map {index}: this result has maps 0..{len(kept.targets) - 1}")
        return Response(png_bytes(map_uint8(kept.maps[index])), media_type="image/png")

    return Guard(app, max_upload_bytes, allowed_hosts)


async def _check_image(service: Service, path: Path, name: str) -> None:
    """Read the image once (the one reader: pixel limit, damage) so a bad one is refused now,
    named by ``name``."""
    try:
        await service.call(read_image, path)
    except ImageReadError as e:
        raise HTTPException(read_error_status(e), f"{escape_text(name)}: {getattr(e, 'reason', str(e))}") from None


def _save(upload: UploadFile, dest: Path) -> None:
    upload.file.seek(0)
    with open(dest, "xb") as out:
        shutil.copyfileobj(upload.file, out, 1 << 20)


def _suffix(name: str) -> str:
    """The name's image suffix, if it has a plain one (kept for the reader's messages), else none."""
    suffix = PurePosixPath(name).suffix.lower()
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,5}", suffix) else ""


def _attachment(name: str, suffix: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", PurePosixPath(name).stem)[:80] or "result"
    return f'attachment; filename="{stem}{suffix}"'


def _check_formats(maps: str, masks: str) -> None:
    from weakloc.checks import check_choice
    from weakloc.serve.service import MAP_FORMATS, MASK_FORMATS

    check_choice("maps", maps, MAP_FORMATS)
    check_choice("masks", masks, MASK_FORMATS)


def bind_warning(host: str) -> str | None:
    """The log line for a server reachable from other machines (None on loopback)."""
    if host in LOOPBACK:
        return None
    return (f"listening on {host}: reachable from other machines, and anyone who can reach it can use the model "
            f"(there is no authentication); use --host 127.0.0.1 to serve this machine only")


def run_server(model, *, images: str | Path | None = None, host: str = "127.0.0.1", port: int = 8000, device=None,
               max_batch: int = 8, window_ms: float = 20.0, queue_size: int = 64, max_upload_mb: float = 20.0,
               max_files: int = DEFAULT_MAX_FILES, keep_results: int = 256, say=print) -> None:
    """Serve ``model`` (a loaded :class:`~weakloc.models.WeaklocNet`) until interrupted."""
    import uvicorn

    from weakloc.checks import check_float, check_int

    check_int("--port", port, 0, 65535)
    check_float("--batch-window-ms", window_ms, 0, 10_000)
    mb = check_float("--max-upload-mb", max_upload_mb, 0, 10_000, low_open=True)
    service = Service(model, device=device, max_batch=max_batch, window=window_ms / 1000, max_queue=queue_size,
                      keep_results=keep_results)
    try:
        app = create_app(service, images=images, max_upload_bytes=int(mb * 1024 * 1024), max_files=max_files,
                         allowed_hosts=list(LOOPBACK) if host in LOOPBACK else None)
        warning = bind_warning(host)
        if warning:
            log.warning(warning)
            say(f"warning: {warning}")
        shown = f"[{host}]" if ":" in host else host
        say(f"weakloc serve: {len(service.classes)} classes, {service.device}; open http://{shown}:{port}/ "
            f"(API: http://{shown}:{port}/docs); Ctrl+C stops")
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        service.close()


class BackgroundServer:
    """``app`` served by uvicorn in a thread of this process (tests, benchmarks, notebooks)::

        with BackgroundServer(create_app(service)) as url:
            ...  # http://127.0.0.1:PORT

    ``port`` 0 picks a free one.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
        self._thread = None
        self.url = None

    def __enter__(self) -> str:
        import threading
        import time

        self._thread = threading.Thread(target=self._server.run, name="weakloc-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        host, port = self._server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self.url

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(10)
