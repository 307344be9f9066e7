"""Tracking that survives the store going away: a run meant for a tracking server, or for
an embedded store (sqlite:///...), is written to a local spool and copied to its store (the
target) by a forwarder thread, and later by `mnistflow sync`, exactly once.

The spool is an embedded MLflow store (sqlite + an artifact folder) under
$MNISTFLOW_SPOOL_DIR (default ~/.cache/mnistflow/spool). Training only ever writes to it,
so a server that restarts, hangs (SIGSTOP) or is gone, or a store whose disk fills up or
turns read-only, never makes training wait or fail.

Copying is idempotent, step by step, so a copy cut off anywhere is simply run again, and
nothing counts as copied until the target acknowledged it:
- the target's run is found by its tag ``mnistflow.spool_run_id`` before one is created (and
  found again after creating it: a create whose answer was lost may have landed meanwhile; a
  second one is deleted), and a run that had started on the target before an outage is
  completed there (same run);
- params and tags are set again with the same values (a no-op); dataset inputs are
  deduplicated by MLflow on (name, digest, context);
- metrics: the points the target acknowledged are remembered per key; after a request whose
  answer never came (it may have been applied late, by a hung server) the copier reads the
  target's histories back and sends only what they lack, so no store's own deduplication is
  relied on;
- artifacts are uploaded to the same paths (an overwrite) until the target lists each one with
  the spool's size;
- a logged model is created once, found again by its tag ``mnistflow.spool_model_id``; it
  counts as copied only once READY with every file of the spool's (a cut-off upload is redone
  and finalized);
- the registration a run asked for is made once, found again by its run and model, and
  completed where it stopped (the model's link, @challenger);
- at the end the target's metric histories are checked against the spool's (every key, system
  metrics included) before the run is ended there, marked done, and its spool files dropped.
One copier per run at a time: the training process holds the run's lock (a file lock the OS
releases when its holder dies) until its final copy is through, `mnistflow sync` takes it
before copying, and a RUNNING run whose lock nobody holds was left by a writer that died: sync
sends what it logged and ends it FAILED, saying so.

Why not mlflow-export-import: its import creates a NEW run (and new logged models) on every
import, so it can neither complete a run that had started on the server nor be repeated
without doubling; incremental copying while training runs is not what it is for either.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from filelock import FileLock, Timeout
from mlflow.entities import (
    DatasetInput,
    LoggedModelOutput,
    LoggedModelStatus,
    Metric,
    Param,
    RunStatus,
    RunTag,
)
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mnistflow.config import FAILURE_TAG, MnistflowError
from mnistflow.lifecycle import registry
from mnistflow.store import checks, experiments, remote
from mnistflow.store.uris import (
    is_embedded,
    is_remote,
    is_spool,
    redact,
    spool_dir,
    sqlite_path,
    target_uri,
)

log = logging.getLogger(__name__)

# Tags on spool runs (never copied to the server).
BOOKKEEPING = "mnistflow.sync."
TARGET = "mnistflow.sync.target"  # the tracking URI the run belongs to
REMOTE_RUN = "mnistflow.sync.remote_run_id"  # its run on the server, once there is one
DONE = "mnistflow.sync.done"  # "true" once the whole run is on the server
REGISTER_AS = "mnistflow.sync.register_as"  # the model name `--register` asked for
REGISTERED = "mnistflow.sync.registered_version"
# Tags on the server's runs and models: where they came from (how a repeat finds them).
SPOOL_RUN = "mnistflow.spool_run_id"
SPOOL_MODEL = "mnistflow.spool_model_id"
# The tags MLflow sets on a run from where it was started (see push_run_data).
CONTEXT = ("mlflow.source.", "mlflow.user", "mlflow.project.")
# The end of the failure reason a target's run gets while its copy waits (see _mark_failed).
KEPT = "The run is kept in the local spool; `mnistflow sync` completes it."

# How long one request to the server may take while spooling; MLflow's own default
# (120 s, with retries) would hold the forwarder for minutes on a hung server.
REQUEST_TIMEOUT_S = 10
# Seconds between the forwarder's copies: a server's UI shows the run 2 s behind training.
FORWARD_INTERVAL_S = 2.0
# Into an embedded store a copy round is this process's own work (about 0.15 s, reading the
# spool and writing the store), competing with training for the GIL and 2 cores, where a
# server's is mostly waiting on the network: every 2 s it slowed full-MNIST training by
# 0.3-0.9 s of 4.5-6 s (5 interleaved rounds, each slower). Every 10 s the local UI still
# shows a live run and the cost is lost in the noise.
FORWARD_INTERVAL_EMBEDDED_S = 10.0


def spool_uri(folder: Path | None = None) -> str:
    """The spool store's URI; the store is made (whole) when it does not exist yet."""
    folder = folder or spool_dir()
    path = folder.resolve() / "spool.db"
    uri = f"sqlite:///{path}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            checks.create_sqlite_store(path)
    except Exception as e:
        if reason := remote.store_sentence(e, uri):
            raise MnistflowError(reason) from e
        raise
    return uri


def spools(uri: str) -> bool:
    """Whether a run for uri goes through the spool: runs for a tracking server or an
    embedded store do, so one code path (autolog, artifacts and models included) survives
    either going away; the spool itself and other databases are written directly."""
    return is_remote(uri) or (is_embedded(uri) and not is_spool(uri))


