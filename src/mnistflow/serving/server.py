"""Run the service: load the model (failing fast with one sentence), then start uvicorn, in
this process or in ``workers`` processes that share the port."""

from __future__ import annotations

import dataclasses
import gc
import logging
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import threading
from typing import Any

import uvicorn
from fastapi import FastAPI

from mnistflow.config import MnistflowError
from mnistflow.serving.app import create_app
from mnistflow.serving.model import ModelFollower
from mnistflow.serving.settings import ServeConfig
from mnistflow.store.checks import resolve_tracking_uri

log = logging.getLogger(__name__)

# prometheus_client's multiprocess mode: each worker writes its metrics to files here and
# /metrics, whichever worker answers it, adds them all up (serving/metrics.py).
METRICS_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


def run(config: ServeConfig) -> None:
    """Serve until interrupted; raises MnistflowError when the model cannot be loaded."""
    config = dataclasses.replace(config, tracking_uri=resolve_tracking_uri(config.tracking_uri))
    log_to_stderr(config)
    log.info("%s", config)
    # Loaded before the server starts, so a wrong URI is one clear error, not a dead server
    # (with workers, each loads its own copy; this one only proves that it loads).
    app = serving_app(config)
    if config.workers == 1:
        uvicorn.run(app, **uvicorn_options(config))
        return
    del app
    run_workers(config)


def uvicorn_options(config: ServeConfig) -> dict[str, Any]:
    return {
        "host": config.host,
        "port": config.port,
        # "auto" picks uvloop and httptools (uvicorn[standard]): measured faster than
        # asyncio and h11 for small requests.
        "loop": "auto",
        "http": "auto",
        "access_log": config.access_log,
        "log_level": config.log_level,
    }


def log_to_stderr(config: ServeConfig) -> None:
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def run_workers(config: ServeConfig) -> None:
    """config.workers processes, each listening on the port with a socket of its own, started
    again when one dies; until SIGINT or SIGTERM, which each worker gets to finish its
    requests.

    Why not uvicorn's --workers: its workers share one listening socket, and whichever is
    idle when the connections come in accepts most of them (47 and 17, then 1 and 63 of
    wrk's 64 connections, in two runs by hand), so one worker did the work of two. Sockets
    of their own with SO_REUSEPORT let the kernel spread the connections between them.
    """
    reserve_port(config)
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no copied threads
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())

    def start() -> tuple[Any, Any]:
        # The config goes as the process's argument (pickled through a pipe), key included:
        # neither the command line nor the environment of the workers shows it.
        listening = spawn.Event()
        worker = spawn.Process(
            target=serve_worker, args=(config, listening), name="mnistflow-worker"
        )
        worker.start()
        return worker, listening

    with tempfile.TemporaryDirectory(prefix="mnistflow-metrics-") as metrics:
        os.environ[METRICS_VARIABLE] = metrics  # read by each worker as it starts
        workers = [start() for _ in range(config.workers)]
        try:
            while not stop.wait(0.5):
                for i, (worker, listening) in enumerate(workers):
                    if worker.is_alive():
                        continue
                    if not listening.is_set():  # it would fail again
                        raise MnistflowError(
                            f"a server worker exited with {worker.exitcode} while starting; "
                            "its log is above."
                        )
                    log.error("worker %s exited with %s; starting another", worker.pid,
                              worker.exitcode)  # fmt: skip
                    workers[i] = start()
        finally:
            for worker, _ in workers:
                worker.terminate()  # SIGTERM: uvicorn finishes the requests in flight
            for worker, _ in workers:
                worker.join(30)
                if worker.is_alive():
                    worker.kill()


def reserve_port(config: ServeConfig) -> None:
    """Fail now, with one sentence, when the workers could not listen on the port."""
    try:
        listening_socket(config).close()
    except OSError as e:
        message = f"cannot listen on {config.host}:{config.port} ({e.strerror})."
        raise MnistflowError(message) from None


def listening_socket(config: ServeConfig) -> socket.socket:
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((config.host, config.port))
    return sock


def serve_worker(config: ServeConfig, listening: Any) -> None:
    """One worker process: its own model, then its own socket on the port (and listening
    set: the worker started)."""
    log_to_stderr(config)
    app = serving_app(config)
    sock = listening_socket(config)
    sock.listen(2048)
    listening.set()
    uvicorn.Server(uvicorn.Config(app, **uvicorn_options(config))).run(sockets=[sock])


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
    if app.state.service.batcher.model_thread is not None:
        set_switch_interval()
    return app


def set_switch_interval() -> None:
    """For a model computing in a thread of its own (batching.py): a thread wanting the GIL
    waits a whole switch interval (5 ms by default) before it may claim it from a busy one,
    so each model call's answer, and each request read during a model call, could wait 5 ms.
    At 0.1 ms: 3,400 against 2,700 requests/s at concurrency 16, 3,900 against 3,500 at 64
    (one fast model, wrk on loopback, this project's 2-core host)."""
    sys.setswitchinterval(1e-4)
