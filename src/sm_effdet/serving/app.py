"""The HTTP routes SageMaker calls, and `serve`'s main: FastAPI on uvicorn.

GET /ping                  200 (empty body) once the model is loaded and one warm-up prediction
                           ran; 503 before. Never waits on the model.
POST /invocations          images in, detections out (decoding.py, formats.py)
GET /execution-parameters  Batch Transform's defaults
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import signal
import sys
import time
from typing import Any

import h11
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..model.preprocessing import ImageDecodeError
from . import decoding, formats
from .batching import Batcher, model_thread
from .predictor import ModelLoadError, Predictor
from .settings import Settings, SettingsError, read_settings

log = logging.getLogger("sm_effdet.serve")

KEEP_ALIVE_S = 75  # longer than SageMaker's idle connections, as AWS advises
ROUTES = "GET /ping, POST /invocations and GET /execution-parameters"


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
    s = state.settings
    predictor = Predictor(s.model_dir, s.backend, s.max_decode_pixels)
    seconds = predictor.warm_up()
    log.info("loaded %s; warm-up prediction %.2f s", predictor.describe(), seconds)
    return predictor


def _cannot_serve(exc: Exception) -> str:
    if isinstance(exc, ModelLoadError):
        return str(exc)
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return (
        f"loading or warming up the model in {state.settings.model_dir} failed ({type(exc).__name__}: "
        f"{first}); use the unchanged contents of a training job's model.tar.gz."
    )


async def _load_in_background() -> None:
    """Load and warm up; any failure ends the process non-zero with one sentence, as a server
    that stays "loading" forever is one SageMaker can neither use nor diagnose."""
    torch_thread = model_thread()  # the model is loaded and warmed up where it will run
    try:
        predictor = await asyncio.get_running_loop().run_in_executor(torch_thread, _load_model)
    except Exception as exc:  # noqa: BLE001  (whatever it is, the process must end, saying so)
        torch_thread.shutdown(wait=False)
        log.error("cannot serve: %s", _cannot_serve(exc))
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


@app.exception_handler(decoding.ClientError)
async def client_error(request: Request, exc: decoding.ClientError) -> JSONResponse:
    response = error(exc.status, exc.message)
    if exc.status == 408:  # the rest of the body may still come: the connection cannot be reused
        response.headers["connection"] = "close"
    return response


@app.exception_handler(HTTPException)
async def no_such_route(request: Request, exc: HTTPException) -> JSONResponse:
    path = request.url.path[:80]
    if exc.status_code == 404:
        return error(404, f"there is no {path} on this server; it answers {ROUTES}.")
    if exc.status_code == 405:
        return error(405, f"{request.method} is not allowed on {path}; this server answers {ROUTES}.")
    return error(exc.status_code, f"the request failed ({exc.status_code}: {str(exc.detail)[:80]}).")


@app.exception_handler(Exception)
async def server_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("request failed")
    return error(500, f"the server failed on this request ({type(exc).__name__}); see the endpoint's log.")


@app.get("/ping")
async def ping() -> Response:
    return Response(status_code=200 if state.predictor is not None else 503)


@app.get("/execution-parameters")
async def execution_parameters() -> dict[str, Any]:
    return batch_transform_parameters(state.settings)


def batch_transform_parameters(s: Settings) -> dict[str, Any]:
    """What Batch Transform asks for when a job leaves them out. SageMaker refuses a job whose
    MaxConcurrentTransforms x MaxPayloadInMB exceeds 100 MB, so the payload offered shrinks with
    the concurrency (8 transforms: 12 MB each), never beyond what this server accepts."""
    concurrent = min(s.max_concurrent_transforms, 100)
    return {
        "MaxConcurrentTransforms": concurrent,
        "BatchStrategy": "MultiRecord",
        "MaxPayloadInMB": max(1, min(100 // concurrent, int(s.max_payload_mb))),
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


class Guard:
    """The ASGI app uvicorn runs: FastAPI inside a bound on the time to read a request's body,
    and a JSON answer in the contract's shape for requests still running when the drain window
    after SIGTERM ends (uvicorn cancels them and would answer plain text)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.in_flight = 0  # requests other than /ping being read or answered

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        begun = time.perf_counter()
        status = 0
        started = body_done = False
        deadline = time.monotonic() + state.settings.body_timeout_s

        async def timed_receive() -> dict:
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
                body_done = not message.get("more_body", False)
                return message
            except TimeoutError:
                raise decoding.ClientError(
                    408, f"the request body did not arrive within {state.settings.body_timeout_s:g} s "
                    "(SERVE_BODY_TIMEOUT_S); send it at once, or raise the limit.",
                ) from None

        async def tracked_send(message: dict) -> None:
            nonlocal started, status
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
            await send(message)

        scope.setdefault("state", {})["images"] = 0  # request.state.images, set by the route
        pinged = scope["path"] == "/ping"
        try:
            if not pinged and self.in_flight >= state.settings.max_connections:
                # uvicorn's own limit (limit_concurrency) counted idle connections and /ping too.
                status = 503
                await _send_json(send, 503, f"the server has {self.in_flight} requests in flight "
                                 "(SERVE_MAX_CONNECTIONS); retry shortly.")
                return
            self.in_flight += not pinged
            try:
                await self.inner(scope, timed_receive, tracked_send)
            finally:
                self.in_flight -= not pinged
        except asyncio.CancelledError:
            if started:
                raise
            # The answer is the request's end: uvicorn, which cancelled it, awaits nothing more
            # from it, and a re-raise would only add a traceback per request to the log.
            status = 503
            await _send_json(send, 503, "the server is shutting down and this request did not finish "
                             f"within the drain window of {state.settings.drain_timeout_s:g} s; retry it.")
        finally:
            if not pinged:  # the platform pings every few seconds
                log.info(
                    "%s %s status=%d latency_ms=%.1f images=%d", scope["method"], scope["path"][:80],
                    status, (time.perf_counter() - begun) * 1000, scope["state"].get("images", 0),
                )