def recorded_target(uri: str) -> str:
    """uri as the spool records it (its TARGET tag): target_uri's, without a password or a
    token (see uris.redact): the spool keeps no secret. `mnistflow sync` logs in again with
    MLFLOW_TRACKING_USERNAME/PASSWORD, or with the whole URI given to --tracking-uri."""
    return redact(target_uri(uri))


def connect_uri(recorded: str, given: str | None = None) -> str:
    """The URI sync connects to for a run recorded for `recorded`: the one given (its login
    included) when it is that store, else the recorded one without its hidden login, so that
    MLflow's own credentials (MLFLOW_TRACKING_USERNAME/PASSWORD) apply."""
    if given and recorded_target(given) == recorded:
        return target_uri(given)
    return re.sub(r"//[^/@\s]*:\*\*\*@", "//", recorded)


def open_target(target: str) -> MlflowClient:
    """A client of target. An embedded store is checked first (StoreUnwritable when it cannot
    be written) and made whole when it does not exist: MlflowClient would create it on the
    spot, step by step, and a full disk would leave it half-made."""
    path = sqlite_path(target)
    if path is not None:
        checks.check_writable(target)
        if not path.exists():
            checks.create_sqlite_store(path)
    return MlflowClient(target, registry_uri=target)


def outage_reason(error: BaseException, target: str) -> str:
    """One sentence for an outage of target (see remote.is_outage)."""
    if is_embedded(target):
        return remote.store_sentence(error, target) or f"The MLflow store {target} failed: {error}"
    return redact(
        remote.sentence(error, target)
        or f"The tracking server at {target} did not answer ({type(error).__name__})."
    )


class _HandledStoreErrors(logging.Filter):
    """Drops MLflow's own log of a SQLite error that is an unwritable store (it logs each
    with its traceback, then raises it): we say it once, in one sentence."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        errors = [a for a in args if isinstance(a, BaseException)]
        if record.exc_info and record.exc_info[1] is not None:
            errors.append(record.exc_info[1])
        return not any(remote.unwritable(e) for e in errors)


def quiet_store_errors() -> None:
    """Install _HandledStoreErrors on MLflow's database logger (once per process)."""
    logger = logging.getLogger("mlflow.store.db.utils")
    if not any(isinstance(f, _HandledStoreErrors) for f in logger.filters):
        logger.addFilter(_HandledStoreErrors())


def auth_problem(error: BaseException, target: str) -> str | None:
    """One sentence when the server refused our login (not an outage: retrying won't help)."""
    if not remote.is_login_refused(error):
        return None
    return remote.sentence(error, target)


@contextlib.contextmanager
def short_requests(timeout: int = REQUEST_TIMEOUT_S) -> Iterator[None]:
    """Requests to the server fail fast (we retry on our own schedule, not MLflow's)."""
    settings = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        # Copying a model's files is no download a person waits on: no progress bars.
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class SyncResult:
    spool_run_id: str
    target: str
    remote_run_id: str | None = None
    complete: bool = False
    registered_version: str | None = None
    error: str | None = None
    models: dict[str, str] = field(default_factory=dict)  # spool model id -> server model id
    note: str | None = None  # what sync did beyond copying (a dead writer's run ended)


class CopyIncomplete(MnistflowError):
    """The target does not hold the whole run yet after a copy; the next copy sends the rest."""


# A metric point as compared between the spool and the target: (step, timestamp, value),
# NaN as a string (nan != nan would make every NaN point look missing).
Point = tuple[int, int, "float | str"]


def _point(metric: Metric) -> Point:
    value = metric.value
    return (metric.step, metric.timestamp, "nan" if math.isnan(value) else value)


def _unlinked(metric: Metric) -> Metric:
    """metric for the run's history alone (its link to a model is the spool's model's)."""
    return Metric(metric.key, metric.value, metric.timestamp, metric.step)


def _missing(history: list[Metric], have: Counter[Point]) -> list[Metric]:
    """The points of history that have (a multiset of points) does not hold."""
    left = Counter(have)
    missing = []
    for metric in history:
        point = _point(metric)
        if left[point] > 0:
            left[point] -= 1
        else:
            missing.append(metric)
    return missing


