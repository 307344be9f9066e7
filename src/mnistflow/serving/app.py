"""The app factory: assembles the service from its routers, dependencies and error handlers.

app = create_app(ServeConfig(...))                 # loads and follows config.model_uri
app = create_app(config, model_source=follower)    # or serve a follower made elsewhere

routes/predict.py   POST /predict, /invocations
fast_path.py        the same routes' JSON requests, answered before the app's layers
routes/health.py    GET /health, /ready, /version, /metrics
routes/page.py      GET / and /static: the draw-a-digit page
deps.py             the service, the model serving now, the API key
errors.py           one JSON error shape: 4xx for the client's faults, 500 for ours
schemas.py          the documented request and response shapes
inputs.py           request bodies to pixels; the body size limit
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import mlflow
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from starlette.types import Receive, Scope, Send

import mnistflow
from mnistflow.serving import errors, fast_path
from mnistflow.serving.batching import MicroBatcher
from mnistflow.serving.deps import Service
from mnistflow.serving.inputs import BodyLimitMiddleware
from mnistflow.serving.metrics import Metrics, MetricsMiddleware
from mnistflow.serving.model import ModelFollower
from mnistflow.serving.routes import health, page, predict
from mnistflow.serving.settings import ServeConfig

DESCRIPTION = (
    "Classify handwritten digits with the model registered in MLflow. `/invocations` speaks "
    "the protocol of `mlflow models serve`; `/predict` also takes image uploads. The page at "
    "`/` lets you draw a digit."
)


class ServingApp(FastAPI):
    """The FastAPI app, but its JSON predictions are answered before FastAPI's own layers
    (fast_path.py says why)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        service = self.state.service
        if not await fast_path.answered(service, scope, receive, send):
            await super().__call__(scope, receive, send)


def create_app(config: ServeConfig, model_source: ModelFollower | None = None) -> FastAPI:
    """The service for config; model_source, when given, is served instead of loading
    config.model_uri (it is still polled, if it follows an alias, while the app runs)."""
    follower = model_source or ModelFollower(
        config.model_uri,
        tracking_uri=config.tracking_uri or mlflow.get_tracking_uri(),
        poll_seconds=config.poll_seconds,
        retry_failed_seconds=config.retry_failed_seconds,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Loads the model first if it is not loaded yet (/ready says 503 meanwhile), then
        # follows the alias until shutdown.
        task = asyncio.create_task(follower.follow())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        batcher.close()

    app = FastAPIOffline(
        title="mnistflow", version=mnistflow.__version__, description=DESCRIPTION, lifespan=lifespan
    )
    # FastAPIOffline is a function that builds a plain FastAPI (with docs that need no CDN);
    # ServingApp adds only __call__, so the object becomes one by its class alone.
    app.__class__ = ServingApp
    metrics = Metrics(follower)
    batcher = MicroBatcher(
        predict.classify,
        max_batch=config.max_batch,
        max_wait=config.batch_wait_ms / 1000,
        on_call=metrics.observe_model_call,
        # Several workers already share the cores: inline is faster there (batching.py).
        model_thread=config.workers == 1,
    )
    app.state.service = Service(config, follower, metrics, batcher)
    # The last added runs first: the metrics see every request, refused ones included.
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    errors.add_handlers(app)

    # The prediction routes go first and flat: Starlette tries the routes in order (FastAPI
    # put its docs routes first), and include_router (FastAPI 0.165) would nest them one
    # level down, which measurably slows every prediction.
    app.router.routes[:0] = predict.router(config).routes
    app.include_router(health.router)
    app.include_router(page.router)
    app.mount("/static", page.static_files(), name="static")
    return app
