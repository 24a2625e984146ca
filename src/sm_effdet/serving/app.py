"""The HTTP routes SageMaker calls, and `serve`'s main: FastAPI on uvicorn.

GET /ping                  200 (empty body) once the model is loaded and one warm-up prediction
                           ran; 503 before. Never waits on the model.
POST /invocations          images in, detections out (decoding.py, formats.py)
GET /execution-parameters  Batch Transform's defaults
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ..preprocessing import ImageDecodeError
from . import decoding, formats
from .batching import Batcher, model_thread
from .predictor import ModelLoadError, Predictor
from .settings import Settings, SettingsError, read_settings

log = logging.getLogger("sm_effdet.serve")

# uvicorn's own connection limit (503 beyond it) sits above the batcher's image queue.
MAX_CONNECTIONS = 1024
GRACEFUL_SHUTDOWN_S = 25  # SageMaker sends SIGKILL 30 s after SIGTERM


class State:
    settings: Settings
    predictor: Predictor | None = None
    batcher: Batcher | None = None
    server: Any = None
    exit_code = 0


state = State()


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _load_model() -> Predictor:
    predictor = Predictor(state.settings.model_dir, state.settings.backend)
    seconds = predictor.warm_up()
    log.info("loaded %s; warm-up prediction %.2f s", predictor.describe(), seconds)
    return predictor


async def _load_in_background() -> None:
    torch_thread = model_thread()  # the model is loaded and warmed up where it will run
    try:
        predictor = await asyncio.get_running_loop().run_in_executor(torch_thread, _load_model)
    except ModelLoadError as exc:
        torch_thread.shutdown(wait=False)
        log.error("cannot serve: %s", exc)
        state.exit_code = 1
        if state.server is not None:
            state.server.should_exit = True
        return
    batcher = Batcher(
        lambda images, sizes: predictor.rows(images, sizes), state.settings.max_batch_size,
        state.settings.batch_wait_ms, state.settings.max_queue_images, torch_thread,
    )
    batcher.start()
    state.batcher, state.predictor = batcher, predictor


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    loading = asyncio.get_running_loop().create_task(_load_in_background())
    yield
    loading.cancel()
    if state.batcher is not None:
        await state.batcher.stop()


app = FastAPI(title="sm-effdet", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)


@app.middleware("http")
async def log_each_request(request: Request, call_next):
    started = time.perf_counter()
    request.state.images = 0
    response = await call_next(request)
    if request.url.path != "/ping":  # the platform pings every few seconds
        log.info(
            "%s %s status=%d latency_ms=%.1f images=%d", request.method, request.url.path,
            response.status_code, (time.perf_counter() - started) * 1000, request.state.images,
        )
    return response


@app.exception_handler(decoding.ClientError)
async def client_error(request: Request, exc: decoding.ClientError) -> JSONResponse:
    return error(exc.status, exc.message)


@app.exception_handler(Exception)
async def server_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("request failed")
    return error(500, f"the server failed on this request ({type(exc).__name__}); see the endpoint's log.")


@app.get("/ping")
async def ping() -> Response:
    return Response(status_code=200 if state.predictor is not None else 503)


@app.get("/execution-parameters")
async def execution_parameters() -> dict[str, Any]:
    s = state.settings
    return {
        "MaxConcurrentTransforms": s.max_concurrent_transforms,
        "BatchStrategy": "MultiRecord",
        "MaxPayloadInMB": max(1, min(100, int(s.max_payload_mb))),
    }


async def read_body(request: Request) -> bytes:
    """The body, refused as soon as it passes the size limit (before it is all in memory)."""
    limit = int(state.settings.max_payload_mb * 1024 * 1024)
    too_large = decoding.ClientError(
        413, f"the request body is larger than the limit of {state.settings.max_payload_mb:g} MB; "
        "send smaller or fewer images per request (or raise SERVE_MAX_PAYLOAD_MB).",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _prepare_all(predictor: Predictor, blobs: list[bytes]) -> tuple[list[Any], list[Any]]:
    images, sizes = [], []
    for number, blob in enumerate(blobs, 1):
        try:
            image, size = predictor.prepare(blob, state.settings.max_image_pixels)
        except ImageDecodeError as exc:
            which = "the image" if len(blobs) == 1 else f"image {number}"
            hint = " (or raise SERVE_MAX_IMAGE_PIXELS)" if "pixels" in str(exc) else ""
            raise decoding.ClientError(
                400, f"{str(exc).replace('the image', which, 1)}; "
                f"send a JPEG or PNG image{hint}."
            ) from None
        images.append(image)
        sizes.append(size)
    return images, sizes


@app.post("/invocations")
async def invocations(request: Request) -> Response:
    predictor, batcher = state.predictor, state.batcher
    if predictor is None or batcher is None:
        raise decoding.ClientError(503, "the model is still loading; retry when /ping answers 200.")
    kind = formats.choose_format(request.headers.get("accept"), state.settings.response_format)
    header = decoding.custom_attributes(request.headers.get("x-amzn-sagemaker-custom-attributes"))
    body = await read_body(request)
    blobs, options = decoding.decode_body(body, request.headers.get("content-type"), header)
    if len(blobs) > state.settings.max_images_per_request:
        raise decoding.ClientError(
            413, f"the request holds {len(blobs)} images, more than the limit of "
            f"{state.settings.max_images_per_request}; split it (or raise SERVE_MAX_IMAGES_PER_REQUEST).",
        )
    request.state.images = len(blobs)
    images, sizes = await run_in_threadpool(_prepare_all, predictor, blobs)
    rows = await batcher.predict(images, sizes)
    threshold = options.score_threshold if options.score_threshold is not None else state.settings.score_threshold
    limit = options.max_detections or state.settings.max_detections
    per_image = [(size, predictor.records(r, size, threshold, limit)) for r, size in zip(rows, sizes)]
    media = formats.JSONLINES if kind == formats.JSONLINES else "application/json"
    return Response(formats.render(kind, per_image), media_type=media)


def main() -> int:
    import uvicorn

    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        state.settings = read_settings()
    except SettingsError as exc:
        log.error("cannot serve: %s", exc)
        return 1
    config = uvicorn.Config(
        app, host="0.0.0.0", port=state.settings.port, access_log=False, log_level="info",
        limit_concurrency=MAX_CONNECTIONS, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        timeout_keep_alive=75,  # longer than SageMaker's idle connections, as AWS advises
    )
    state.server = uvicorn.Server(config)
    log.info("serving %s on port %d", state.settings.model_dir, state.settings.port)
    # uvicorn drains in-flight requests on SIGTERM, then re-raises the signal it caught: this
    # handler receives that re-raise, so a drained shutdown exits 0, as SageMaker expects.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    state.server.run()
    log.info("stopped")
    return state.exit_code
