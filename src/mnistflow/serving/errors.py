"""Every refusal and failure as one JSON sentence: the error shapes and the app's handlers.

What the client got wrong is a 4xx: an ApiError raised by the service, or a PixelError from
the pixel check (mnistflow.lifecycle.pixels). Anything else is the server's fault: a 500 that says
only that the server log has the details.

/invocations answers in the shape of MLflow's scoring server, ``{"error_code", "message"}``,
which clients of `mlflow models serve` already read; the other routes say ``{"error"}``.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from mnistflow.lifecycle.pixels import PixelError

# The error codes MLflow's scoring server puts in its JSON errors, by HTTP status.
MLFLOW_ERROR_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHENTICATED",
    404: "ENDPOINT_NOT_FOUND",
    500: "INTERNAL_ERROR",
    503: "TEMPORARILY_UNAVAILABLE",
}
# What MLflow reports for input its model refuses (a wrong shape, say).
INVALID_INPUT = "INVALID_PARAMETER_VALUE"


class ApiError(Exception):
    """A request the service refuses (or fails): an HTTP status and one sentence.

    mlflow_code: the error_code /invocations reports, when not the status's usual one.
    """

    def __init__(self, status: int, message: str, mlflow_code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.mlflow_code = mlflow_code


def error_body(path: str, status: int, message: str, mlflow_code: str | None = None) -> bytes:
    """The JSON error for a request to path: MLflow's shape on /invocations."""
    message = message[:1].upper() + message[1:]
    body: dict[str, str]
    if path == "/invocations":
        fallback = "BAD_REQUEST" if status < 500 else "INTERNAL_ERROR"
        code = mlflow_code or MLFLOW_ERROR_CODES.get(status, fallback)
        body = {"error_code": code, "message": message}
    else:
        body = {"error": message}
    return orjson.dumps(body)


def error_response(
    request: Request,
    status: int,
    message: str,
    headers: Any = None,
    mlflow_code: str | None = None,
) -> Response:
    """The JSON error for this request's route (see error_body)."""
    body = error_body(request.scope["path"], status, message, mlflow_code)
    return Response(body, status, headers, media_type="application/json")


def meaning(exc: Exception) -> tuple[int, str, str | None]:
    """What an exception raised while answering tells the client: status, sentence and
    /invocations error code (None: the status's usual one). For the app's handlers and for
    serving/fast_path.py, which answers below them."""
    if isinstance(exc, ApiError):
        return exc.status, exc.message, exc.mlflow_code
    if isinstance(exc, PixelError):
        return 400, str(exc), INVALID_INPUT
    return 500, "internal server error; the server log has the details.", None


async def answer_exception(request: Request, exc: Exception) -> Response:
    status, message, mlflow_code = meaning(exc)
    return error_response(request, status, message, mlflow_code=mlflow_code)


async def http_error(request: Request, exc: HTTPException) -> Response:
    message = str(exc.detail)
    if exc.status_code == 404:
        message = f"there is no {request.scope['path']} here; see /docs for the endpoints."
    return error_response(request, exc.status_code, message, exc.headers)


async def validation_error(request: Request, exc: RequestValidationError) -> Response:
    first = exc.errors()[0] if exc.errors() else {"msg": "invalid request"}
    return error_response(request, 422, str(first.get("msg")))


def add_handlers(app: FastAPI) -> None:
    """Install the handlers: every error the app can meet answers in one JSON shape."""
    app.exception_handler(ApiError)(answer_exception)
    app.exception_handler(PixelError)(answer_exception)
    app.exception_handler(HTTPException)(http_error)
    app.exception_handler(RequestValidationError)(validation_error)
    # Any other exception is a 500: Starlette re-raises after the response is sent, so
    # uvicorn logs the traceback.
    app.exception_handler(Exception)(answer_exception)
