"""Request bodies to pixel arrays, and every way they can be wrong as an ApiError (the
pixels themselves are checked by mnistflow.lifecycle.pixels, as in the model and in `predict`).

The JSON path is kept lean on purpose: orjson parses the bytes and numpy converts the
nested lists in one call, where validating 784 numbers through pydantic models would cost
more than the inference. The bodies are still described in the OpenAPI schema (see
schemas.py), for the docs page and the schema fuzzing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mnistflow.inference.preprocess import image_to_digit
from mnistflow.lifecycle.pixels import as_pixels
from mnistflow.serving.errors import ApiError

# The request formats of `mlflow models serve`; dataframe_records is left out because
# MLflow cannot apply it to this model's tensor signature either.
INVOCATION_FORMATS = ("inputs", "instances", "dataframe_split")
SPLIT_FIELDS = {"columns", "data", "index"}


class BodyLimitMiddleware:
    """Refuse request bodies over max_bytes with 413: at once when Content-Length says so
    (nothing is read), else as soon as the bytes received pass the limit.

    Starlette has such a limit (max_body_size), but it replaces the app's response with
    plain text; raising ApiError from receive() lets the app's JSON error handler answer.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.app(scope, limited(scope, receive, self.max_bytes), send)


def limited(scope: Scope, receive: Receive, max_bytes: int) -> Receive:
    """receive, raising a 413 ApiError at once when Content-Length says the body is over
    max_bytes (nothing is read), else as soon as the bytes received pass it."""
    declared = next((v for k, v in scope["headers"] if k == b"content-length"), b"")
    received = 0
    too_large = f"the request body is over the limit of {max_bytes:,} bytes."

    async def limited_receive() -> Message:
        nonlocal received
        if declared.isdigit() and int(declared) > max_bytes:
            raise ApiError(413, too_large)
        message = await receive()
        received += len(message.get("body", b""))
        if received > max_bytes:
            raise ApiError(413, too_large)
        return message

    return limited_receive


class ClientGone(Exception):
    """The client disconnected before its request body was read whole."""


async def read_body(scope: Scope, receive: Receive, max_bytes: int) -> bytes:
    """The whole request body, within the same limit as BodyLimitMiddleware's (for the
    requests answered before the app: serving/fast_path.py)."""
    receive = limited(scope, receive, max_bytes)
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def media_type(content_type: str | None) -> str:
    """'application/json; charset=utf-8' -> 'application/json'."""
    return (content_type or "").partition(";")[0].strip().lower()


def load_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ApiError(400, f"the body is not valid JSON ({e}).") from None


def invocation_pixels(payload: Any) -> Any:
    """The pixels in an MLflow scoring request: {"inputs" | "instances" | "dataframe_split"}.

    Like MLflow: exactly one format field, "params" accepted and ignored, dataframe_split
    with "data" and optionally "columns" and "index". Here dataframe_split takes rows of
    784 pixels (MLflow's server refuses dataframe_split for this model's tensor signature).
    """
    fields = set(payload) if isinstance(payload, dict) else set()
    formats = fields & set(INVOCATION_FORMATS)
    if len(formats) != 1 or fields - formats - {"params"}:
        raise ApiError(
            400,
            "the body must be a JSON object with exactly one of the fields "
            f"{', '.join(INVOCATION_FORMATS)} (and optionally params).",
        )
    (key,) = formats
    data = payload[key]
    if key == "dataframe_split":
        if not isinstance(data, dict) or "data" not in data or set(data) - SPLIT_FIELDS:
            raise ApiError(
                400,
                "the dataframe_split field must be an object with a data field (and optionally "
                "columns and index).",
            )
        data = data["data"]
    return data


def predict_pixels(payload: Any) -> Any:
    """The pixels in a /predict JSON body: {"pixels": one 28x28 digit or a list of them}."""
    if not isinstance(payload, dict) or set(payload) != {"pixels"}:
        raise ApiError(
            400, 'the body must be a JSON object {"pixels": [...]} with one or more 28x28 digits.'
        )
    return payload["pixels"]


def as_array(data: Any, max_images: int) -> np.ndarray:
    """Nested lists of numbers -> float32 (N, 1, 28, 28), checked by as_pixels (whose
    PixelError the app answers with 400), and at most max_images digits."""
    pixels = as_pixels(data)
    if len(pixels) > max_images:
        raise ApiError(
            400,
            f"too many digits in one request: {len(pixels)} given, at most {max_images} allowed.",
        )
    return pixels


def images_to_pixels(images: Sequence[tuple[str, bytes]]) -> np.ndarray:
    """Uploaded (filename, bytes) -> (N, 28, 28) MNIST-style pixels; slow, run in a thread."""
    digits = []
    for i, (filename, data) in enumerate(images, start=1):
        try:
            digits.append(image_to_digit(data))
        except ValueError as e:
            raise ApiError(400, f"image {i} ({filename or 'unnamed'}): {e}") from None
    return np.stack(digits)


def predictions(
    labels: np.ndarray, probabilities: np.ndarray, abstain_below: float | None = None
) -> list[dict[str, Any]]:
    """The rows MLflow's scoring server writes for this model: label and ten probabilities,
    and, for a model logged with an abstain threshold, the label's probability as confidence
    and whether it is under the threshold (as classifier_model.py's predict() computes them).

    tolist() gives Python floats, so the numbers print exactly as MLflow prints them.
    """
    if abstain_below is None:
        return [
            {"label": label, "probabilities": probs}
            for label, probs in zip(labels.tolist(), probabilities.tolist(), strict=True)
        ]
    confidence = probabilities.max(axis=1)
    return [
        {"label": label, "probabilities": probs, "confidence": sure, "abstain": no}
        for label, probs, sure, no in zip(
            labels.tolist(),
            probabilities.tolist(),
            confidence.tolist(),
            (confidence < abstain_below).tolist(),
            strict=True,
        )
    ]
