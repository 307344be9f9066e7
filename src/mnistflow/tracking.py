"""The one place that talks to MLflow tracking: a run is a context the trainer reports to.

    with TrackedRun(TrackingConfig(...)) as run:
        run.log_config(...); run.log_datasets(...)
        fit(config, train, val, reporter=run)
        run.log_results(...); run.log_folder(...)

Before a run starts, the store is checked (store.checks.use_store) and the experiment marked
as model training for the MLflow UI (store.experiments.use_experiment).

Per-step metrics arrive in blocks (see engines.plain.fit) and go to the store in one log_batch
call per block; with async logging that call only enqueues, so training never waits on the
store. Leaving the context flushes the queue and ends the run FINISHED, KILLED (Ctrl-C)
or FAILED.
"""

from __future__ import annotations

import os
import platform
import time
import warnings
from collections.abc import Mapping, Sequence
from importlib.metadata import version
from pathlib import Path
from types import TracebackType
from typing import Any

import mlflow
from mlflow.data.numpy_dataset import from_numpy
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import mnistflow
from mnistflow.config import FAILURE_TAG, MnistflowError, TrackingConfig
from mnistflow.data import DATASET_DIGEST, MnistSplits
from mnistflow.reporting import Reporter
from mnistflow.spool.copier import SyncResult
from mnistflow.spool.session import Session
from mnistflow.spool.targets import spools
from mnistflow.store.checks import resolve_tracking_uri, use_store
from mnistflow.store.experiments import project_run_id, use_experiment
from mnistflow.store.uris import redact


def git_state() -> tuple[str, bool | None]:
    """(commit, dirty) of the repository holding this code; ("unknown", None) outside git."""
    try:
        import git  # GitPython, a dependency of MLflow

        repo = git.Repo(Path(__file__).resolve().parent, search_parent_directories=True)
        return repo.head.commit.hexsha, repo.is_dirty(untracked_files=False)
    except Exception:  # not a checkout, no git binary, or an empty repository
        return "unknown", None


def fail_project_run(reason: str) -> None:
    """End the MLflow Project's run as FAILED with the reason, when it failed before starting.

    Without this the run would only be marked FAILED by the `mlflow run` parent, with no
    word of why.
    """
    run_id = project_run_id()
    if run_id is None:
        return
    try:
        client = MlflowClient()
        client.set_tag(run_id, FAILURE_TAG, redact(reason)[:5000])
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
    except MlflowException:
        pass  # the store itself is what failed; the parent still marks the run FAILED


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), inner, out)
    else:
        out[prefix] = value


def _uri_set_here() -> str | None:
    """The tracking URI this process set (mlflow.set_tracking_uri); None when it set none, so
    that MLFLOW_TRACKING_URI or MLflow's default is in force. MLflow keeps it in a module
    global with no public getter; mlflow.get_tracking_uri() cannot tell the two apart, and
    setting what it returns would pin the environment's URI for later runs in this process."""
    from mlflow.tracking._tracking_service import utils

    uri = getattr(utils, "_tracking_uri", None)
    return str(uri) if uri is not None else None


