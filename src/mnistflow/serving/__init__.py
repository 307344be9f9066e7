"""Serve the registered model over HTTP, following its alias as it moves.

    mnistflow serve                       # models:/mnist@champion on 127.0.0.1:8000
    create_app(ServeConfig(...))          # the ASGI app, for tests or another server

Endpoints: POST /predict (JSON pixels or image uploads), POST /invocations (the protocol
of `mlflow models serve`), GET /health, /ready, /version, /metrics, /docs, and the
draw-a-digit page at /.

Imports config, store (the tracking URI), lifecycle (the registry, the pixel check) and
inference.preprocess; cli/ above starts it. It needs no training code and no tracking.py.
"""

from mnistflow.serving.app import create_app
from mnistflow.serving.server import run
from mnistflow.serving.settings import ServeConfig

__all__ = ["ServeConfig", "create_app", "run"]
