"""The HTTP side of `ptv2 serve`: a FastAPI application over a PromptPool and its micro-batcher.

Every refusal is a 4xx with one JSON line, {"error": "..."}; a request's own error never reaches the others batched
with it. The OpenAPI page (/docs) describes every field from the models below.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from ptv2.checks import check_name
from ptv2.commands.serve_batcher import MicroBatcher
from ptv2.commands.serve_pool import PromptPool, RequestError
from ptv2.commands.serve_pool import Request as PromptRequest
from ptv2.data.records import FIELDS
from ptv2.errors import UserError

log = logging.getLogger("ptv2")

RECORDS_HELP = "The records to predict, each in the form of one line of `ptv2 predict input=FILE` for the task: " + (
    "; ".join(f"{reader}: {fields}" for reader, fields in FIELDS.items())
)


class PredictBody(BaseModel):
    records: list[Any] = Field(
        description=RECORDS_HELP,
        min_length=1,
        examples=[[{"premise": "A man sleeps.", "hypothesis": "Nobody sleeps."}]],
    )


class LoadBody(BaseModel):
    name: str = Field(description="The name to serve the prompt under (letters, digits, '_', '.', '-')")
    checkpoint: str = Field(
        description="A run folder or prompt.safetensors file inside a folder the server was started with"
    )


class Prediction(BaseModel):
    record: int = Field(description="The position of the record in the request")
    label: str | None = Field(None, description="Classification, multiple choice: the predicted label")
    scores: dict[str, float] | None = Field(
        None, description="Classification, multiple choice: each label's probability"
    )
    tags: list[str] | None = Field(None, description="Tagging: one tag per word")
    probabilities: list[float | None] | None = Field(
        None, description="Tagging: each word's tag probability (null for a word cut off at task.max_length)"
    )
    answer: str | None = Field(None, description='QA: the answer span ("" for no answer under SQuAD 2.0)')
    null_odds: float | None = Field(None, description="QA: null score minus the best span's score (lower: surer)")
    text: str | None = Field(None, description="Generation: the greedy answer")


class PredictResponse(BaseModel):
    prompt: str = Field(description="The prompt that answered")
    run_id: str = Field(description="Its run folder and the first 12 hex digits of its checkpoint's SHA-256")
    predictions: list[Prediction] = Field(description="One answer per example, in record order")


class PromptInfo(BaseModel):
    name: str = Field(description="The name requests use: POST /prompts/NAME/predict")
    run_id: str = Field(description="Its run folder and the first 12 hex digits of its checkpoint's SHA-256")
    checkpoint: str = Field(description="The prompt.safetensors file it was loaded from")
    task: str = Field(description="The task it was trained on (task.name)")
    task_type: str = Field(description="classification, multiple_choice, tagging, span or generation")
    method: str = Field(description="The prompt method (prompt.method)")
    labels: list[str] = Field(description="The label names its head scores (none for QA and generation)")


class Metrics:
    """Prometheus series of one server (its own registry)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ptv2_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "ptv2_request_seconds",
            "Latency of predict requests",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.batch_rows = Histogram(
            "ptv2_batch_examples",
            "Examples per backbone batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.batch_seconds = Histogram("ptv2_batch_seconds", "Time of one batch on the worker", registry=self.registry)
        self.prompts = Gauge("ptv2_prompts", "Prompts served", registry=self.registry)

    def batch(self, rows: int, seconds: float) -> None:
        self.batch_rows.observe(rows)
        self.batch_seconds.observe(seconds)


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)


def validation_line(exc: RequestValidationError, content_type: str) -> tuple[int, str]:
    """(status, one line) for a body FastAPI could not read: malformed JSON is 400, a body sent as another type 415,
    a missing or wrong field 422."""
    first = exc.errors()[0] if exc.errors() else {}
    if "json" not in content_type and tuple(first.get("loc", ())) == ("body",):
        return 415, f"the body was sent as {content_type or 'no type'}; send JSON with Content-Type: application/json"
    if first.get("type") == "json_invalid":
        return 400, f"malformed JSON: {first.get('ctx', {}).get('error', 'not valid JSON')}; send a JSON object"
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "the body"
    return 422, f"{where}: {first.get('msg', 'invalid')}; see /docs for the request's fields"


