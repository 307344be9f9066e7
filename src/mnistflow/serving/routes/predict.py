"""POST /predict and /invocations: pixels or images in, labels and probabilities out.

These two routes take nearly all the traffic, so they are kept lean: the body is read as
bytes, parsed by orjson and checked by mnistflow.lifecycle.pixels (no pydantic on 784 numbers); the
service and the model are plain calls, not FastAPI dependencies (resolving one measurably
slows these routes; the README gives the figures); and the digits go through the service's
micro-batcher (serving/batching.py), which runs the model inline on the event loop, as a
batch of digits takes less time in ONNX Runtime than a hop to a worker thread and back.
Image uploads are decoded in a worker thread, as a large photo takes milliseconds.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from mnistflow.serving.deps import Service, require_key, service_of, serving_model
from mnistflow.serving.errors import INVALID_INPUT, ApiError
from mnistflow.serving.inputs import (
    as_array,
    images_to_pixels,
    invocation_pixels,
    load_json,
    media_type,
    predict_pixels,
    predictions,
)
from mnistflow.serving.model import ServedModel
from mnistflow.serving.schemas import (
    Error,
    InvocationsResponse,
    MlflowError,
    PredictResponse,
    request_bodies,
)
from mnistflow.serving.settings import ServeConfig

log = logging.getLogger(__name__)

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Error, "description": "Unusable input; the message says why."},
    413: {"model": Error, "description": "Body over the size limit."},
    415: {"model": Error, "description": "Unsupported content type."},
    500: {"model": Error, "description": "The model failed; the server log has the details."},
    503: {"model": Error, "description": "No model loaded yet."},
}
KEY_ERROR: dict[int | str, dict[str, Any]] = {
    401: {"model": Error, "description": "Missing or wrong API key."}
}


async def predict(request: Request) -> Response:
    service = service_of(request)
    kind = media_type(request.headers.get("content-type"))
    if kind == "application/json":
        return answer(*await predict_json(service, await request.body()))
    served = serving_model(service)  # this request's model, whatever the follower does
    if kind != "multipart/form-data":
        raise ApiError(
            415, "send application/json pixels or multipart/form-data images (field file)."
        )
    # As JSON pixels are, so that uploads and JSON digits can share a model call.
    max_images = service.config.max_images
    pixels = as_array(await read_images(request, max_images), max_images)
    return answer(served, await predict_body(service, served, pixels))


async def invocations(request: Request) -> Response:
    service = service_of(request)
    if media_type(request.headers.get("content-type")) != "application/json":
        raise ApiError(415, "send the body as application/json.")
    return answer(*await invocations_json(service, await request.body()))


# The JSON half of each route, shared with serving/fast_path.py, which answers most JSON
# requests before they reach the app: each returns the model that answered and the body.
async def predict_json(service: Service, body: bytes) -> tuple[ServedModel, dict[str, Any]]:
    served = serving_model(service)  # this request's model, whatever the follower does
    pixels = as_array(predict_pixels(load_json(body)), service.config.max_images)
    return served, await predict_body(service, served, pixels)


async def invocations_json(service: Service, body: bytes) -> tuple[ServedModel, dict[str, Any]]:
    served = serving_model(service)
    pixels = as_array(invocation_pixels(load_json(body)), service.config.max_images)
    labels, probabilities = await service.batcher.classify(served, pixels)
    service.metrics.observe_batch("/invocations", len(labels))
    return served, {"predictions": predictions(labels, probabilities, served.abstain_below)}


async def predict_body(service: Service, served: ServedModel, pixels: np.ndarray) -> dict[str, Any]:
    labels, probabilities = await service.batcher.classify(served, pixels)
    service.metrics.observe_batch("/predict", len(labels))
    model = {"name": served.name, "version": served.version}
    rows = predictions(labels, probabilities, served.abstain_below)
    return {"model": model, "predictions": rows}


# The routes' JSON halves by path, for serving/fast_path.py.
JSON_HALVES = {"/predict": predict_json, "/invocations": invocations_json}


def router(config: ServeConfig) -> APIRouter:
    """The two routes for config: its API key guards them, its limits are documented."""
    guarded = config.api_key is not None
    errors = {**ERRORS, **KEY_ERROR} if guarded else ERRORS
    routes = APIRouter(dependencies=[Depends(require_key)] if guarded else [])
    bodies = request_bodies(config.max_images)
    routes.add_api_route(
        "/predict",
        predict,
        methods=["POST"],
        summary="Classify digits: JSON pixels or uploaded images",
        response_model=PredictResponse,
        responses=errors,
        openapi_extra={"requestBody": bodies["/predict"]},
    )
    routes.add_api_route(
        "/invocations",
        invocations,
        methods=["POST"],
        summary="Classify digits, as `mlflow models serve` does",
        response_model=InvocationsResponse,
        responses={status: {**doc, "model": MlflowError} for status, doc in errors.items()},
        openapi_extra={"requestBody": bodies["/invocations"]},
    )
    return routes


def classify(served: ServedModel, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The model on pixels already checked; what it raises is its fault, not the client's."""
    try:
        return served.classifier.classify(pixels)
    except Exception as e:
        # The logged model's own copy of the pixel check (a different class, loaded from
        # its code_paths) refusing input: a model logged by another mnistflow version may
        # be stricter. Still the client's input, so still a 400.
        if type(e).__name__ == "PixelError":
            raise ApiError(400, str(e), mlflow_code=INVALID_INPUT) from None
        log.exception(
            "model %s version %s failed on %d digit(s)", served.name, served.version, len(pixels)
        )
        raise ApiError(
            500, "the model failed on this input; the server log has the details."
        ) from None


def answer(served: ServedModel, body: dict[str, Any]) -> Response:
    headers = {"X-Model-Version": served.version or ""}
    return Response(orjson.dumps(body), headers=headers, media_type="application/json")


async def read_images(request: Request, max_images: int) -> np.ndarray:
    async with request.form(max_files=max_images, max_fields=max_images) as form:
        uploads = form.getlist("file")
        if not uploads:
            raise ApiError(400, "no image: send each image as a file in the form field file.")
        images = []
        for upload in uploads:
            if not isinstance(upload, UploadFile):
                raise ApiError(400, "the form field file must hold files, not text.")
            images.append((upload.filename or "", await upload.read()))
    return await run_in_threadpool(images_to_pixels, images)