@dataclass
class RunCopier:
    """Copies one spool run to its target store, idempotently (see the module's docstring).

    Nothing counts as copied until the target has acknowledged it; where an answer never
    came (a timeout: the target may or may not have applied the request), the next copy
    first reads back what the target holds. finish() checks the whole run on the target
    before the run is marked done.
    """

    spool: MlflowClient
    target: str
    spool_run_id: str
    # Per metric key, the points the target holds as far as this copier knows; None when
    # unknown (a fresh copier, or after a request whose outcome is unknown): then read back.
    acked: dict[str, Counter[Point]] | None = None
    sent_artifacts: set[str] = field(default_factory=set)
    sent_fields: dict[str, Any] = field(default_factory=dict)  # params, tags, inputs as sent
    models: dict[str, str] = field(default_factory=dict)  # spool model id -> server model id
    whole: set[str] = field(default_factory=set)  # server models checked READY with their files
    linked: set[str] = field(default_factory=set)  # server models that have their metrics
    remote_run_id: str | None = None
    remote_experiment_id: str | None = None
    _remote: MlflowClient | None = None

    @property
    def shown(self) -> str:
        """The target as sentences and logs name it: without its login."""
        return redact(self.target)

    @property
    def remote(self) -> MlflowClient:
        """The target's client, opened on first use (see open_target)."""
        if self._remote is None:
            self._remote = open_target(self.target)
        return self._remote

    # -- the run ---------------------------------------------------------------------------

    def ensure_remote_run(self) -> str:
        """The server run for this spool run: recorded, found by tag, or created now."""
        if self.remote_run_id:
            return self.remote_run_id
        run = self.spool.get_run(self.spool_run_id)
        experiment = self.spool.get_experiment(run.info.experiment_id)
        self.remote_experiment_id = remote_experiment(self.remote, experiment.name)
        recorded = run.data.tags.get(REMOTE_RUN)
        if not recorded:
            recorded = self._find_remote_run()
            if recorded is None:
                self.remote.create_run(
                    self.remote_experiment_id,
                    start_time=run.info.start_time,
                    tags={SPOOL_RUN: self.spool_run_id},
                    run_name=run.info.run_name,
                )
                # Searched again rather than taking create_run's answer: a create whose
                # answer was lost earlier may have landed meanwhile (see _find_remote_run).
                recorded = self._find_remote_run()
                if recorded is None:
                    raise CopyIncomplete(f"The run created on {self.shown} is not found there.")
            self.spool.set_tag(self.spool_run_id, REMOTE_RUN, recorded)
        self.remote_run_id = recorded
        return recorded

    def _find_remote_run(self) -> str | None:
        """The target's run made for this spool run. Should two exist (a create whose answer
        was lost, and a second one made before the first landed), the first by id is kept and
        the other deleted: neither holds data yet, which is sent only once one is recorded."""
        assert self.remote_experiment_id is not None
        found = sorted(
            r.info.run_id
            for r in self.remote.search_runs(
                [self.remote_experiment_id],
                filter_string=f"tags.`{SPOOL_RUN}` = '{self.spool_run_id}'",
                max_results=10,
            )
        )
        for duplicate in found[1:]:
            self.remote.delete_run(duplicate)
        return found[0] if found else None

    def push_run_data(self) -> None:
        """Params, tags, dataset inputs and the metrics not linked to a model."""
        remote_id = self.ensure_remote_run()
        run = self.spool.get_run(self.spool_run_id)
        params = [Param(k, v) for k, v in run.data.params.items()]
        if "held" not in self.sent_fields:
            # Where and by whom a run was started, as MLflow recorded it on a run that was on
            # the target first (an MLflow Project's): that run's own account wins.
            tags_there = self.remote.get_run(remote_id).data.tags
            self.sent_fields["held"] = {k for k in tags_there if k.startswith(CONTEXT)}
        tags = [
            RunTag(k, v)
            for k, v in run.data.tags.items()
            if not k.startswith(BOOKKEEPING)
            and k != "mlflow.runName"
            and k not in self.sent_fields["held"]
        ]
        tags.append(RunTag(SPOOL_RUN, self.spool_run_id))
        if self.sent_fields.get("params") != params or self.sent_fields.get("tags") != tags:
            # MLflow takes at most 100 params and 100 tags per call. Setting one again with
            # the same value is a no-op, so a batch whose answer was lost is simply resent.
            for start in range(0, max(len(params), len(tags)), 100):
                self.remote.log_batch(
                    remote_id, params=params[start : start + 100], tags=tags[start : start + 100]
                )
            self.sent_fields.update(params=params, tags=tags)
        inputs = run.inputs.dataset_inputs if run.inputs else []
        if len(inputs) != self.sent_fields.get("inputs", 0):
            # MLflow deduplicates dataset inputs on (name, digest) and context.
            self.remote.log_inputs(
                remote_id, datasets=[DatasetInput(i.dataset, i.tags) for i in inputs]
            )
            self.sent_fields["inputs"] = len(inputs)
        self._push_metrics(run.data.metrics, self._model_points(run))

    def _model_points(self, run: Any) -> dict[str, Counter[Point]]:
        """Per key, the points run logged with a link to one of its models: _link_metrics
        sends them (with the link, which also puts them in the run's history)."""
        points: dict[str, Counter[Point]] = {}
        for output in run.outputs.model_outputs if run.outputs else []:
            model = self.spool.get_logged_model(output.model_id)
            if model.status == LoggedModelStatus.READY:
                for m in model.metrics or []:
                    points.setdefault(m.key, Counter())[_point(m)] += 1
        return points

    def _target_points(self, remote_id: str, keys: Any) -> dict[str, Counter[Point]]:
        return {
            key: Counter(map(_point, self.remote.get_metric_history(remote_id, key)))
            for key in keys
        }

    def _push_metrics(self, latest: dict[str, float], linked: dict[str, Counter[Point]]) -> None:
        """What the target lacks of the run's metric histories, leaving out the points linked
        to a model (see _model_points)."""
        remote_id = self.ensure_remote_run()
        if self.acked is None:
            self.acked = self._target_points(remote_id, latest)
        pending: list[Metric] = []
        for key in sorted(latest):
            history = self.spool.get_metric_history(self.spool_run_id, key)
            have = self.acked.setdefault(key, Counter()) + linked.get(key, Counter())
            pending += [_unlinked(m) for m in _missing(history, have)]
        self._log_metrics(remote_id, pending)

    def _log_metrics(self, remote_id: str, metrics: list[Metric]) -> None:
        """metrics to the run on the target, counted as there only once it said so."""
        # MLflow takes at most 1,000 metrics per call.
        for start in range(0, len(metrics), 1000):
            batch = metrics[start : start + 1000]
            try:
                self.remote.log_batch(remote_id, metrics=batch)
            except BaseException:
                self.acked = None  # applied or not: the next copy reads back what is there
                raise
            if self.acked is not None:
                for m in batch:
                    self.acked.setdefault(m.key, Counter())[_point(m)] += 1

    def check_metrics(self) -> None:
        """Every metric history on the target holds exactly the spool's points (system metrics
        and linked ones included); what is missing is sent, then checked again."""
        remote_id = self.ensure_remote_run()
        keys = self.spool.get_run(self.spool_run_id).data.metrics
        for attempt in range(2):
            there = self._target_points(remote_id, keys)
            self.acked = there
            missing = []
            extra = []
            for key in sorted(keys):
                history = self.spool.get_metric_history(self.spool_run_id, key)
                missing += _missing(history, there[key])
                extra_points = there[key] - Counter(map(_point, history))
                extra += [f"{key}@{p[0]}" for p in extra_points.elements()]
            if extra:
                # MLflow cannot delete a metric point: say so rather than hide it.
                log.warning(
                    "run %s on %s holds %d metric points the spool does not (%s): a store "
                    "that does not deduplicate metrics took a request twice",
                    remote_id, self.shown, len(extra), ", ".join(extra[:5]),
                )  # fmt: skip
            if not missing:
                return
            if attempt == 1:
                raise CopyIncomplete(
                    f"{len(missing)} metric points of run {remote_id} did not reach {self.shown}."
                )
            self._log_metrics(remote_id, [_unlinked(m) for m in missing])

    # -- models ----------------------------------------------------------------------------

    def push_models(self) -> None:
        """Every finished model of the spool run onto the target, once each, whole."""
        remote_id = self.ensure_remote_run()
        assert self.remote_experiment_id is not None
        run = self.spool.get_run(self.spool_run_id)
        outputs = run.outputs.model_outputs if run.outputs else []
        if not outputs:
            return
        there: dict[str, list[Any]] = {}
        for m in self.remote.search_logged_models(
            experiment_ids=[self.remote_experiment_id],
            filter_string=f"source_run_id = '{remote_id}'",
        ):
            there.setdefault(m.tags.get(SPOOL_MODEL, ""), []).append(m)
        for output in outputs:
            spool_model = self.spool.get_logged_model(output.model_id)
            if spool_model.status != LoggedModelStatus.READY:
                continue
            remote_model = self.models.get(spool_model.model_id) or self._one_model(
                there.get(spool_model.model_id, [])
            )
            if remote_model is None:
                remote_model = self._create_model(spool_model, remote_id)
            self.models[spool_model.model_id] = remote_model
            if remote_model not in self.whole:
                self._complete_model(spool_model, remote_model, remote_id)
            self._link_metrics(spool_model, remote_model, remote_id)
        remote_outputs = self.remote.get_run(remote_id).outputs
        linked = {o.model_id for o in (remote_outputs.model_outputs if remote_outputs else [])}
        missing = [
            LoggedModelOutput(self.models[o.model_id], o.step)
            for o in outputs
            if o.model_id in self.models and self.models[o.model_id] not in linked
        ]
        if missing:  # linking twice is a unique-key violation on PostgreSQL
            self.remote.log_outputs(remote_id, missing)

    def _one_model(self, candidates: list[Any]) -> str | None:
        """The target's model made for one spool model: a READY one first, else the first by
        id; others (a create whose answer was lost, then made again) are deleted."""
        if not candidates:
            return None
        ordered = sorted(
            candidates, key=lambda m: (m.status != LoggedModelStatus.READY, m.model_id)
        )
        for duplicate in ordered[1:]:
            self.remote.delete_logged_model(duplicate.model_id)
        return str(ordered[0].model_id)

    def _create_model(self, spool_model: Any, remote_run_id: str) -> str:
        assert self.remote_experiment_id is not None
        self.remote.create_logged_model(
            self.remote_experiment_id,
            name=spool_model.name,
            source_run_id=remote_run_id,
            tags={**spool_model.tags, SPOOL_MODEL: spool_model.model_id},
            params=spool_model.params,
            model_type=spool_model.model_type,
        )
        # Found again by its tag, as _find_remote_run finds the run (a lost answer).
        found = self.remote.search_logged_models(
            experiment_ids=[self.remote_experiment_id],
            filter_string=f"source_run_id = '{remote_run_id}'",
        )
        made = self._one_model(
            [m for m in found if m.tags.get(SPOOL_MODEL) == spool_model.model_id]
        )
        if made is None:
            raise CopyIncomplete(f"The model created on {self.shown} is not found there.")
        return made

    def _complete_model(self, spool_model: Any, remote_model: str, remote_run_id: str) -> None:
        """A target model READY with every file of the spool's: an upload cut off half-way
        (PENDING, files missing) is uploaded again (same paths: an overwrite) and finalized."""
        existing = self.remote.get_logged_model(remote_model)
        wanted = _files(lambda p: self.spool.list_logged_model_artifacts(spool_model.model_id, p))
        if existing.status != LoggedModelStatus.READY or not _same_files(
            wanted, _files(lambda p: self.remote.list_logged_model_artifacts(remote_model, p))
        ):
            with tempfile.TemporaryDirectory(prefix="mnistflow-sync-") as tmp:
                local = Path(
                    mlflow.artifacts.download_artifacts(
                        artifact_uri=spool_model.artifact_location, dst_path=tmp,
                        tracking_uri=self.spool.tracking_uri,
                    )
                )  # fmt: skip
                _rewrite_ids(local, remote_model, remote_run_id)
                self.remote.log_model_artifacts(remote_model, str(local))
            if not _same_files(
                wanted, _files(lambda p: self.remote.list_logged_model_artifacts(remote_model, p))
            ):
                raise CopyIncomplete(f"The files of model {remote_model} did not all arrive.")
            self.remote.finalize_logged_model(remote_model, LoggedModelStatus.READY)
        self.whole.add(remote_model)

    def _link_metrics(self, spool_model: Any, remote_model: str, remote_run_id: str) -> None:
        """The metrics linked to a model (MLflow's model views show them), once: the target's
        model takes them only while it has none (a second link is a unique-key violation)."""
        if remote_model in self.linked or not spool_model.metrics:
            return
        if not self.remote.get_logged_model(remote_model).metrics:
            linked = [
                Metric(m.key, m.value, m.timestamp, m.step, model_id=remote_model,
                       dataset_name=m.dataset_name, dataset_digest=m.dataset_digest)
                for m in spool_model.metrics
            ]  # fmt: skip
            # In the run's history too (MLflow writes both), as in the spool.
            self._log_metrics(remote_run_id, linked)
        self.linked.add(remote_model)

    # -- artifacts -------------------------------------------------------------------------

    def push_artifacts(self) -> None:
        """The run's own artifacts (not its models'), file by file: those not yet sent, then
        any the target does not hold with the same size."""
        remote_id = self.ensure_remote_run()
        root = Path(
            mlflow.artifacts.download_artifacts(
                run_id=self.spool_run_id, tracking_uri=self.spool.tracking_uri,
                dst_path=tempfile.mkdtemp(prefix="mnistflow-sync-"),
            )
        )  # fmt: skip
        try:
            files = {
                str(p.relative_to(root)): p.stat().st_size
                for p in sorted(root.rglob("*"))
                if p.is_file()
            }
            for _attempt in range(2):
                for relative in files:
                    if relative in self.sent_artifacts:
                        continue
                    folder = str(Path(relative).parent) if "/" in relative else None
                    self.remote.log_artifact(remote_id, str(root / relative), folder)
                    self.sent_artifacts.add(relative)
                there = _files(lambda p: self.remote.list_artifacts(remote_id, p))
                wrong = {f for f, size in files.items() if there.get(f) != size}
                if not wrong:
                    return
                self.sent_artifacts -= wrong
            raise CopyIncomplete(
                f"{len(wrong)} artifact files of run {remote_id} did not reach {self.shown}."
            )
        finally:
            shutil.rmtree(root, ignore_errors=True)

    # -- the end ---------------------------------------------------------------------------

    def finish(self) -> SyncResult:
        """The whole run onto its target, checked there, its registration, then its end; safe
        to repeat from any point it stopped at."""
        run = self.spool.get_run(self.spool_run_id)
        target = run.data.tags.get(TARGET, "")
        result = SyncResult(self.spool_run_id, target)
        if run.info.status == RunStatus.to_string(RunStatus.RUNNING):
            result.error = "the run is still running"
            return result
        self.push_run_data()
        self.push_models()
        self.push_artifacts()
        self.check_metrics()
        remote_id = self.ensure_remote_run()
        result.remote_run_id = remote_id
        name = run.data.tags.get(REGISTER_AS)
        served = next((m for s, m in self.models.items() if self._name(s) == "model"), None)
        if name and served and run.info.status == RunStatus.to_string(RunStatus.FINISHED):
            version = registry.ensure_registered(self.remote, remote_id, name, served)
            result.registered_version = str(version.version)
            self.spool.set_tag(self.spool_run_id, REGISTERED, result.registered_version)
        self._forget_waiting(remote_id, run.data.tags)
        self.remote.set_terminated(remote_id, run.info.status, run.info.end_time)
        self.spool.set_tag(self.spool_run_id, DONE, "true")
        self._drop_files(run)
        result.complete = True
        result.models = dict(self.models)
        return result

    def _drop_files(self, run: Any) -> None:
        """The spool's copy of a run's files (artifacts, models) once the run is whole on its
        target: every default run passes through the spool, and keeping them would double
        the disk each run takes. Its record stays, marked done."""
        models = self.spool.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = '{self.spool_run_id}'",
        )
        for uri in [run.info.artifact_uri, *(m.artifact_location for m in models)]:
            if (folder := local_folder(uri)) is not None:
                shutil.rmtree(folder, ignore_errors=True)

    def _forget_waiting(self, remote_id: str, spool_tags: dict[str, str]) -> None:
        """The target's run loses the failure reason _mark_failed gave it while the copy
        waited (the run's own reason, if it has one, was copied over it)."""
        reason = self.remote.get_run(remote_id).data.tags.get(FAILURE_TAG, "")
        if reason.endswith(KEPT) and FAILURE_TAG not in spool_tags:
            self.remote.delete_tag(remote_id, FAILURE_TAG)

    def _name(self, spool_model_id: str) -> str:
        return str(self.spool.get_logged_model(spool_model_id).name)


