"""The HTTP app: prediction endpoints, health and metrics, the OpenAPI docs and the page.

    app = create_app(ServeConfig(...))                 # loads and follows config.model_uri
    app = create_app(config, model_source=follower)    # or serve a follower made elsewhere

Performance (benchmarks/bench_serving.py; 2 CPU cores shared with the load generator):
inference runs inline on the event loop. One digit takes ~30 us in ONNX Runtime, less than
a hop to a worker thread and back (measured: 2,600 vs 3,900 requests/s at concurrency 1).
A micro-batcher that gathered concurrent requests for 1 ms was 6x slower at concurrency 1
and 15% slower at 16: HTTP handling in Python, not the model, is most of a request's cost.
Image uploads are decoded in a worker thread, as a large photo takes milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.resources
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

import mlflow
import numpy as np
import orjson
from fastapi import Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

import mnistflow
from mnistflow.serving.inputs import (
    INVOCATION_FORMATS,
    ApiError,
    BodyLimitMiddleware,
    as_array,
    images_to_pixels,
    invocation_pixels,
    load_json,
    media_type,
    predict_pixels,
    predictions,
)
from mnistflow.serving.metrics import Metrics, MetricsMiddleware
from mnistflow.serving.model import ModelFollower, ServedModel
from mnistflow.serving.settings import ServeConfig

HOT_ROUTES = ("/invocations", "/predict")
PACKAGE = "mnistflow.serving"  # holds static/: the page, its script and its styles

# The error codes MLflow's scoring server puts in its JSON errors, by HTTP status.
MLFLOW_ERROR_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHENTICATED",
    404: "ENDPOINT_NOT_FOUND",
    500: "INTERNAL_ERROR",
    503: "TEMPORARILY_UNAVAILABLE",
}

ApiKey = Annotated[
    str | None,
    Security(APIKeyHeader(name="X-API-Key", auto_error=False, description="The server's key.")),
]
Bearer = Annotated[
    HTTPAuthorizationCredentials | None,
    Security(HTTPBearer(auto_error=False, description="The server's key as a bearer token.")),
]


# -- documented shapes (for OpenAPI only: the hot path never builds these) ----------------


class Prediction(BaseModel):
    label: int = Field(ge=0, le=9)
    probabilities: list[float] = Field(min_length=10, max_length=10)


class ModelRef(BaseModel):
    name: str
    version: str | None


class ModelInfo(ModelRef):
    run_id: str | None


class PredictResponse(BaseModel):
    model: ModelRef
    predictions: list[Prediction]


class InvocationsResponse(BaseModel):
    predictions: list[Prediction]


class Error(BaseModel):
    error: str = Field(description="One sentence saying what is wrong.")


class MlflowError(BaseModel):
    error_code: str
    message: str


class Health(BaseModel):
    status: str


class Failure(BaseModel):
    version: str | None
    message: str
    at: str


class Ready(BaseModel):
    ready: bool
    model: ModelInfo | None
    model_uri: str
    last_error: Failure | None = Field(description="The last version that failed to load.")


class VersionInfo(ModelInfo):
    model_uri: str


def _body_schemas(max_images: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """JSON schemas of the request bodies: (one digit, several digits, /invocations body)."""
    pixel = {"type": "number", "minimum": 0, "maximum": 255}
    digit = {
        "type": "array",
        "description": "One digit: 28 rows of 28 grey levels 0-255, white on black as in MNIST.",
        "minItems": 28,
        "maxItems": 28,
        "items": {"type": "array", "minItems": 28, "maxItems": 28, "items": pixel},
    }
    digits = {"type": "array", "minItems": 1, "maxItems": max_images, "items": digit}
    rows = {
        "type": "array",
        "description": "One row of 784 pixels (28x28, row by row) per digit.",
        "minItems": 1,
        "maxItems": max_images,
        "items": {"type": "array", "minItems": 784, "maxItems": 784, "items": pixel},
    }
    split = {
        "type": "object",
        "required": ["data"],
        "properties": {
            "columns": {"description": "Ignored: the pixels are taken in order."},
            "index": {"description": "Ignored."},
            "data": rows,
        },
        "additionalProperties": False,
    }
    params = {"description": "Accepted and ignored, as by MLflow for this model."}
    invocations = {
        "oneOf": [
            {
                "type": "object",
                "required": [key],
                "properties": {key: schema, "params": params},
                "additionalProperties": False,
            }
            for key, schema in zip(INVOCATION_FORMATS, (digits, digits, split), strict=True)
        ]
    }
    return digit, digits, invocations


def create_app(config: ServeConfig, model_source: ModelFollower | None = None) -> FastAPI:
    """The service for config; model_source, when given, is served instead of loading
    config.model_uri (it is still polled, if it follows an alias, while the app runs)."""
    follower = model_source or ModelFollower(
        config.model_uri,
        tracking_uri=config.tracking_uri or mlflow.get_tracking_uri(),
        poll_seconds=config.poll_seconds,
        retry_failed_seconds=config.retry_failed_seconds,
    )
    metrics = Metrics(follower)
    page = importlib.resources.files(PACKAGE).joinpath("static/index.html").read_text()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Loads the model first if it is not loaded yet (/ready says 503 meanwhile), then
        # follows the alias until shutdown.
        task = asyncio.create_task(follower.follow())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app = FastAPIOffline(
        title="mnistflow",
        version=mnistflow.__version__,
        description=(
            "Classify handwritten digits with the model registered in MLflow. "
            "`/invocations` speaks the protocol of `mlflow models serve`; `/predict` also "
            "takes image uploads. The page at `/` lets you draw a digit."
        ),
        lifespan=lifespan,
    )
    # The last added runs first: the metrics see every request, refused ones included.
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.mount("/static", StaticFiles(packages=[(PACKAGE, "static")]), name="static")

    # -- errors: one JSON shape, and never a 5xx for what a client sent -------------------

    def error(
        request: Request,
        status: int,
        message: str,
        headers: Any = None,
        mlflow_code: str | None = None,
    ) -> Response:
        message = message[:1].upper() + message[1:]
        body: dict[str, str]
        if request.scope["path"] == "/invocations":
            # MLflow's shape, which clients of `mlflow models serve` already read.
            fallback = "BAD_REQUEST" if status < 500 else "INTERNAL_ERROR"
            code = mlflow_code or MLFLOW_ERROR_CODES.get(status, fallback)
            body = {"error_code": code, "message": message}
        else:
            body = {"error": message}
        return Response(orjson.dumps(body), status, headers, media_type="application/json")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return error(request, exc.status, exc.message, mlflow_code=exc.mlflow_code)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"there is no {request.scope['path']} here; see /docs for the endpoints."
        return error(request, exc.status_code, message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request"}
        return error(request, 422, str(first.get("msg")))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        # Starlette re-raises after this response is sent, so uvicorn logs the traceback.
        return error(request, 500, "internal server error; the server log has the details.")

    # -- prediction ------------------------------------------------------------------------

    def serving() -> ServedModel:
        served = follower.current
        if served is None:
            raise ApiError(503, "no model is loaded yet; /ready tells when one is.")
        return served

    def classify(served: ServedModel, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        try:
            return served.classifier.classify(pixels)
        except ValueError as e:  # the model's InputError: shape, NaN or range
            # MLflow reports input its model refuses as INVALID_PARAMETER_VALUE.
            raise ApiError(400, str(e), mlflow_code="INVALID_PARAMETER_VALUE") from None

    def json_response(served: ServedModel, body: dict[str, Any]) -> Response:
        headers = {"X-Model-Version": served.version or ""}
        return Response(orjson.dumps(body), headers=headers, media_type="application/json")

    async def read_images(request: Request) -> np.ndarray:
        async with request.form(max_files=config.max_images, max_fields=config.max_images) as form:
            uploads = form.getlist("file")
            if not uploads:
                raise ApiError(400, "no image: send each image as a file in the form field file.")
            images = []
            for upload in uploads:
                if not isinstance(upload, UploadFile):
                    raise ApiError(400, "the form field file must hold files, not text.")
                images.append((upload.filename or "", await upload.read()))
        return await run_in_threadpool(images_to_pixels, images)

    auth = [Depends(key_guard(config.api_key))] if config.api_key else []
    errors: dict[int | str, dict[str, Any]] = {
        400: {"model": Error, "description": "Unusable input; the message says why."},
        413: {"model": Error, "description": "Body over the size limit."},
        415: {"model": Error, "description": "Unsupported content type."},
        503: {"model": Error, "description": "No model loaded yet."},
    }
    if config.api_key:
        errors[401] = {"model": Error, "description": "Missing or wrong API key."}
    digit, digits, invocations_body = _body_schemas(config.max_images)
    predict_batches = metrics.batch_size.labels("/predict")
    invocation_batches = metrics.batch_size.labels("/invocations")

    @app.post(
        "/predict",
        summary="Classify digits: JSON pixels or uploaded images",
        response_model=PredictResponse,
        responses=errors,
        dependencies=auth,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["pixels"],
                            "properties": {"pixels": {"oneOf": [digit, digits]}},
                            "additionalProperties": False,
                        }
                    },
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["file"],
                            "properties": {
                                "file": {
                                    "type": "array",
                                    "minItems": 1,
                                    "maxItems": config.max_images,
                                    "items": {"type": "string", "format": "binary"},
                                    "description": "PNG or JPEG images of one digit each, "
                                    "any size and colours; prepared as in batch inference.",
                                }
                            },
                        }
                    },
                },
            }
        },
    )
    async def predict(request: Request) -> Response:
        served = serving()  # this request's model, whatever the follower does meanwhile
        kind = media_type(request.headers.get("content-type"))
        if kind == "application/json":
            pixels = as_array(predict_pixels(load_json(await request.body())), config.max_images)
        elif kind == "multipart/form-data":
            pixels = await read_images(request)
        else:
            raise ApiError(
                415, "send application/json pixels or multipart/form-data images (field file)."
            )
        labels, probabilities = classify(served, pixels)
        predict_batches.observe(len(labels))
        return json_response(
            served,
            {
                "model": {"name": served.name, "version": served.version},
                "predictions": predictions(labels, probabilities),
            },
        )

    @app.post(
        "/invocations",
        summary="Classify digits, as `mlflow models serve` does",
        response_model=InvocationsResponse,
        responses={status: {**doc, "model": MlflowError} for status, doc in errors.items()},
        dependencies=auth,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": invocations_body}},
            }
        },
    )
    async def invocations(request: Request) -> Response:
        served = serving()
        if media_type(request.headers.get("content-type")) != "application/json":
            raise ApiError(415, "send the body as application/json.")
        pixels = as_array(invocation_pixels(load_json(await request.body())), config.max_images)
        labels, probabilities = classify(served, pixels)
        invocation_batches.observe(len(labels))
        return json_response(served, {"predictions": predictions(labels, probabilities)})

    # -- health, version, metrics, page ----------------------------------------------------

    @app.get("/health", summary="The process is up", response_model=Health)
    async def health() -> Response:
        return JSONResponse({"status": "ok"})

    @app.get(
        "/ready",
        summary="A model is loaded; details of the last failed load",
        response_model=Ready,
        responses={503: {"model": Ready, "description": "No model loaded yet."}},
    )
    async def ready() -> Response:
        served, failure = follower.current, follower.last_error
        body = {
            "ready": served is not None,
            "model": served.describe() if served else None,
            "model_uri": follower.model_uri,
            "last_error": None
            if failure is None
            else {
                "version": failure.version,
                "message": failure.message,
                "at": failure.at,
            },
        }
        return JSONResponse(body, status_code=200 if served else 503)

    @app.get(
        "/version",
        summary="The model serving now",
        response_model=VersionInfo,
        responses={503: {"model": Error, "description": "No model loaded yet."}},
    )
    async def version() -> Response:
        served = serving()
        return JSONResponse({**served.describe(), "model_uri": follower.model_uri})

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    # Starlette tries the routes in order, and FastAPI put its docs routes first: the two
    # that take nearly all the traffic go to the front.
    app.router.routes.sort(key=lambda route: getattr(route, "path", "") not in HOT_ROUTES)
    return app


def key_guard(expected: str) -> Callable[..., Awaitable[None]]:
    """A dependency that admits requests carrying the key (X-API-Key or a bearer token)."""
    wanted = expected.encode()

    async def require_key(key: ApiKey, bearer: Bearer) -> None:
        given = key or (bearer.credentials if bearer else "")
        # compare_digest: the time taken does not tell how much of a guess was right.
        if not given or not hmac.compare_digest(given.encode(), wanted):
            raise ApiError(401, "a valid API key is required in the X-API-Key header.")

    return require_key
