"""Run the service: load the model (failing fast with one sentence), then start uvicorn, in
this process or in ``workers`` processes that share the port."""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import sys
import tempfile
from typing import Any

import uvicorn
from fastapi import FastAPI

from mnistflow.serving.app import create_app
from mnistflow.serving.model import ModelFollower
from mnistflow.serving.settings import ServeConfig
from mnistflow.store.checks import resolve_tracking_uri

log = logging.getLogger(__name__)

# How the serving process hands its config to its workers (the API key goes apart, in the
# variable the CLI reads it from, so that the config's JSON never holds it).
CONFIG_VARIABLE = "MNISTFLOW_SERVE_CONFIG"
KEY_VARIABLE = "MNISTFLOW_API_KEY"
# prometheus_client's multiprocess mode: each worker writes its metrics to files here and
# /metrics, whichever worker answers it, adds them all up (serving/metrics.py).
METRICS_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


def run(config: ServeConfig) -> None:
    """Serve until interrupted; raises MnistflowError when the model cannot be loaded."""
    config = dataclasses.replace(config, tracking_uri=resolve_tracking_uri(config.tracking_uri))
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    log.info("%s", config)
    # Loaded before the server starts, so a wrong URI is one clear error, not a dead server
    # (with workers, each loads its own copy; this one only proves that it loads).
    app = serving_app(config)
    options: dict[str, Any] = {
        "host": config.host,
        "port": config.port,
        # "auto" picks uvloop and httptools (uvicorn[standard]): measured faster than
        # asyncio and h11 for small requests.
        "loop": "auto",
        "http": "auto",
        "access_log": config.access_log,
        "log_level": config.log_level,
    }
    if config.workers == 1:
        uvicorn.run(app, **options)
        return
    del app
    # uvicorn starts each worker as a new Python process (spawn) that imports worker_app.
    fields = dataclasses.asdict(config)
    del fields["api_key"]
    os.environ[CONFIG_VARIABLE] = json.dumps(fields)
    if config.api_key is not None:
        os.environ[KEY_VARIABLE] = config.api_key
    with tempfile.TemporaryDirectory(prefix="mnistflow-metrics-") as metrics:
        os.environ[METRICS_VARIABLE] = metrics
        factory = f"{__name__}:worker_app"
        uvicorn.run(factory, factory=True, workers=config.workers, **options)


def worker_app() -> FastAPI:
    """One worker's app (uvicorn calls this in each worker process)."""
    fields = json.loads(os.environ[CONFIG_VARIABLE])
    config = ServeConfig(**fields, api_key=os.environ.get(KEY_VARIABLE))
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return serving_app(config)


def serving_app(config: ServeConfig) -> FastAPI:
    """The app, its model loaded, and the process tuned for serving it."""
    follower = ModelFollower(
        config.model_uri,
        tracking_uri=resolve_tracking_uri(config.tracking_uri),
        poll_seconds=config.poll_seconds,
        retry_failed_seconds=config.retry_failed_seconds,
    )
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
    return app
