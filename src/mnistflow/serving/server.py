"""Run the service: load the model (failing fast with one sentence), then start uvicorn."""

from __future__ import annotations

import gc
import logging
import sys

import uvicorn

from mnistflow.serving.app import create_app
from mnistflow.serving.model import ModelFollower
from mnistflow.serving.settings import ServeConfig
from mnistflow.store.checks import resolve_tracking_uri

log = logging.getLogger(__name__)


def run(config: ServeConfig) -> None:
    """Serve until interrupted; raises MnistflowError when the model cannot be loaded."""
    tracking_uri = resolve_tracking_uri(config.tracking_uri)
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    log.info("%s (tracking URI %s)", config, tracking_uri)
    follower = ModelFollower(
        config.model_uri,
        tracking_uri=tracking_uri,
        poll_seconds=config.poll_seconds,
        retry_failed_seconds=config.retry_failed_seconds,
    )
    # Loaded before the server starts, so a wrong URI is one clear error, not a dead server.
    follower.start()
    app = create_app(config, follower)
    # What is loaded by now (MLflow, pandas, ONNX Runtime: a million objects) lives as long
    # as the process: frozen out of the garbage collector's reach, a full collection scans
    # only what requests make. Without it, each full collection paused the server for over
    # 100 ms, and the requests in flight during one set the p99 (measured at concurrency 16
    # with micro-batching, whose waiting requests are promoted to the old generation).
    gc.freeze()
    # The model computes in a thread of its own (batching.py). A thread wanting the GIL
    # waits a whole switch interval (5 ms by default) before it may claim it from a busy
    # one, so each model call's answer, and each request read during a model call, could
    # wait 5 ms. At 0.1 ms: 3,400 against 2,700 requests/s at concurrency 16, 3,900 against
    # 3,500 at 64 (one fast model, wrk on loopback, this project's 2-core host).
    sys.setswitchinterval(1e-4)
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        # "auto" picks uvloop and httptools (uvicorn[standard]): measured faster than
        # asyncio and h11 for small requests.
        loop="auto",
        http="auto",
        access_log=config.access_log,
        log_level=config.log_level,
    )
