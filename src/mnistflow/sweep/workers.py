"""One trial (a nested MLflow run of its own) and the worker processes that run trials."""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import signal
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mnistflow import data
from mnistflow.config import (
    DataConfig,
    MnistflowError,
    TrackingConfig,
    TrainConfig,
    as_dict,
)
from mnistflow.data import MnistSplits
from mnistflow.engines.plain import fit, resolve
from mnistflow.lifecycle import networks
from mnistflow.recording import data_record, record_inputs
from mnistflow.reporting import Reporter, Tee
from mnistflow.store.uris import redact
from mnistflow.sweep.definition import SweepDefinition
from mnistflow.sweep.storage import make_pruner, make_sampler, open_storage
from mnistflow.tracking import ParentRun, TrackedRun, set_run_tags

if TYPE_CHECKING:
    from types import TracebackType

    import optuna
    from optuna.trial import FrozenTrial


# -- one trial ------------------------------------------------------------------------------


class PruningReporter(Reporter):
    """Hands each epoch's validation accuracy to Optuna and ends the trial when its pruner
    says so (TrialPruned propagates out of engines.plain.fit)."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        import optuna

        self.trial.report(metrics["val_accuracy"], epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(
                f"pruned after epoch {epoch} at val accuracy {metrics['val_accuracy']:.4f}"
            )


@dataclass(frozen=True)
class WorkerJob:
    """Everything a worker process needs (picklable: workers are spawned, not forked)."""

    study: str
    storage_url: str
    definition: SweepDefinition
    tracking: TrackingConfig  # the experiment and URI of the parent; parent_run_id set
    trials: int
    deadline: float | None  # time.time() after which no trial starts
    sampler_seed: int | None
    threads: int | None  # torch threads; None leaves torch's default


class _Interrupt:
    """The worker's SIGTERM: raised as KeyboardInterrupt, except while a run starts or ends.

    An interrupt inside mlflow.start_run or end_run can leave the run created but never
    ended (RUNNING for good, seen on a loaded machine); there it is held and raised as soon
    as the start or the end is through.
    """

    holding = False
    held = False

    @classmethod
    def handle(cls, signum: int, frame: Any) -> None:
        # The first SIGTERM from the sweep's main process ends the running trial as Ctrl-C
        # would (KILLED run); further ones are ignored so that the clean-up is not cut short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if cls.holding:
            cls.held = True
            return
        raise KeyboardInterrupt

    @classmethod
    @contextlib.contextmanager
    def held_back(cls) -> Iterator[None]:
        """Hold an interrupt that arrives inside; the caller raises it with take_held()."""
        cls.holding = True
        try:
            yield
        finally:
            cls.holding = False

    @classmethod
    def take_held(cls) -> bool:
        held, cls.held = cls.held, False
        return held


class TrialRun(TrackedRun):
    """A trial's run, whose start and end an interrupt cannot cut in two (see _Interrupt)."""

    def __enter__(self) -> TrialRun:
        with _Interrupt.held_back():
            super().__enter__()
        if _Interrupt.take_held():
            # Started: ended as interrupted, as if the interrupt had come just after.
            self.__exit__(KeyboardInterrupt, KeyboardInterrupt(), None)
            raise KeyboardInterrupt
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with _Interrupt.held_back():
            super().__exit__(exc_type, exc, tb)
        if _Interrupt.take_held():
            raise KeyboardInterrupt


def _trial_network(config: TrainConfig, params: Mapping[str, Any]) -> Any:

    if "width" in params:
        return networks.FastNet(width=int(params["width"]))
    return networks.build(config.arch)


