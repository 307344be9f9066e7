"""Copies one spool run to its target store, idempotently (see the package docstring)."""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import (
    DatasetInput,
    LoggedModelOutput,
    LoggedModelStatus,
    Metric,
    Param,
    RunStatus,
    RunTag,
)
from mlflow.tracking import MlflowClient

from mnistflow.config import FAILURE_TAG, MnistflowError
from mnistflow.lifecycle import registry
from mnistflow.spool.targets import (
    BOOKKEEPING,
    CONTEXT,
    DONE,
    KEPT,
    REGISTER_AS,
    REGISTERED,
    REMOTE_RUN,
    SPOOL_MODEL,
    SPOOL_RUN,
    TARGET,
    open_target,
)
from mnistflow.store import experiments
from mnistflow.store.uris import redact

log = logging.getLogger(__name__)


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
    """Copies one spool run to its target store, idempotently (see the package's docstring).

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