class TrackedRun(Reporter):
    """An MLflow run as a context manager and a training Reporter."""

    def __init__(self, config: TrackingConfig) -> None:
        self.config = config
        # Built in __enter__, once the requested store is known: a client built now would
        # open (and create) the default ./mlflow.db.
        self.client: MlflowClient
        self.tracking_uri = ""
        self.run_id = ""
        self.experiment_id = ""
        self.synchronous = not config.async_logging

    # -- the run's life -------------------------------------------------------------------

    def __enter__(self) -> TrackedRun:
        self.tracking_uri = resolve_tracking_uri(self.config.tracking_uri)
        # Put back once a spooled run is through (it points MLflow at the spool meanwhile).
        self._uri_before = (_uri_set_here(), os.environ.get("MLFLOW_TRACKING_URI"))
        self.spooled: Session | None = None
        self.sync_result: SyncResult | None = None
        experiment = self.config.experiment
        project_run = None
        # A sweep's trials nest under (or reopen) runs in the store itself: they are
        # logged there directly, not spooled.
        nested = self.config.parent_run_id or self.config.resume_run_id
        if spools(self.tracking_uri) and not nested:
            # Training writes only to the local spool; the store gets a copy (spool/).
            self.spooled = Session(self.tracking_uri, self.config.require_server)
            # The run an MLflow Project started on the server is the one the copy completes;
            # the spool's run is a new one in the spool store.
            project_run = os.environ.pop("MLFLOW_RUN_ID", None)
            if project_run and self.spooled.server_up:
                experiment = self.spooled.experiment_of(project_run)
            mlflow.set_tracking_uri(self.spooled.uri)
            self.client = MlflowClient(self.spooled.uri)
        else:
            use_store(self.config.tracking_uri, create=True)
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
            # Under an MLflow Project the project's run and experiment win over ours.
            use_experiment(experiment)
            run = mlflow.start_run(
                run_id=self.config.resume_run_id,
                run_name=self.config.run_name,
                description=self.config.description,
                log_system_metrics=self.config.system_metrics,
                parent_run_id=self.config.parent_run_id,
            )
        except MlflowException as e:
            raise MnistflowError(
                f"MLflow refused to start a run in experiment {self.config.experiment!r} at "
                f"{redact(self.tracking_uri)}: {redact(e.message)}"
            ) from e
        self.experiment_id = run.info.experiment_id
        self.run_id = run.info.run_id
        if self.spooled:
            try:
                self.spooled.attach(self.run_id, remote_run_id=project_run)
            except BaseException:
                # The store refused the run before training (see Session.attach).
                mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
                self.spooled.close()
                self._restore_uri()
                raise
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
            if status == RunStatus.FAILED and exc is not None:
                # An error may quote a URI with its login (MLflow's do): every reader sees this tag.
                mlflow.set_tag(FAILURE_TAG, redact(f"{type(exc).__name__}: {exc}")[:5000])
        except MlflowException:
            pass  # the store is what failed: ending the run below is all that is left
        try:
            # Every queued metric is written before the run is marked ended.
            mlflow.flush_async_logging()
        finally:
            mlflow.end_run(RunStatus.to_string(status))
        if self.spooled:
            self._restore_uri()
            # A run that failed or was interrupted is not worth a long wait for the server:
            # it stays in the spool for `mnistflow sync`.
            wait = self.config.wait_for_server_seconds
            self.sync_result = self.spooled.finish(wait if exc_type is None else min(wait, 5))

    def _restore_uri(self) -> None:
        """The tracking URI as it was before the run: the one this process set, and
        MLFLOW_TRACKING_URI (mlflow.set_tracking_uri sets or unsets it too)."""
        uri_set, environment = self._uri_before
        mlflow.set_tracking_uri(uri_set)  # type: ignore[arg-type]
        if environment is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = environment

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


class ParentRun:
    """A run driven through an explicit client and never made the active run: a sweep's
    parent, under which trials in other processes (or on other machines) nest by its id."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    @classmethod
    def start(cls, config: TrackingConfig) -> ParentRun:
        """A new RUNNING run in config.experiment (created when missing)."""
        uri = use_store(config.tracking_uri, create=True)
        client = MlflowClient(uri)
        try:
            experiment_id = use_experiment(config.experiment)
            tags = dict(config.tags)
            if config.description:
                tags["mlflow.note.content"] = config.description
            run = client.create_run(experiment_id, run_name=config.run_name, tags=tags)
        except MlflowException as e:
            raise MnistflowError(
                f"MLflow refused to start a run in experiment {config.experiment!r} at "
                f"{redact(uri)}: {redact(e.message)}"
            ) from e
        return cls(client, run.info.run_id)

    @classmethod
    def join(cls, tracking_uri: str | None, run_id: str) -> ParentRun:
        """An existing run, set RUNNING again (it may have ended with an earlier command)."""
        uri = use_store(tracking_uri, create=True)
        client = MlflowClient(uri)
        try:
            client.get_run(run_id)
        except MlflowException:
            raise MnistflowError(
                f"Run {run_id} is not in the tracking store {redact(uri)}; point --tracking-uri at "
                "the store this study was started with."
            ) from None
        client.update_run(run_id, status="RUNNING")
        return cls(client, run_id)

    @property
    def experiment_id(self) -> str:
        return str(self.client.get_run(self.run_id).info.experiment_id)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.client.log_batch(
            self.run_id, params=[Param(key, str(value)) for key, value in params.items()]
        )

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id,
            metrics=[Metric(key, float(value), now, step) for key, value in metrics.items()],
        )

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(
            self.run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()]
        )

    def log_folder(self, folder: Path, artifact_path: str) -> None:
        try:
            self.client.log_artifacts(self.run_id, str(folder), artifact_path)
        except (OSError, MlflowException) as e:
            raise MnistflowError(f"Cannot write artifacts of run {self.run_id} ({e}).") from e

    def end(self, status: str) -> None:
        """End the run FINISHED, KILLED or FAILED."""
        self.client.set_terminated(self.run_id, status)


def set_run_tags(run_id: str, tags: Mapping[str, Any]) -> None:
    """Tag a run, ended or not, through the tracking URI in force."""
    MlflowClient().log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])


def get_run(run_id: str) -> Any:
    """A run's record (info and data) through the tracking URI in force."""
    return MlflowClient().get_run(run_id)


def download_artifact(run_id: str, artifact_path: str, folder: Path) -> Path:
    """One artifact of a run, downloaded into folder."""
    return Path(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact_path, dst_path=str(folder)
        )
    )
