"""The one place that talks to MLflow tracking: a run is a context the trainer reports to.

    with TrackedRun(TrackingConfig(...)) as run:
        run.log_config(...); run.log_datasets(...)
        fit(config, train, val, reporter=run)
        run.log_test(...); run.log_artifacts_dir(...)

Per-step metrics arrive in blocks (see train.fit) and go to the store in one log_batch
call per block; with async logging that call only enqueues, so training never waits on the
store. Leaving the context flushes the queue and ends the run FINISHED, KILLED (Ctrl-C)
or FAILED.
"""

from __future__ import annotations

import os
import platform
import warnings
from collections.abc import Mapping, Sequence
from importlib.metadata import version
from pathlib import Path
from types import TracebackType
from typing import Any

import mlflow
from mlflow.data.numpy_dataset import from_numpy
from mlflow.entities import Metric, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import mnistflow
from mnistflow.config import MnistflowError, TrackingConfig
from mnistflow.data import DATASET_DIGEST, MnistSplits
from mnistflow.reporting import Reporter


def resolve_tracking_uri(uri: str | None) -> str:
    """The tracking URI in force: the given one, else MLFLOW_TRACKING_URI, else MLflow's default."""
    if uri:
        mlflow.set_tracking_uri(uri)
    return str(mlflow.get_tracking_uri())


def check_reachable(uri: str) -> None:
    """Fail fast with one sentence when the store cannot be used, instead of minutes of retries."""
    if uri.startswith(("http://", "https://")):
        import requests  # a dependency of MLflow

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=5)
        except requests.RequestException as e:
            raise MnistflowError(
                f"Cannot reach the MLflow tracking server at {uri} ({type(e).__name__}); start it "
                "or point --tracking-uri / MLFLOW_TRACKING_URI elsewhere."
            ) from e
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).expanduser().resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise MnistflowError(
                f"Cannot create the MLflow store {uri}: {folder} is not a writable folder."
            )


def git_state() -> tuple[str, bool | None]:
    """(commit, dirty) of the repository holding this code; ("unknown", None) outside git."""
    try:
        import git  # GitPython, a dependency of MLflow

        repo = git.Repo(Path(__file__).resolve().parent, search_parent_directories=True)
        return repo.head.commit.hexsha, repo.is_dirty(untracked_files=False)
    except Exception:  # not a checkout, no git binary, or an empty repository
        return "unknown", None


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), inner, out)
    else:
        out[prefix] = value