def _objective(trial: optuna.Trial, job: WorkerJob, splits: MnistSplits) -> float:
    """Train one trial in its own child run; return its final validation accuracy."""
    import optuna
    import torch

    started = time.perf_counter()
    params = job.definition.space.suggest(trial)
    # A trial scores one network: an ensemble (the quality preset's members) multiplies every
    # trial's time without telling the recipes apart any better.
    base = resolve(dataclasses.replace(job.definition.base_config(), members=1))
    device = base.device
    train_config = dataclasses.replace(base, **{k: v for k, v in params.items() if k != "width"})
    width = params.get("width", networks.FAST_WIDTH if train_config.arch == "fast" else None)
    tags = {
        **job.tracking.tags,
        "sweep_study": job.study,
        "trial_number": str(trial.number),
        # Which worker ran it (host and process), as several share one study.
        "sweep_worker": f"{socket.gethostname()}:{os.getpid()}",
    }
    tracking = dataclasses.replace(
        job.tracking, run_name=f"{job.study}-trial-{trial.number:03d}", tags=tags
    )
    state, note, fit_seconds = "failed", "", 0.0
    value = float("nan")
    trial_run = TrialRun(tracking)  # its run_id is set once the run exists
    try:
        with (
            tempfile.TemporaryDirectory(prefix="mnistflow-trial-") as tmp,
            trial_run as run,
        ):
            trial.set_user_attr("mlflow_run_id", run.run_id)
            resolved = {
                "train": {**as_dict(train_config), "width": width},
                "data": data_record(DataConfig(limit_train=job.definition.limit_train), splits),
                "trial": {"study": job.study, "number": trial.number},
            }
            record_inputs(
                run, resolved, splits, Path(tmp),
                preset=train_config.preset, device=device, tags=tags,
            )  # fmt: skip
            fit_started = time.perf_counter()
            # Seeded here, not only inside fit(): the network is built before fit() seeds, and
            # its initial weights must not depend on the trials this process ran before.
            torch.manual_seed(train_config.seed)
            network = _trial_network(train_config, params)
            try:
                result = fit(
                    train_config,
                    splits.train,
                    splits.val,
                    Tee(run, PruningReporter(trial)),
                    model=network,
                )
            except optuna.TrialPruned as e:
                state, note = "pruned", f"Trial {trial.number} of study {job.study}: {e}."
            else:
                value = result.history[-1]["val_accuracy"]
                # The weights of every complete trial (a small checkpoint, not a logged model),
                # so the best one can be evaluated and logged after selection from any machine.
                weights = Path(tmp) / "model.pt"
                torch.save(
                    {
                        "arch": train_config.arch,
                        "width": width,
                        "config": resolved,
                        "state_dict": result.model.state_dict(),
                    },
                    weights,
                )
                run.log_file(weights, "weights")
                state = "complete"
                note = f"Trial {trial.number} of study {job.study}: val accuracy {value:.4f}."
            finally:
                fit_seconds = time.perf_counter() - fit_started
            run.log_metrics({"fit_seconds": fit_seconds})
    except KeyboardInterrupt:
        state, note = "killed", f"Trial {trial.number} of study {job.study}: stopped by Ctrl-C."
        raise
    except Exception as e:
        note = redact(f"Trial {trial.number} of study {job.study} failed: {type(e).__name__}: {e}")
        raise
    finally:
        trial.set_user_attr("fit_seconds", fit_seconds)
        trial.set_user_attr("trial_seconds", time.perf_counter() - started)
        if trial_run.run_id:
            set_run_tags(trial_run.run_id, {"trial_state": state, "mlflow.note.content": note})
    if state == "pruned":
        raise optuna.TrialPruned(note)
    return value


def _after_trial(parent: ParentRun, study: optuna.Study, trial: FrozenTrial) -> None:
    """The parent's curves, stepped by trial number: this trial's and the best-so-far
    validation accuracy."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    metrics: dict[str, float] = {}
    if trial.state == TrialState.COMPLETE and trial.value is not None:
        metrics["trial_val_accuracy"] = trial.value
    if complete:
        metrics["best_val_accuracy"] = max(t.value for t in complete if t.value is not None)
    if metrics:
        parent.log_metrics(metrics, step=trial.number)


def work(job: WorkerJob) -> None:
    """One worker: load the data once, then run job.trials trials of the shared study."""
    import mlflow
    import optuna
    import torch
    from mlflow.tracking import MlflowClient

    if job.threads:
        torch.set_num_threads(job.threads)
    uri, parent_run_id = job.tracking.tracking_uri, job.tracking.parent_run_id
    assert uri is not None and parent_run_id is not None  # set by run_sweep
    mlflow.set_tracking_uri(uri)
    parent = ParentRun(MlflowClient(uri), parent_run_id)
    study = optuna.load_study(
        study_name=job.study,
        storage=open_storage(job.storage_url),
        sampler=make_sampler(job.sampler_seed),
        pruner=make_pruner(job.definition),
    )
    splits = data.load(DataConfig(limit_train=job.definition.limit_train))
    timeout = None if job.deadline is None else job.deadline - time.time()
    if timeout is not None and timeout <= 0:
        return
    study.optimize(
        lambda trial: _objective(trial, job, splits),
        n_trials=job.trials,
        timeout=timeout,
        # A failing trial is recorded (FAIL, its run FAILED) and the sweep goes on.
        catch=(Exception,),
        callbacks=[lambda study, trial: _after_trial(parent, study, trial)],
    )


def _worker_process(job: WorkerJob) -> None:
    # A terminal's Ctrl-C reaches every process of the group; the main process forwards
    # exactly one SIGTERM instead, so a worker is interrupted once, not twice.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _Interrupt.handle)
    try:
        work(job)
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def run_workers(jobs: list[WorkerJob]) -> None:
    """Run the jobs: in this process for one, else one spawned process each."""
    if len(jobs) == 1:
        work(jobs[0])
        return
    # spawn, not fork: forking a process that has started torch's thread pools can hang.
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_worker_process, args=(job,), name=f"sweep-worker-{i}")
        for i, job in enumerate(jobs)
    ]
    for p in processes:
        p.start()
    try:
        for p in processes:
            p.join()
    except KeyboardInterrupt:
        for p in processes:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGTERM)
        for p in processes:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
                p.join()
        raise
    failed = [(p.name, p.exitcode) for p in processes if p.exitcode != 0]
    if failed:
        name, code = failed[0]
        raise MnistflowError(f"{name} exited with code {code}; its error is printed above.")