def _files(list_folder: Any, path: str | None = None) -> dict[str, int]:
    """Every file under path as {relative path: size}, listed one folder at a time by
    list_folder (a client's list_artifacts or list_logged_model_artifacts)."""
    files: dict[str, int] = {}
    for info in list_folder(path):
        if info.is_dir:
            files.update(_files(list_folder, info.path))
        else:
            files[info.path] = int(info.file_size or 0)
    return files


def _same_files(wanted: dict[str, int], there: dict[str, int]) -> bool:
    """there holds every file of wanted, of the same size (MLmodel by name only: the copy's
    names the target's model and run)."""
    return all(
        name in there and (name.endswith("MLmodel") or there[name] == size)
        for name, size in wanted.items()
    )


def local_folder(artifact_uri: str) -> Path | None:
    """The folder an artifact URI names on this machine; None for remote ones."""
    parsed = urllib.parse.urlparse(artifact_uri)
    if parsed.scheme not in ("", "file"):
        return None
    return Path(urllib.request.url2pathname(parsed.path))


def _rewrite_ids(model_dir: Path, model_id: str, run_id: str) -> None:
    """Point the copied MLmodel file at its server model and run, not the spool's."""
    from mlflow.models import Model

    path = model_dir / "MLmodel"
    if path.is_file():
        model = Model.load(str(path))
        model.model_id, model.run_id = model_id, run_id
        model.save(str(path))


