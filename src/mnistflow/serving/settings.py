"""What the server is told: one frozen config, filled by the CLI from flags and environment."""

from __future__ import annotations

from dataclasses import dataclass, field

from mnistflow.config import CHAMPION, MODEL_NAME


@dataclass(frozen=True)
class ServeConfig:
    """How `mnistflow serve` listens, what it serves, and what it refuses."""

    host: str = "127.0.0.1"
    port: int = 8000
    # An alias URI (models:/<name>@<alias>) is followed as the alias moves; any other URI
    # that MLflow can load (models:/<name>/<version>, runs:/..., a path) is served as is.
    model_uri: str = f"models:/{MODEL_NAME}@{CHAMPION}"
    # When set, /predict and /invocations need it (X-API-Key or Authorization: Bearer).
    # Kept out of repr() so that logging the config never logs the key.
    api_key: str | None = field(default=None, repr=False)
    poll_seconds: float = 5.0
    tracking_uri: str | None = None
    # Larger bodies get 413 before they are read whole; 1 MB holds ~250 digits as JSON.
    max_body_bytes: int = 1_000_000
    max_images: int = 128
    # Micro-batching (serving/batching.py): the most digits in one model call, and how long
    # a request may wait for others to share its call (0: only those that came in together).
    max_batch: int = 64
    batch_wait_ms: float = 0.0
    # A version that failed to load is tried again after this long (the alias may have
    # pointed at it before its artifacts were uploaded).
    retry_failed_seconds: float = 60.0
    # Server processes sharing the port, each with its own copy of the model and its own
    # micro-batcher: on a machine whose cores one process cannot keep busy.
    workers: int = 1
    # uvicorn's per-request access log costs measurable throughput; off unless asked for.
    access_log: bool = False
    log_level: str = "info"
