"""What the routes share, as FastAPI dependencies: the service, the model serving now, and
the API key check.

The app factory keeps one Service in ``app.state.service``; the dependencies read it from
the request, so the routes are module-level functions with what they need in their
signatures. They are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in a
worker thread. The two prediction routes call service_of and serving_model directly instead
(see routes/predict.py).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from mnistflow.serving.batching import MicroBatcher
from mnistflow.serving.errors import ApiError
from mnistflow.serving.metrics import Metrics
from mnistflow.serving.model import ModelFollower, ServedModel
from mnistflow.serving.settings import ServeConfig


@dataclass(frozen=True)
class Service:
    """One app's parts: its config, the follower holding the model, its metrics, and the
    micro-batcher the prediction routes send their digits through."""

    config: ServeConfig
    follower: ModelFollower
    metrics: Metrics
    batcher: MicroBatcher


def service_of(request: Request) -> Service:
    return request.app.state.service  # type: ignore[no-any-return]


def serving_model(service: Service) -> ServedModel:
    """The model serving now; the request keeps it to its end, whatever the follower does."""
    served = service.follower.current
    if served is None:
        raise ApiError(503, "no model is loaded yet; /ready tells when one is.")
    return served


async def get_service(request: Request) -> Service:
    return service_of(request)


async def current_model(request: Request) -> ServedModel:
    return serving_model(service_of(request))


ServiceDep = Annotated[Service, Depends(get_service)]
CurrentModel = Annotated[ServedModel, Depends(current_model)]

ApiKey = Annotated[
    str | None,
    Security(APIKeyHeader(name="X-API-Key", auto_error=False, description="The server's key.")),
]
Bearer = Annotated[
    HTTPAuthorizationCredentials | None,
    Security(HTTPBearer(auto_error=False, description="The server's key as a bearer token.")),
]


async def require_key(request: Request, key: ApiKey, bearer: Bearer) -> None:
    """Admit requests carrying the server's key (X-API-Key or a bearer token).

    Guards the prediction routes when the server has a key (see routes/predict.py).
    """
    wanted = (service_of(request).config.api_key or "").encode()
    given = (key or (bearer.credentials if bearer else "")).encode()
    # compare_digest: the time taken does not tell how much of a guess was right.
    if not wanted or not given or not hmac.compare_digest(given, wanted):
        raise ApiError(401, "a valid API key is required in the X-API-Key header.")
