"""GET /health, /ready, /version and /metrics: is it up, what does it serve, how is it doing."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from mnistflow.serving.deps import CurrentModel, ServiceDep
from mnistflow.serving.schemas import Error, Health, Ready, VersionInfo

router = APIRouter()


@router.get("/health", summary="The process is up", response_model=Health)
async def health() -> Response:
    return JSONResponse({"status": "ok"})


@router.get(
    "/ready",
    summary="A model is loaded; details of the last failed load",
    response_model=Ready,
    responses={503: {"model": Ready, "description": "No model loaded yet."}},
)
async def ready(service: ServiceDep) -> Response:
    follower = service.follower
    served, failure = follower.current, follower.last_error
    body = {
        "ready": served is not None,
        "model": served.describe() if served else None,
        "model_uri": follower.model_uri,
        "last_error": None
        if failure is None
        else {"version": failure.version, "message": failure.message, "at": failure.at},
    }
    return JSONResponse(body, status_code=200 if served else 503)


@router.get(
    "/version",
    summary="The model serving now",
    response_model=VersionInfo,
    responses={503: {"model": Error, "description": "No model loaded yet."}},
)
async def version(served: CurrentModel, service: ServiceDep) -> Response:
    return JSONResponse({**served.describe(), "model_uri": service.follower.model_uri})


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(service: ServiceDep) -> Response:
    return Response(service.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
