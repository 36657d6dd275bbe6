"""The HTTP API (FastAPI): the OpenAI Videos API over the job store and the worker.

    app = create_app(store, worker, settings, keys, defaults, metrics, on_start, on_stop)

Routes (all but ``/health`` need ``Authorization: Bearer KEY`` unless ``serve.auth=none``):

- ``POST /v1/videos`` (multipart): queue a job; answers at once with the video object, ``queued``.
- ``GET /v1/videos/{id}``: the video object: ``status`` (queued, in_progress, completed, failed,
  cancelled), ``progress`` (percent of the denoising steps done), and BindWeave's extras
  (``phase``, ``queue_position``, ``timings``, ``seed``, ...).
- ``GET /v1/videos/{id}/content``: the MP4; ``?variant=thumbnail``: a JPEG of its middle frame.
- ``DELETE /v1/videos/{id}``: cancel (a running job at its next step) and delete its files; a job
  that had not finished stays listed as ``cancelled`` (so a poller learns it), a finished one goes.
- ``GET /v1/videos`` (``limit``, ``after``, ``order``), ``GET /v1/models``, ``GET /health`` (ready, loading, broken),
  ``GET /metrics`` (Prometheus text).

The objects have the fields the ``openai`` client's ``Video``, ``VideoDeleteResponse`` and
``SyncConversationCursorPage`` read; errors have the OpenAI shape (bindweave/serve/errors.py).
Handlers that touch the disk or the table are plain functions: FastAPI runs them in its thread
pool, so the event loop never waits on them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from bindweave.io.inputs import MAX_REFERENCES
from bindweave.serve.auth import check_bearer
from bindweave.serve.errors import ApiError
from bindweave.serve.job_request import IMAGE_FIELD, TEXT_FIELDS, JobDefaults, VideoRequest, accept_job, \
    parse_video_request
from bindweave.serve.metrics import Metrics
from bindweave.serve.settings import ServeSettings
from bindweave.serve.store import JobRecord, JobStore, valid_job_id
from bindweave.serve.worker import Worker

MAX_TEXT_FIELD_BYTES = 64 * 1024
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
MAX_LIST_LIMIT = 100
SHUTDOWN_WAIT_S = 60.0  # for the running job's current step; after it the job is handled as interrupted


def create_app(store: JobStore, worker: Worker, settings: ServeSettings, keys: tuple[bytes, ...] | None,
               defaults: JobDefaults, metrics: Metrics, on_start: Callable[[], None],
               on_stop: Callable[[], None]) -> FastAPI:
    """``on_start``: called as the server starts answering (it begins building the engine, then
    starts the worker); ``on_stop``: after the worker has stopped."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        on_start()
        yield
        await run_in_threadpool(worker.stop, settings.drain_timeout_s if settings.drain == "finish" else 0,
                                SHUTDOWN_WAIT_S)
        await run_in_threadpool(on_stop)

    app = FastAPI(title="BindWeave", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        try:
            if request.url.path != "/health":
                check_bearer(request.headers.get("authorization"), keys)
        except ApiError as error:
            return error_response(error)
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):  # no route, wrong method
        message = f"no route {request.method} {request.url.path}" if error.status_code in (404, 405) else error.detail
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "invalid_request")
        return error_response(ApiError(error.status_code, str(message), code=code))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        problem = error.errors()[0]
        field = str(problem["loc"][-1])
        return error_response(ApiError(400, f"{field}: {problem['msg']}", param=field))

    @app.post("/v1/videos")
    async def create_video(request: Request):
        form = await read_form(request, settings)
        try:
            fields, uploads = split_form(form)
            video_request = parse_video_request(fields, len(uploads), defaults, settings)
            images = [await read_upload(upload, index, settings.max_upload_bytes)
                      for index, upload in enumerate(uploads)]
        finally:
            await form.close()  # the spooled upload files
        job_id = await run_in_threadpool(accept_job, store, settings, video_request, images)
        worker.wake()
        return video_object(store.get(job_id), store, settings.model_name)

    @app.get("/v1/videos")
    def list_videos(limit: int = 20, after: str | None = None, order: str = "desc"):
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise ApiError(400, f"limit={limit} must be 1 to {MAX_LIST_LIMIT}", param="limit")
        if order not in ("asc", "desc"):
            raise ApiError(400, f"order={order!r} must be asc or desc", param="order")
        cursor = find(store, after, param="after") if after is not None else None
        records, more = store.page(limit, cursor, newest_first=order == "desc")
        data = [video_object(record, store, settings.model_name) for record in records]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": more}

    @app.get("/v1/videos/{video_id}")
    def retrieve_video(video_id: str):
        return JSONResponse(video_object(find(store, video_id), store, settings.model_name),
                            headers={"openai-poll-after-ms": str(settings.poll_after_ms)})

    @app.get("/v1/videos/{video_id}/content")
    def video_content(video_id: str, variant: str = "video"):
        record = find(store, video_id)
        if variant not in ("video", "thumbnail"):
            raise ApiError(400, f"variant={variant!r}: this server has video and thumbnail", param="variant")
        if record.status != "completed":
            raise ApiError(409, f"{video_id} is {record.status}: its content exists once it is completed",
                           code="video_not_ready")
        files = store.files(video_id)
        if variant == "thumbnail":
            return FileResponse(files.thumbnail, media_type="image/jpeg", filename=f"{video_id}.jpg")
        return FileResponse(files.video, media_type="video/mp4", filename=f"{video_id}.mp4")

    @app.delete("/v1/videos/{video_id}")
    def delete_video(video_id: str):
        find(store, video_id)
        if worker.cancel(video_id) not in ("queued", "in_progress"):  # finished: the record goes too
            store.files(video_id).remove()
            store.delete(video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    @app.get("/v1/models")
    def list_models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "bindweave"}]}

    @app.get("/health")
    def health():
        """ready (200), loading (503: the engine is being built; submissions are queued) or broken (503)."""
        state, reason = worker.state, worker.broken
        if state == "ready" and not store.reachable():
            state, reason = "broken", f"the job table ({store.database.where}) does not answer"
        elif state == "broken" and reason is None:
            reason = "the worker thread has stopped: see the server log"
        body = {"status": state, **({"reason": reason} if reason else {}), "replica": store.replica_id}
        return JSONResponse(body, status_code=200 if state == "ready" else 503)

    @app.get("/metrics")
    def prometheus_metrics():
        return PlainTextResponse(metrics.render(store.counts(), int(worker.running is not None)),
                                 media_type="text/plain; version=0.0.4")

    return app


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def find(store: JobStore, video_id: str, param: str | None = None) -> JobRecord:
    """The record of an id from a request; a malformed id is refused before any lookup."""
    if not valid_job_id(video_id):
        raise ApiError(400 if param else 404, f"{video_id!r} is not a video id (video_ followed by 32 hex digits)",
                       param=param, code="invalid_id" if param else "not_found")
    record = store.get(video_id)
    if record is None:
        raise ApiError(400 if param else 404, f"no video {video_id}", param=param, code="not_found")
    return record


