"""JSON POSTs to /predict and /invocations, answered before FastAPI's layers see them.

Nearly all of a prediction server's traffic is these two requests, and on this project's
2-core test host a one-digit request spent about half of its CPU time in the layers FastAPI
and Starlette put around a route (FastAPI's per-request telemetry check, six middlewares,
routing, the Request object, the exception handlers: measured with py-spy under wrk). The
app (app.ServingApp) offers every request to answered() first, which reads the body, calls
the routes' own JSON halves (routes/predict.py) and writes the answer and the metrics
itself. The answers, errors included, are byte for byte those of the routes
(tests/test_serving.py sends each case both ways).

Everything else goes on to the app: uploads, the page, health and docs, any other method or
content type, and every request to a server with an API key (the key check lives in one
place, deps.require_key). The routes stay registered there, for those requests and for the
OpenAPI schema.
"""

from __future__ import annotations

import logging
import time

import orjson
from starlette.types import Receive, Scope, Send

from mnistflow.serving.deps import Service
from mnistflow.serving.errors import ApiError, error_body, meaning
from mnistflow.serving.inputs import ClientGone, media_type, read_body
from mnistflow.serving.routes.predict import JSON_HALVES

log = logging.getLogger(__name__)

JSON = b"application/json"


async def answered(service: Service, scope: Scope, receive: Receive, send: Send) -> bool:
    """Answer scope's request if it is an unguarded JSON prediction; False for any other."""
    half = JSON_HALVES.get(scope.get("path", "")) if scope["type"] == "http" else None
    if half is None or scope["method"] != "POST" or service.config.api_key is not None:
        return False
    content_type = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
    if media_type(content_type.decode("latin-1")) != "application/json":
        return False
    started = time.perf_counter()
    path = scope["path"]
    headers = [(b"content-type", JSON)]
    try:
        body = await read_body(scope, receive, service.config.max_body_bytes)
        served, answer = await half(service, body)
    except ClientGone:
        return True
    except Exception as e:
        status, message, mlflow_code = meaning(e)
        if status >= 500 and not isinstance(e, ApiError):
            log.exception("%s failed", path)  # as uvicorn logs what reaches the app's handler
        body = error_body(path, status, message, mlflow_code)
    else:
        status, body = 200, orjson.dumps(answer)
        headers.append((b"x-model-version", (served.version or "").encode()))
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    service.metrics.observe_request(path, status, time.perf_counter() - started)
    return True
