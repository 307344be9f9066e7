"""The model being served, and the follower that swaps it when its registry alias moves.

A request takes ``follower.current`` once and uses that object to the end, so a swap is a
single attribute assignment: requests already running finish on the old model, new ones get
the new model, and nothing waits on a lock. A version that fails to load never replaces the
one serving; the failure is kept in ``last_error`` for /ready and logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from mnistflow.config import MnistflowError
from mnistflow.lifecycle.registry import describe_models, parse_registry_uri

log = logging.getLogger(__name__)


class Classifier(Protocol):
    """What the served pyfunc unwraps to (classifier_model.MnistClassifier)."""

    def classify(self, data: Any) -> tuple[np.ndarray, np.ndarray]:
        """Labels (N,) and probabilities (N, 10); raises ValueError for unusable pixels."""
        ...


@dataclass(frozen=True)
class ServedModel:
    """One loaded model and where it came from; never changed, only replaced whole."""

    name: str
    version: str | None  # None when the URI is not a registry version (runs:/..., a path)
    run_id: str | None
    source: str  # what was loaded
    classifier: Classifier

    @property
    def abstain_below(self) -> float | None:
        """The model's abstain threshold; None for a model logged without one."""
        below = getattr(self.classifier, "abstain_below", None)
        return None if below is None else float(below)

    def describe(self) -> dict[str, str | None]:
        return {"name": self.name, "version": self.version, "run_id": self.run_id}


@dataclass(frozen=True)
class LoadFailure:
    """The last version that could not be resolved or loaded, for /ready and the log."""

    version: str | None
    message: str
    at: str  # when, in ISO 8601 (UTC), for people
    monotonic: float  # when, by time.monotonic(), for the retry delay


@dataclass(frozen=True)
class Target:
    """A model the URI names right now."""

    name: str
    version: str | None
    run_id: str | None
    source: str


def load_pyfunc(source: str) -> Classifier:
    """Load an mnistflow pyfunc model and check that it classifies."""
    classifier = mlflow.pyfunc.load_model(source).unwrap_python_model()
    if not callable(getattr(classifier, "classify", None)):
        raise TypeError(f"{type(classifier).__name__} is not an mnistflow classifier")
    # One digit through the network before it takes traffic: ONNX Runtime's first run is
    # slow, and a model that cannot predict is refused here rather than on a request.
    classifier.classify(np.zeros((1, 28, 28), dtype=np.float32))
    return classifier  # type: ignore[no-any-return]


class ModelFollower:
    """Holds the served model; for an alias URI, polls the registry and swaps on a move."""

    def __init__(
        self,
        model_uri: str,
        tracking_uri: str,
        poll_seconds: float = 5.0,
        retry_failed_seconds: float = 60.0,
        loader: Callable[[str], Classifier] = load_pyfunc,
    ) -> None:
        self.model_uri = model_uri
        self.poll_seconds = poll_seconds
        self.retry_failed_seconds = retry_failed_seconds
        self.loader = loader
        # The registry lives in the tracking store, as everywhere in mnistflow. The URI is
        # passed explicitly so that nothing depends on MLflow's process-wide default.
        self.client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
        self.registry_ref = parse_registry_uri(model_uri)
        self.current: ServedModel | None = None
        self.last_error: LoadFailure | None = None
        self.loads = 0
        self.failures = 0

    @property
    def alias(self) -> str | None:
        return self.registry_ref[2] if self.registry_ref else None

    def resolve(self) -> Target:
        """The model the URI names now (for an alias: the version it points at)."""
        if self.registry_ref is None:
            return Target(self.model_uri, None, None, self.model_uri)
        name, version, alias = self.registry_ref
        mv = (
            self.client.get_model_version_by_alias(name, alias)
            if alias
            else self.client.get_model_version(name, str(version))
        )
        # The storage location, not models:/..., because MLflow resolves models:/ URIs
        # against its process-wide registry rather than this client's.
        source = self.client.get_model_version_download_uri(name, mv.version)
        return Target(name, str(mv.version), mv.run_id, source)

    def load(self, target: Target) -> ServedModel:
        classifier = self.loader(target.source)
        return ServedModel(target.name, target.version, target.run_id, target.source, classifier)

    def start(self) -> ServedModel:
        """Load what the URI names now, or raise MnistflowError saying what the registry has."""
        try:
            served = self.load(self.resolve())
        except Exception as e:
            try:
                known = describe_models(self.client)
            except Exception:
                known = "the registry could not be listed either"
            raise MnistflowError(
                f"Cannot load the model {self.model_uri} ({_reason(e)}); the registry has: {known}."
            ) from e
        self._switch(served)
        return served

    def refresh(self) -> ServedModel | None:
        """One poll: load the version the URI names now if it is not the one serving.

        Returns the newly served model, or None when nothing changed. Never raises: any
        failure leaves the current model serving and is kept in last_error.
        """
        try:
            target = self.resolve()
        except Exception as e:
            self._fail(None, f"cannot resolve {self.model_uri}: {_reason(e)}")
            return None
        current = self.current
        if current is not None and current.version == target.version:
            self.last_error = None  # e.g. rolled back from a broken version: all is well
            return None
        failed = self.last_error
        if (
            failed is not None
            and failed.version == target.version
            and time.monotonic() - failed.monotonic < self.retry_failed_seconds
        ):
            return None
        try:
            served = self.load(target)
        except Exception as e:
            self._fail(
                target.version,
                f"version {target.version} failed to load from {target.source}: {_reason(e)}",
            )
            return None
        self._switch(served)
        return served

    async def follow(self) -> None:
        """Poll until cancelled (alias URIs), or until a first model is loaded (others).

        Loading runs in a worker thread, so the event loop keeps answering meanwhile.
        """
        while self.alias is not None or self.current is None:
            await asyncio.to_thread(self.refresh)
            await asyncio.sleep(self.poll_seconds)

    def _switch(self, served: ServedModel) -> None:
        previous = self.current
        # The swap itself: one assignment, atomic under the GIL. A request holding the old
        # object finishes with it; the old ONNX session is freed when the last one ends.
        self.current = served
        self.last_error = None
        self.loads += 1
        log.info(
            "serving %s version %s (run %s)%s",
            served.name,
            served.version,
            served.run_id,
            f", replacing version {previous.version}" if previous else "",
        )

    def _fail(self, version: str | None, message: str) -> None:
        repeated = self.last_error is not None and self.last_error.message == message
        now = datetime.now(UTC).isoformat(timespec="seconds")
        self.last_error = LoadFailure(version, message, now, time.monotonic())
        self.failures += 1
        serving = self.current.version if self.current else None
        # Logged once per distinct failure, not on every poll while it lasts.
        if not repeated:
            log.warning("%s; still serving version %s", message, serving)


def _reason(e: Exception) -> str:
    """An exception as a short phrase: MLflow's message, or the type and text."""
    text = str(getattr(e, "message", None) or e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]