async def read_form(request: Request, settings: ServeSettings):
    """The multipart form, its size bounded before it is read: a declared length within the limit
    (a body without one is refused), at most MAX_REFERENCES files and the known fields."""
    # A form without files arrives url-encoded: it is read too, so that the missing image is what gets named.
    if request.headers.get("content-type", "").split(";")[0].strip().lower() not in FORM_TYPES:
        raise ApiError(415, f"send multipart/form-data: prompt, {IMAGE_FIELD} (1 to {MAX_REFERENCES} image files), "
                            "optional size, seconds or num_frames, steps, guidance, seed, speed",
                       code="unsupported_media_type")
    limit = MAX_REFERENCES * settings.max_upload_bytes + len(TEXT_FIELDS) * MAX_TEXT_FIELD_BYTES
    declared = request.headers.get("content-length")
    if declared is None or not declared.isdigit():
        raise ApiError(411, "the request has no Content-Length: send the body with its length", code="length_required")
    if int(declared) > limit:
        raise ApiError(413, f"the request is {int(declared):,} bytes; the limit is {limit:,} "
                            f"({MAX_REFERENCES} images of serve.max_upload_bytes={settings.max_upload_bytes:,})",
                       code="request_too_large")
    try:
        return await request.form(max_files=MAX_REFERENCES, max_fields=len(TEXT_FIELDS) * 2,
                                  max_part_size=MAX_TEXT_FIELD_BYTES)
    except HTTPException as error:  # starlette's multipart limits and parse errors
        field = IMAGE_FIELD if "files" in str(error.detail) else None
        hint = f": {IMAGE_FIELD} takes 1 to {MAX_REFERENCES} images" if field else ""
        raise ApiError(400, f"bad multipart body ({error.detail}){hint}", param=field) from None


async def read_upload(upload: UploadFile, index: int, max_bytes: int) -> bytes:
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        field = f"{IMAGE_FIELD}[{index}]"
        raise ApiError(413, f"{field} is over {max_bytes:,} bytes (serve.max_upload_bytes)", param=field,
                       code="file_too_large")
    return data


def split_form(form) -> tuple[dict[str, str], list[UploadFile]]:
    """The text fields (each once) and the uploaded references, in order."""
    fields, uploads = {}, []
    for name, value in form.multi_items():
        if name == IMAGE_FIELD:
            if not isinstance(value, UploadFile):
                raise ApiError(400, f"{IMAGE_FIELD} must be an uploaded image file (file_id and image_url references "
                                    "are not supported)", param=IMAGE_FIELD)
            uploads.append(value)
        elif isinstance(value, UploadFile):
            raise ApiError(400, f"{name} must be a text field, not a file", param=name)
        elif name in fields:
            raise ApiError(400, f"{name} is given twice", param=name)
        else:
            fields[name] = value
    return fields, uploads


def video_object(record: JobRecord, store: JobStore, model_name: str) -> dict:
    """The OpenAI video object of a record, with BindWeave's extras."""
    request = VideoRequest(**record.request)
    now = time.time()
    error = {"code": record.error_code, "message": record.error_message} if record.status in ("failed", "cancelled") \
        else None
    return {
        "id": record.id, "object": "video", "model": model_name, "status": record.status,
        "progress": int(record.progress), "created_at": int(record.created_at),
        "completed_at": int(record.finished_at) if record.status == "completed" else None, "expires_at": None,
        "prompt": request.prompt, "size": request.size, "seconds": request.seconds, "error": error,
        "remixed_from_video_id": None,
        # BindWeave's own
        "phase": record.phase, "step": record.step, "num_steps": request.steps,
        "queue_position": store.queue_position(record), "attempts": record.attempts, "replica": record.worker,
        "num_frames": request.num_frames, "seed": request.seed, "guidance": request.guidance,
        "speed": request.speed, "references": request.references,
        "started_at": record.started_at, "finished_at": record.finished_at,
        "timings": {  # seconds waiting in the queue, and running (so far)
            "queued_s": round((record.started_at or record.finished_at or now) - record.created_at, 3),
            "running_s": round((record.finished_at or now) - record.started_at, 3) if record.started_at else None,
        },
    }