async def _send_json(send: Any, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 connection with the two bounds it lacks against slow clients.

    - A request's line and headers must arrive within SERVE_HEADER_TIMEOUT_S of its first byte
      (408, then the connection is closed). An idle connection waits KEEP_ALIVE_S, as before.
    - Beyond SERVE_MAX_CONNECTIONS open connections, each new one closes the connection that has
      waited longest without a request in flight (idle or still sending headers), so that
      1,024 idle or slow clients cannot lock every caller out, /ping included.
    """

    header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.waiting_since = self.loop.time()
        # uvicorn arms its idle timer only after a first response: a connection that never
        # sends a request is closed after the same idle time as one between requests.
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)
        if len(self.connections) > state.settings.max_connections:
            waiting = [c for c in self.connections if isinstance(c, GuardedH11Protocol)
                       and c.without_request() and not c.transport.is_closing()]
            # With none waiting, every connection has a request in flight: the new one is kept,
            # and Guard answers its request 503 once SERVE_MAX_CONNECTIONS are in flight.
            if waiting:
                min(waiting, key=lambda c: c.waiting_since).transport.close()

    def without_request(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def data_received(self, data: bytes) -> None:
        if self.header_timer is None and self.conn.their_state is h11.IDLE:
            self.header_timer = self.loop.call_later(state.settings.header_timeout_s, self.headers_too_slow)
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._stop_header_timer()

    def on_response_complete(self) -> None:
        self.waiting_since = self.loop.time()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def _stop_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def headers_too_slow(self) -> None:
        self.header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        self.reply_and_close(408, "Request Timeout", "the request line and headers did not arrive within "
                             f"{state.settings.header_timeout_s:g} s (SERVE_HEADER_TIMEOUT_S); send them at once.")

    def reply_and_close(self, status: int, phrase: str, message: str) -> None:
        """An answer in the contract's shape before a request was read whole (h11 would refuse
        to send one), then the connection closed."""
        body = json.dumps({"error": message}).encode()
        self.transport.write(
            f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n".encode() + body
        )
        self.transport.close()


def _allow_open_files(connections: int) -> None:
    """Room for every allowed connection: a soft limit of 1,024 descriptors (common in
    containers) would stop accept() before SERVE_MAX_CONNECTIONS is reached."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + 256  # the model's files, threads' pipes, the listening socket
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard), hard))


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
    _allow_open_files(state.settings.max_connections)
    config = uvicorn.Config(
        Guard(app), host="0.0.0.0", port=state.settings.port, access_log=False, log_level="info",
        http=GuardedH11Protocol, timeout_graceful_shutdown=state.settings.drain_timeout_s,
        timeout_keep_alive=KEEP_ALIVE_S, lifespan="on",
    )
    state.server = uvicorn.Server(config)
    log.info("serving %s on port %d", state.settings.model_dir, state.settings.port)
    # uvicorn drains in-flight requests on SIGTERM, then re-raises the signal it caught: this
    # handler receives that re-raise, so a drained shutdown exits 0, as SageMaker expects.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    state.server.run()
    log.info("stopped")
    return state.exit_code
