"""The study and its parent run: set up, run the workers, log the study, keep the best trial's
model (registered on request)."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mnistflow import data
from mnistflow.config import (
    DataConfig,
    MnistflowError,
    TrackingConfig,
)
from mnistflow.engines.plain import evaluate
from mnistflow.lifecycle import logged_models, networks, registry
from mnistflow.recording import class_metrics, judge, log_test_reports
from mnistflow.store.checks import resolve_tracking_uri
from mnistflow.store.uris import redact
from mnistflow.sweep.definition import SweepConfig, SweepDefinition, SweepSummary
from mnistflow.sweep.storage import describe_pruner, open_storage, setup_lock, storage_url
from mnistflow.sweep.workers import WorkerJob, run_workers
from mnistflow.tracking import ParentRun, TrackedRun, download_artifact, get_run, set_run_tags

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial


# -- the study and its parent run -----------------------------------------------------------


def _prepare(
    config: SweepConfig, tracking: TrackingConfig, url: str
) -> tuple[optuna.Study, SweepDefinition, ParentRun]:
    """Create or join the study and its parent run, once, under the set-up lock."""
    import optuna

    with setup_lock(url):
        study = optuna.create_study(
            storage=open_storage(url, create_tables=True),
            study_name=config.study,
            direction="maximize",
            load_if_exists=True,
        )
        stored = study.user_attrs.get("definition")
        if stored is None:
            definition = config.definition or SweepDefinition()
            definition.validate()
            study.set_user_attr("definition", definition.as_dict())
        else:
            definition = SweepDefinition.from_dict(stored)
            if config.definition is not None and config.definition != definition:
                mine = config.definition.as_dict()
                diff = ", ".join(f"{k}={v}" for k, v in stored.items() if mine.get(k) != v)
                raise MnistflowError(
                    f"Study {config.study!r} was started with {diff}, which this command "
                    "changes; give only --study to join it as it is, or name a new study."
                )
        parent_id = study.user_attrs.get("parent_run_id")
        if parent_id is not None:
            return study, definition, ParentRun.join(tracking.tracking_uri, parent_id)
        parent = ParentRun.start(
            dataclasses.replace(
                tracking,
                run_name=tracking.run_name or f"sweep-{config.study}",
                tags={**tracking.tags, "sweep_study": config.study, "sweep_role": "parent"},
            )
        )
        study.set_user_attr("parent_run_id", parent.run_id)
    parent.log_params(
        {
            "study": config.study,
            "storage": redact(url),
            "objective": "val_accuracy after the last epoch (maximize)",
            "sampler": f"TPESampler(constant_liar=True, seed={config.sampler_seed})",
            "pruner": describe_pruner(definition),
            "budget.trials": config.trials,
            "budget.timeout": config.timeout,
            "budget.workers": config.workers,
            "preset": definition.preset,
            "epochs": definition.trial_epochs(),
            "limit_train": definition.limit_train,
            "seed": definition.seed,
            **{f"space.{k}": v for k, v in definition.space.describe().items()},
        }
    )
    return study, definition, parent


def _trial_counts(study: optuna.Study) -> dict[str, int]:
    from optuna.trial import TrialState

    states = [t.state for t in study.get_trials(deepcopy=False)]
    return {
        "trials_complete": states.count(TrialState.COMPLETE),
        "trials_pruned": states.count(TrialState.PRUNED),
        "trials_failed": states.count(TrialState.FAIL),
    }


def _log_study(parent: ParentRun, study: optuna.Study) -> None:
    """The parent's record of the study so far: trials table, counts, Optuna's plots."""
    import warnings

    import matplotlib
    from optuna.visualization import matplotlib as plots

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    counts = _trial_counts(study)
    parent.log_metrics({k: float(v) for k, v in counts.items()})
    with tempfile.TemporaryDirectory(prefix="mnistflow-sweep-") as tmp:
        folder = Path(tmp)
        study.trials_dataframe().to_csv(folder / "trials.csv", index=False)
        figures: dict[str, Callable[[optuna.Study], Any]] = {
            "optimization_history.png": plots.plot_optimization_history,
            "parallel_coordinate.png": plots.plot_parallel_coordinate,
            "param_importances.png": plots.plot_param_importances,
        }
        # Optuna's plots need complete trials (importances at least two); skipped before that.
        if counts["trials_complete"] >= 2:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                for name, plot in figures.items():
                    axes = plot(study)
                    axes.figure.savefig(folder / name, dpi=100, bbox_inches="tight")
                    plt.close(axes.figure)
        parent.log_folder(folder, "sweep")


def _finish_best(
    study: optuna.Study, definition: SweepDefinition, tracking: TrackingConfig
) -> tuple[FrozenTrial, float, str]:
    """Evaluate the best trial (chosen on validation) on the test set and log its model and
    reports into its run; returns (trial, test accuracy, model URI). Done once per trial."""
    import numpy as np
    import torch
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        counts = ", ".join(
            f"{v} {k.removeprefix('trials_')}" for k, v in _trial_counts(study).items()
        )
        raise MnistflowError(
            f"No trial of study {study.study_name!r} completed ({counts}); see the trial runs "
            "for why."
        )
    # The highest validation accuracy; on a tie the earliest trial, whatever the storage
    # (an SQL storage's ORDER BY leaves ties in no particular order).
    best = max(complete, key=lambda t: (t.value, -t.number))
    run_id = best.user_attrs["mlflow_run_id"]
    done = get_run(run_id).data
    if "test_accuracy" in done.metrics and "best_model_uri" in done.tags:
        return best, done.metrics["test_accuracy"], done.tags["best_model_uri"]

    splits = data.load(DataConfig(limit_train=definition.limit_train))
    with tempfile.TemporaryDirectory(prefix="mnistflow-best-") as tmp:
        out = Path(tmp)
        weights = download_artifact(run_id, "weights/model.pt", out)
        # Downloaded from the tracking server: tensors and plain values only, never code
        # (explicit, not the default of whichever torch is installed).
        checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
        network = (
            networks.FastNet(width=checkpoint["width"])
            if checkpoint["arch"] == "fast"
            else networks.build(checkpoint["arch"])
        )
        network.load_state_dict(checkpoint["state_dict"])
        test = evaluate(network, splits.test)
        labels, predictions = splits.test.labels.numpy(), test.predictions.numpy()
        per_class, per_class_metrics = class_metrics(labels, predictions)
        final = {"test_loss": test.loss, **per_class_metrics}
        resume = dataclasses.replace(
            tracking, resume_run_id=run_id, parent_run_id=None, system_metrics=False
        )
        judged = judge(network, splits, test)
        final.update(judged.metrics)
        with TrackedRun(resume) as run:
            logged = logged_models.log_torch_models(
                network, splits.test.images[:256], out, abstain_below=judged.below
            )
            final["onnx_max_abs_diff"] = logged.onnx_max_abs_diff
            run.log_results(test.accuracy, final, logged.model_id)
            log_test_reports(
                run,
                splits.test.images.numpy(),
                labels,
                predictions,
                test.probabilities.numpy().astype(np.float64),
                per_class,
                out,
            )
        set_run_tags(run_id, {"sweep_best": "true", "best_model_uri": logged.model_uri})
    return best, test.accuracy, logged.model_uri


def run_sweep(config: SweepConfig, tracking: TrackingConfig | None = None) -> SweepSummary:
    """Run (or join) a study: this command's trials over its workers, then the best trial
    (on validation) evaluated on the test set, its model logged and optionally registered.

    Ctrl-C: running trials end KILLED, the parent run ends KILLED with what it has, and the
    same command (or only --study) later resumes the study.
    """

    started = time.perf_counter()
    config.validate()
    tracking = tracking or TrackingConfig()
    tracking = dataclasses.replace(
        tracking, tracking_uri=resolve_tracking_uri(tracking.tracking_uri)
    )
    url = storage_url(config.storage)
    study, definition, parent = _prepare(config, tracking, url)
    experiment_id = parent.experiment_id
    experiment = parent.client.get_experiment(experiment_id).name
    trial_tracking = dataclasses.replace(
        tracking, experiment=experiment, parent_run_id=parent.run_id, run_name=None
    )
    deadline = None if config.timeout is None else time.time() + config.timeout
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    jobs = [
        WorkerJob(
            study=config.study,
            storage_url=url,
            definition=definition,
            tracking=trial_tracking,
            # This command's trials, split as evenly as they go.
            trials=config.trials // config.workers + (i < config.trials % config.workers),
            deadline=deadline,
            sampler_seed=None if config.sampler_seed is None else config.sampler_seed + i,
            # K workers share the cores rather than each taking all of them.
            threads=max(1, (cores or 1) // config.workers) if config.workers > 1 else None,
        )
        for i in range(config.workers)
    ]
    status = "FAILED"
    try:
        run_workers([job for job in jobs if job.trials > 0])
        best, test_accuracy, model_uri = _finish_best(study, definition, trial_tracking)
        parent.set_tags(
            {"best_trial": best.number, "best_run_id": best.user_attrs["mlflow_run_id"]}
        )
        parent.log_metrics({"best_test_accuracy": test_accuracy})
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            _log_study(parent, study)
        finally:
            parent.end(status)
    counts = _trial_counts(study)
    summary = SweepSummary(
        study=config.study,
        storage=redact(url),
        parent_run_id=parent.run_id,
        experiment_id=experiment_id,
        tracking_uri=str(tracking.tracking_uri),
        best_trial=best.number,
        best_params=best.params,
        best_val_accuracy=float(best.value or 0.0),
        best_run_id=best.user_attrs["mlflow_run_id"],
        best_test_accuracy=test_accuracy,
        best_model_uri=model_uri,
        trials_complete=counts["trials_complete"],
        trials_pruned=counts["trials_pruned"],
        trials_failed=counts["trials_failed"],
        wall_seconds=time.perf_counter() - started,
    )
    if config.register_as:
        client = registry.client_for(summary.tracking_uri)
        # A logged model's URI is models:/<model id>.
        model_id = model_uri.removeprefix("models:/")
        # Once per study's best: joining the study again finds the version made before.
        version = registry.ensure_registered(
            client, summary.best_run_id, config.register_as, model_id
        )
        summary.registered_model = config.register_as
        summary.registered_version = str(version.version)
    return summary