class TrackedRun(Reporter):
    """An MLflow run as a context manager and a training Reporter."""

    def __init__(self, config: TrackingConfig) -> None:
        self.config = config
        self.client = MlflowClient()
        self.tracking_uri = ""
        self.run_id = ""
        self.experiment_id = ""
        self.synchronous = not config.async_logging

    # -- the run's life -------------------------------------------------------------------

    def __enter__(self) -> TrackedRun:
        self.tracking_uri = resolve_tracking_uri(self.config.tracking_uri)
        check_reachable(self.tracking_uri)
        self.client = MlflowClient(self.tracking_uri)
        if self.config.async_logging:
            # Let MLflow's queue merge the blocks it holds into fewer store writes (one HTTP
            # request per second instead of one per block against a server). A user's own
            # setting wins.
            os.environ.setdefault("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", "1")
        if self.config.system_metrics:
            mlflow.set_system_metrics_sampling_interval(self.config.system_metrics_interval)
            mlflow.set_system_metrics_samples_before_logging(1)
        try:
            experiment = mlflow.set_experiment(self.config.experiment)
            run = mlflow.start_run(
                run_id=self.config.run_id,
                run_name=self.config.run_name,
                description=self.config.description,
                log_system_metrics=self.config.system_metrics,
            )
        except MlflowException as e:
            raise MnistflowError(
                f"MLflow refused to start a run in experiment {self.config.experiment!r} at "
                f"{self.tracking_uri}: {e.message}"
            ) from e
        self.experiment_id = experiment.experiment_id
        self.run_id = run.info.run_id
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            status = RunStatus.FINISHED
        elif issubclass(exc_type, KeyboardInterrupt):
            status = RunStatus.KILLED
        else:
            status = RunStatus.FAILED
        try:
            # Every queued metric is written before the run is marked ended.
            mlflow.flush_async_logging()
        finally:
            mlflow.end_run(RunStatus.to_string(status))

    @property
    def artifact_uri(self) -> str:
        return str(mlflow.get_artifact_uri())

    # -- what is known before training -----------------------------------------------------

    def log_config(self, resolved: Mapping[str, Any], config_file: Path) -> None:
        """The resolved config: the preset alone, every value as a param, the whole as JSON."""
        mlflow.log_param("preset", resolved["train"]["preset"])
        flat: dict[str, Any] = {}
        _flatten("", {k: v for k, v in resolved.items() if k != "tracking"}, flat)
        flat.pop("train.preset", None)
        mlflow.log_params(flat)
        self.log_file(config_file)

    def log_file(self, path: Path, artifact_path: str | None = None) -> None:
        try:
            mlflow.log_artifact(str(path), artifact_path=artifact_path)
        except (OSError, MlflowException) as e:
            raise MnistflowError(
                f"Cannot write artifacts to {self.artifact_uri} ({e}); make it writable or set "
                "another artifact location for the experiment."
            ) from e

    def log_folder(self, folder: Path, artifact_path: str) -> None:
        try:
            mlflow.log_artifacts(str(folder), artifact_path=artifact_path)
        except (OSError, MlflowException) as e:
            raise MnistflowError(f"Cannot write artifacts to {self.artifact_uri} ({e}).") from e

    def set_tags(self, preset: str, device: str, user_tags: Mapping[str, str]) -> None:
        """Automatic tags that say how the run was made, then the user's own."""
        commit, dirty = git_state()
        mlflow.set_tag("preset", preset)
        mlflow.set_tags(
            {
                "device": device,
                "git_commit": commit,
                "git_dirty": "unknown" if dirty is None else str(dirty).lower(),
                "dataset_digest": DATASET_DIGEST,
                "torch_version": version("torch"),
                "mlflow_version": mlflow.__version__,
                "mnistflow_version": mnistflow.__version__,
                "python_version": platform.python_version(),
                **user_tags,
            }
        )

    def log_datasets(self, splits: MnistSplits) -> None:
        """Dataset lineage: one input per split, with its digest, source and context."""
        for split in (splits.train, splits.val, splits.test):
            with warnings.catch_warnings():
                # MLflow registers local paths under two schemes ("" and "file") and warns that
                # a folder matches both; they are the same source type.
                warnings.filterwarnings("ignore", "The specified dataset source can be interpreted")
                dataset = from_numpy(
                    features=split.images.numpy(),
                    targets=split.labels.numpy(),
                    source=splits.source,
                    name=f"mnist-{split.name}",
                    digest=split.digest,
                )
            mlflow.log_input(dataset, context=split.name, tags={"split": split.name})

    # -- Reporter: what training sends -----------------------------------------------------

    def log_steps(
        self, first_step: int, series: Mapping[str, Sequence[float]], timestamps_ms: Sequence[int]
    ) -> None:
        # One log_batch per block of steps (MLflow's fluent log_metric would be one store
        # write per value); the async queue makes the call return at once.
        metrics = [
            Metric(key, float(value), timestamps_ms[i], first_step + i)
            for key, values in series.items()
            for i, value in enumerate(values)
        ]
        self.client.log_batch(self.run_id, metrics=metrics, synchronous=self.synchronous)

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        renamed = {("epoch_" + k if k.startswith("train_") else k): v for k, v in metrics.items()}
        mlflow.log_metrics(renamed, step=epoch, synchronous=self.synchronous)

    # -- what is known after training ------------------------------------------------------

    def log_results(
        self, test_accuracy: float, metrics: Mapping[str, float], model_id: str | None = None
    ) -> None:
        """Final metrics: the headline one alone, the rest (macro-F1, per class, times) at once.

        With model_id they are also linked to the logged model, so MLflow's model views
        show them.
        """
        mlflow.log_metric(
            "test_accuracy", test_accuracy, synchronous=self.synchronous, model_id=model_id
        )
        self.log_metrics(metrics, model_id)

    def log_metrics(self, metrics: Mapping[str, float], model_id: str | None = None) -> None:
        mlflow.log_metrics(dict(metrics), synchronous=self.synchronous, model_id=model_id)