def remote_experiment(client: MlflowClient, name: str) -> str:
    """The server's experiment of this name (created, as a model-training one, if missing)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    return experiments.create_experiment(client, str(client.tracking_uri), name)


class Forwarder(threading.Thread):
    """Copies a run's params, tags and metrics to its target while it trains, every few
    seconds; an outage only postpones the next copy. Never raises into training."""

    def __init__(self, copier: RunCopier, interval: float = FORWARD_INTERVAL_S) -> None:
        super().__init__(name="mnistflow-forwarder", daemon=True)
        self.copier = copier
        self.interval = interval
        self.stopping = threading.Event()
        self.outage_since: float | None = None
        self.refused: str | None = None  # credentials refused: stop trying

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            self.step()

    def step(self) -> bool:
        """One copy; True when the server took it."""
        if self.refused:
            return False
        target = self.copier.target
        try:
            self.copier.push_run_data()
        except Exception as e:
            self.refused = auth_problem(e, target)
            outage = remote.is_outage(e)
            if self.refused is None and not outage:
                log.warning(
                    "copying run %s to %s failed: %s",
                    self.copier.spool_run_id, redact(target), redact(str(e)),
                )  # fmt: skip
            if self.outage_since is None:
                self.outage_since = time.monotonic()
                if not is_embedded(target):
                    log.warning(
                        "the tracking server is not answering; the run goes on in the spool"
                    )
                elif outage:
                    log.warning("%s The run goes on in the spool.", outage_reason(e, target))
            return False
        if self.outage_since is not None:
            log.warning(
                "%s takes writes again after %.0f s; catching up",
                "the MLflow store" if is_embedded(target) else "the tracking server",
                time.monotonic() - self.outage_since,
            )
            self.outage_since = None
        return True

    def stop(self) -> None:
        self.stopping.set()
        self.join()


def finish_with_deadline(copier: RunCopier, deadline_s: float) -> SyncResult:
    """The final copy at the end of a command: try until it works or deadline_s pass. A
    refusal of the run itself is not waited on: the run stays in the spool, with why."""
    end = time.monotonic() + deadline_s
    target = copier.target
    while True:
        try:
            return copier.finish()
        except Exception as e:
            problem = auth_problem(e, target)
            if problem:
                raise MnistflowError(problem) from e
            last = e
            if not (remote.is_outage(e) or isinstance(e, CopyIncomplete)):
                break
        if time.monotonic() >= end:
            break
        time.sleep(2)
    reason = why_not_sent(last, target, copier.remote_run_id)
    if remote.is_outage(last):
        reason = outage_reason(last, target)
    _mark_failed(copier, reason)
    return SyncResult(copier.spool_run_id, redact(target), copier.remote_run_id, error=reason)


def _mark_failed(copier: RunCopier, reason: str) -> None:
    """Where the server can still record it, its run is not left RUNNING: FAILED, with why
    (a later `mnistflow sync` completes it and ends it as the spool's run ended)."""
    if copier.remote_run_id is None:
        return
    why = f"{reason} {KEPT}"
    # Three tries: a server that reset the connection of a failed upload resets the next
    # request on that kept-alive connection too; a new one goes through.
    for attempt in range(3):
        try:
            copier.remote.set_tag(copier.remote_run_id, FAILURE_TAG, why)
            copier.remote.set_terminated(copier.remote_run_id, "FAILED")
            return
        except Exception as e:  # the store may be away altogether
            if remote.is_outage(e) and is_embedded(copier.target):
                return  # a full or read-only store: the sentence above said it already
            if attempt == 2:
                log.warning(
                    "could not mark run %s FAILED: %s", copier.remote_run_id, redact(str(e))
                )


def pending(folder: Path | None = None) -> list[Any]:
    """Spool runs not yet completely on their server (finished ones, and running ones:
    written now, or left by a writer that died)."""
    client = MlflowClient(spool_uri(folder))
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    runs = client.search_runs(experiments, max_results=50000)
    return [r for r in runs if TARGET in r.data.tags and r.data.tags.get(DONE) != "true"]


# -- one copier per run: its lock ---------------------------------------------------------

# A RUNNING spool run with no lock file younger than this is still starting (the lock is
# taken a moment after the run is made); older, its writer died before taking it.
STARTING_S = 60.0
# Why a dead writer's run ended, as its failure_reason.
DIED = (
    "The training process stopped without ending its run (killed, out of memory or a "
    "reboot); mnistflow sync sent what it had logged and ended the run FAILED."
)


def run_lock(spool_run_id: str, folder: Path | None = None) -> FileLock:
    """The lock of one spool run. The training process holds it from the run's start to the
    end of its final copy, and `mnistflow sync` while it copies the run: one copier per run
    at a time. The OS releases it when its holder dies, however it dies, so a RUNNING run
    whose lock is free was left by a writer that is gone."""
    locks = (folder or spool_dir()) / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    # filelock: flock on POSIX, and the same code on the other systems MLflow runs on.
    return FileLock(locks / f"{spool_run_id}.lock")


def sync(folder: Path | None = None, target: str | None = None) -> list[SyncResult]:
    """Send every pending spool run (for target, when given) to its target store. Each run's
    outcome is its own: one that cannot be sent is reported and the others go on. target may
    carry the login the spool does not keep (see recorded_target)."""
    with short_requests(timeout=60):
        quiet_store_errors()
        spool = MlflowClient(spool_uri(folder))
        wanted = recorded_target(target) if target else None
        results = []
        for run in pending(folder):
            if not wanted or run.data.tags[TARGET] == wanted:
                results.append(_sync_one(spool, run, folder, target))
        return results


def _starting(run: Any) -> bool:
    """A RUNNING run younger than STARTING_S, whose writer may not have taken its lock yet."""
    running = run.info.status == RunStatus.to_string(RunStatus.RUNNING)
    return running and bool(time.time() - run.info.start_time / 1000 < STARTING_S)


def _sync_one(spool: MlflowClient, run: Any, folder: Path | None, given: str | None) -> SyncResult:
    run_id, uri = run.info.run_id, run.data.tags[TARGET]
    waiting = SyncResult(run_id, uri, run.data.tags.get(REMOTE_RUN))
    lock = run_lock(run_id, folder)
    if not Path(lock.lock_file).exists() and _starting(run):
        # Checked before taking the lock: taking it creates the lock file, and a second sync
        # would then take this run's writer, still starting, for a dead one.
        waiting.error = "it is still running"
        return waiting
    try:
        lock.acquire(timeout=0)
    except Timeout:
        waiting.error = "its training process or another sync is sending it now"
        return waiting
    try:
        run = spool.get_run(run_id)  # again, under the lock
        if run.data.tags.get(DONE) == "true":
            return SyncResult(run_id, uri, run.data.tags.get(REMOTE_RUN), complete=True)
        note = None
        if run.info.status == RunStatus.to_string(RunStatus.RUNNING):
            # Nobody holds its lock: the process that wrote it is gone.
            spool.set_tag(run_id, FAILURE_TAG, DIED)
            spool.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
            note = DIED
        if gone := _gone(uri):
            waiting.error = gone
            return waiting
        copier = RunCopier(spool, connect_uri(uri, given), run_id)
        try:
            result = copier.finish()
        except Exception as e:
            waiting.remote_run_id = copier.remote_run_id or waiting.remote_run_id
            waiting.error = why_not_sent(e, uri, waiting.remote_run_id)
            waiting.note = note
            return waiting
        result.note = note
        return result
    finally:
        lock.release()


def why_not_sent(error: BaseException, target: str, remote_run_id: str | None) -> str:
    """One sentence for a copy that failed: an outage, a refused login, or a refusal of the
    run itself (deleted or archived in the UI, its experiment gone, a bad request)."""
    return redact(_why_not_sent(error, target, remote_run_id))


def _why_not_sent(error: BaseException, target: str, remote_run_id: str | None) -> str:
    log.debug("copying to %s failed", redact(target), exc_info=error)
    if problem := auth_problem(error, target):
        return problem
    if remote.is_outage(error):
        if is_embedded(target):
            return outage_reason(error, target)
        return f"the tracking server at {target} did not answer"
    if isinstance(error, MnistflowError):
        return str(error)
    message = error.message if isinstance(error, MlflowException) else str(error)
    message = message.strip().splitlines()[0] if message.strip() else type(error).__name__
    if remote_run_id and ("deleted" in message or "active" in message):
        return (
            f"{target} refuses run {remote_run_id}: it or its experiment was deleted "
            f"({message}); restore it in the MLflow UI, then run mnistflow sync again."
        )
    return f"{target} refused the run's copy: {message}"


def _gone(target: str) -> str | None:
    """One sentence when an embedded target's folder no longer exists: sync makes no store
    in its place (one the user did not ask for); the run waits in the spool."""
    path = sqlite_path(target)
    if path is None or path.parent.is_dir():
        return None
    return (
        f"the folder of the MLflow store {target} no longer exists; create {path.parent} "
        "to send the run there"
    )


class Session:
    """One training run spooled for its target store: opened before the run, finished after.

    session = Session(target, require_server)    # checks the target (or warns)
    ... start the run in the spool store (session.uri), then session.attach(run_id)
    ... train; the forwarder copies as it goes
    result = session.finish(deadline_s)          # after the spool run has ended
    """

    def __init__(self, target: str, require_server: bool = False) -> None:
        self.target = target_uri(target)
        self.embedded = is_embedded(self.target)
        self.uri = ""  # the spool's, once the target is checked (a refusal makes nothing)
        self.copier: RunCopier | None = None
        self.forwarder: Forwarder | None = None
        self.server_up = True  # the target takes writes (a server answers, a store is writable)
        self.lock: FileLock | None = None
        self._closed = False
        self._requests = short_requests()
        self._requests.__enter__()
        if self.embedded:
            quiet_store_errors()
        try:
            # Wrong credentials, a server that is not MLflow, or a store folder that does not
            # exist are not outages: they stop here.
            if self.embedded:
                checks.check_writable(self.target)
            else:
                checks.check_reachable(self.target)
        except checks.StoreUnavailable as e:
            if require_server:
                self._requests.__exit__(None, None, None)
                raise
            self.server_up = False
            unavailable = e
        except MnistflowError:
            self._requests.__exit__(None, None, None)
            raise
        self.uri = spool_uri()
        if not self.server_up:
            log.warning(
                "%s Training goes on into the local spool (%s), to be sent %s.",
                unavailable, self.uri, remote.send_later(self.target),
            )  # fmt: skip

    def experiment_of(self, remote_run_id: str) -> str:
        """The name of the target's experiment that holds remote_run_id."""
        client = open_target(self.target)
        run = client.get_run(remote_run_id)
        return str(client.get_experiment(run.info.experiment_id).name)

    def attach(self, spool_run_id: str, remote_run_id: str | None = None) -> None:
        """Start copying spool_run_id; remote_run_id: a target run it completes (an MLflow
        Project's), instead of one found or created by the copy."""
        # Held until the final copy is through: `mnistflow sync` leaves the run alone meanwhile,
        # and takes it over should this process die.
        self.lock = run_lock(spool_run_id)
        self.lock.acquire(timeout=0)
        spool = MlflowClient(self.uri)
        spool.set_tag(spool_run_id, TARGET, recorded_target(self.target))
        if remote_run_id:
            spool.set_tag(spool_run_id, REMOTE_RUN, remote_run_id)
        self.copier = RunCopier(spool, self.target, spool_run_id)
        # Copying into a local store is work for this process's 2 cores, not a wait on a
        # network: see FORWARD_INTERVAL_EMBEDDED_S.
        interval = FORWARD_INTERVAL_EMBEDDED_S if self.embedded else FORWARD_INTERVAL_S
        self.forwarder = Forwarder(self.copier, interval)
        if not self.server_up:
            self.forwarder.outage_since = time.monotonic()  # said once, in __init__
        # The target's run exists from the start, so the UI shows it while it trains.
        if self.server_up and self.forwarder.step() and self.embedded:
            self._check_artifacts()
        self.forwarder.start()

    def _check_artifacts(self) -> None:
        """Before training: the target run's artifact folder takes files. One that cannot for
        a reason no waiting mends (a file in its place) fails the run now, with why, as the
        first artifact did when runs were written directly; a full disk is an outage."""
        assert self.copier is not None and self.copier.remote_run_id is not None
        run_id = self.copier.remote_run_id
        artifact_uri = self.copier.remote.get_run(run_id).info.artifact_uri
        folder = local_folder(artifact_uri)
        if folder is None:
            return
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as e:
            if remote.is_outage(e):
                log.warning("%s The run goes on in the spool.", outage_reason(e, self.target))
                return
            reason = (
                f"Cannot write artifacts to {artifact_uri} ({e}); make it writable or set "
                "another artifact location for the experiment."
            )
            self.copier.remote.set_tag(run_id, FAILURE_TAG, f"MnistflowError: {reason}")
            self.copier.remote.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
            # Nothing of this run is left to send.
            self.copier.spool.set_tag(self.copier.spool_run_id, DONE, "true")
            self.close()
            raise MnistflowError(reason) from e

    def register_as(self, name: str) -> None:
        """Register the run's model under name once it is on the target."""
        assert self.copier is not None
        self.copier.spool.set_tag(self.copier.spool_run_id, REGISTER_AS, name)

    @property
    def remote_run_id(self) -> str | None:
        return self.copier.remote_run_id if self.copier else None

    def finish(self, deadline_s: float) -> SyncResult:
        """Stop the forwarder and copy the ended run, trying for up to deadline_s."""
        if self.embedded:
            # A full disk or a permission does not mend itself in the minute a restarting
            # server takes: one try; the run waits in the spool for `mnistflow sync`.
            deadline_s = 0
        try:
            assert self.copier is not None and self.forwarder is not None
            self.forwarder.stop()
            if self.forwarder.refused:
                raise MnistflowError(self.forwarder.refused)
            return finish_with_deadline(self.copier, deadline_s)
        finally:
            self.close()

    def close(self) -> None:
        """Requests back to MLflow's settings, and the run's lock released (once)."""
        if self._closed:
            return
        self._closed = True
        self._requests.__exit__(None, None, None)
        if self.lock is not None:
            self.lock.release()