class BodyLimit:
    """An ASGI middleware refusing a request body over `limit` bytes with 413, by its Content-Length or while it
    streams in."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise HTTPException(413, self._line())
            return message

        return await self.app(scope, counted, send)

    def _line(self) -> str:
        return f"the request body is over {self.limit} bytes (serve.max_body_bytes); send fewer records per request"

    async def _refuse(self, scope, receive, send):
        await error(413, self._line())(scope, receive, send)


def build(pool: PromptPool, serve, roots: list[Path]) -> FastAPI:
    """The application; `serve` is the config's serve group, `roots` the folders runtime loads may read from."""
    metrics = Metrics()
    metrics.prompts.set(len(pool.prompts))
    batcher = MicroBatcher(pool, serve.max_batch, serve.max_wait_ms / 1000, on_batch=metrics.batch)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()  # uvicorn has waited for the requests in flight: answer what is queued, then stop

    app = FastAPI(
        title="ptv2 serve",
        description="Trained deep prompts on one frozen backbone; requests for any mix of prompts share a forward.",
        lifespan=lifespan,
    )
    app.state.pool, app.state.batcher, app.state.metrics = pool, batcher, metrics
    app.add_middleware(BodyLimit, limit=serve.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return counted(request, error(*validation_line(exc, request.headers.get("content-type", ""))))

    @app.exception_handler(HTTPException)
    async def refused(request: Request, exc: HTTPException):
        return counted(request, error(exc.status_code, exc.detail))

    @app.exception_handler(UserError)
    async def bad_request(request: Request, exc: UserError):
        return counted(request, error(getattr(exc, "status", 422), str(exc)))

    @app.exception_handler(Exception)
    async def fault(request: Request, exc: Exception):  # the server's fault: logged in full, answered in one line
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return counted(request, error(500, "internal error; the server's log has the details"))

    def counted(request: Request, response: Response) -> Response:
        route = request.scope.get("route")
        metrics.requests.labels(getattr(route, "path", "unknown"), str(response.status_code)).inc()
        return response

    @app.get("/health", summary="Whether the server answers, and how many prompts it holds")
    async def health(request: Request) -> dict:
        return counted(request, JSONResponse({"status": "ok", "prompts": len(pool.prompts)}))

    @app.get("/metrics", summary="Prometheus metrics: requests, batch sizes, latency", response_class=Response)
    async def prometheus(request: Request):
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/prompts", summary="The prompts served", response_model=list[PromptInfo])
    async def prompts(request: Request):
        return counted(request, JSONResponse([prompt.describe() for prompt in pool.prompts.values()]))

    @app.post("/prompts", summary="Load a prompt without a restart", response_model=PromptInfo, status_code=201)
    async def load(body: LoadBody, request: Request):
        check_name("prompt name", body.name)
        path = Path(body.checkpoint).expanduser().resolve()
        if not any(path == root or root in path.parents for root in roots):
            allowed = ", ".join(str(root) for root in roots)
            raise RequestError(f"{body.checkpoint} is outside the folders this server loads from ({allowed})", 403)
        prompt = await batcher.call(pool.load, body.name, str(path))
        metrics.prompts.set(len(pool.prompts))
        return counted(request, JSONResponse(prompt.describe(), status_code=201))

    @app.delete("/prompts/{name}", summary="Unload a prompt", response_model=PromptInfo)
    async def unload(name: str, request: Request):
        prompt = await batcher.call(pool.unload, name)
        metrics.prompts.set(len(pool.prompts))
        return counted(request, JSONResponse(prompt.describe()))

    @app.post("/prompts/{name}/predict", summary="Predict records with one prompt", response_model=PredictResponse)
    async def predict(name: str, body: PredictBody, request: Request):
        started = time.monotonic()
        if len(body.records) > serve.max_records:
            raise RequestError(
                f"{len(body.records)} records in one request; this server takes at most {serve.max_records} "
                "(serve.max_records): split the request",
                413,
            )
        done = await batcher.submit(PromptRequest(name, pool.examples_of(name, body.records)))
        if done.error is not None:
            raise done.error
        numbers = [number for number, _ in done.numbered()]
        predictions = [{"record": number, **answer} for number, answer in zip(numbers, done.answers, strict=True)]
        metrics.latency.observe(time.monotonic() - started)
        return counted(request, JSONResponse({"prompt": name, "run_id": done.run_id, "predictions": predictions}))

    return app
