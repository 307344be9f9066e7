"""Hyperparameter sweeps with Optuna: one parent run per study, a nested run per trial,
pruning on validation accuracy, and many workers (processes, machines) on one study.

    summary = run_sweep(SweepConfig(study="lr-search", trials=20, workers=2), TrackingConfig())

The study lives in Optuna's storage (a journal file by default, PostgreSQL for many machines)
and keeps the id of its parent MLflow run, so every command that joins the study logs under
the same parent. Trials are selected on validation accuracy only; the test set is evaluated
once, for the best trial, after selection.

Optuna's own MLflowCallback is not used: it creates each trial's run after the trial has
ended (so no per-epoch metrics and nothing for a pruned trial to say), logs the params a
second time when the objective logs them too, and nests trials under the *active* run,
which worker processes do not have, so their trials lose the parent. Here each trial's run
is started by the trial itself, nested by ``parent_run_id``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mnistflow.config import (
    DataConfig,
    MnistflowError,
    TrackingConfig,
    TrainConfig,
    as_dict,
    preset_config,
)
from mnistflow.reporting import Reporter
from mnistflow.store.uris import redact

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from mnistflow.data import MnistSplits
    from mnistflow.tracking import ParentRun

# Several local processes append to one journal file safely (Optuna locks each append); an
# SQLite file also works for one process but fails with "database is locked" under parallel
# writers, which is why the local default is a journal, not SQLite.
DEFAULT_STORAGE = "optuna-journal.log"
PRUNERS = ("median", "halving", "none")
PrunerName = Literal["median", "halving", "none"]
# Arbitrary but fixed: the PostgreSQL advisory lock that serialises study set-up.
_ADVISORY_LOCK_KEY = 0x6D6E697374  # "mnist"


# -- the search space ---------------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    """A continuous (or, for integer parameters, integer) range; log samples log-uniformly."""

    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class Choice:
    """A categorical choice among values."""

    values: tuple[float, ...]


Dimension = Range | Choice
INT_PARAMS = ("batch_size", "width")


@dataclass(frozen=True)
class SearchSpace:
    """What each trial draws; a parameter set to None is not searched (the preset's value)."""

    lr: Dimension | None = Range(1e-3, 3e-2, log=True)
    batch_size: Dimension | None = Choice((64, 128, 256))
    weight_decay: Dimension | None = Range(1e-6, 1e-2, log=True)
    label_smoothing: Dimension | None = Range(0.0, 0.2)
    # The fast network's first-layer channels (24, networks.FAST_WIDTH, is the preset's).
    width: Dimension | None = Choice((16, 24, 32))

    def dimensions(self) -> dict[str, Dimension]:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }

    def describe(self) -> dict[str, str]:
        """One readable line per searched parameter, e.g. 'log-uniform [0.001, 0.03]'."""
        lines = {}
        for name, dim in self.dimensions().items():
            if isinstance(dim, Choice):
                lines[name] = "one of " + ", ".join(str(v) for v in dim.values)
            else:
                kind = "log-uniform" if dim.log else "uniform"
                kind = ("integer " if name in INT_PARAMS else "") + kind
                lines[name] = f"{kind} [{dim.low:g}, {dim.high:g}]"
        return lines

    def as_dict(self) -> dict[str, Any]:
        """The YAML/JSON form that space_from_dict reads."""
        return {
            name: list(dim.values)
            if isinstance(dim, Choice)
            else {"low": dim.low, "high": dim.high, "log": dim.log}
            for name, dim in self.dimensions().items()
        }

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Draw every searched parameter from the trial."""
        params: dict[str, Any] = {}
        for name, dim in self.dimensions().items():
            if isinstance(dim, Choice):
                params[name] = trial.suggest_categorical(name, list(dim.values))
            elif name in INT_PARAMS:
                params[name] = trial.suggest_int(name, int(dim.low), int(dim.high), log=dim.log)
            else:
                params[name] = trial.suggest_float(name, dim.low, dim.high, log=dim.log)
        return params


def _number(value: Any, where: str) -> float:
    # PyYAML reads 1e-3 (no dot) as a string: accept any text that is a number.
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise MnistflowError(f"{where} must be a number, got {value!r}.")
    try:
        number = float(value)
    except ValueError:
        raise MnistflowError(f"{where} must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise MnistflowError(f"{where} must be a finite number, got {value!r}.")
    return number


def _dimension(name: str, raw: Any, source: str) -> Dimension:
    where = f"{name} in {source}"
    if isinstance(raw, list):
        if not raw:
            raise MnistflowError(f"{where} is an empty list; give at least one value.")
        values = tuple(_number(v, f"every value of {where}") for v in raw)
        if name in INT_PARAMS:
            if any(v != int(v) for v in values):
                raise MnistflowError(f"{where} must list whole numbers, got {raw}.")
            values = tuple(int(v) for v in values)
        return Choice(values)
    if isinstance(raw, dict):
        unknown = set(raw) - {"low", "high", "log"}
        if unknown or not {"low", "high"} <= set(raw):
            raise MnistflowError(
                f"{where} must be a list of values or a mapping with low, high and optionally "
                f"log, got keys {', '.join(map(str, raw)) or 'none'}."
            )
        low, high = _number(raw["low"], f"low of {where}"), _number(raw["high"], f"high of {where}")
        log = raw.get("log", False)
        if not isinstance(log, bool):
            raise MnistflowError(f"log of {where} must be true or false, got {log!r}.")
        if not low < high:
            raise MnistflowError(f"{where} needs low < high, got low={low:g}, high={high:g}.")
        if log and low <= 0:
            raise MnistflowError(f"{where} is log-uniform, so low must be positive, got {low:g}.")
        if name in INT_PARAMS and (low != int(low) or high != int(high)):
            raise MnistflowError(f"{where} needs whole-number bounds, got {low:g}..{high:g}.")
        return Range(low, high, log)
    raise MnistflowError(
        f"{where} must be a list of values or a mapping with low and high, got {raw!r}."
    )


def space_from_dict(raw: Any, source: str = "the search space") -> SearchSpace:
    """A SearchSpace from its YAML/JSON form; parameters it does not name are not searched."""
    if not isinstance(raw, dict):
        raise MnistflowError(
            f"{source} must map parameter names to a list of values or a low/high range."
        )
    names = [f.name for f in dataclasses.fields(SearchSpace)]
    unknown = [str(k) for k in raw if k not in names]
    if unknown:
        raise MnistflowError(
            f"Unknown parameter {unknown[0]!r} in {source}; choose from: {', '.join(names)}."
        )
    if not raw:
        raise MnistflowError(f"{source} is empty; give at least one parameter to search.")
    space = SearchSpace(**{name: _dimension(name, raw.get(name), source) if name in raw else None
                           for name in names})  # fmt: skip
    _check_values(space, source)
    return space


def _check_values(space: SearchSpace, source: str) -> None:
    """Refuse values no training could use (the bounds of ranges, every listed choice)."""
    floors = {
        "lr": (0.0, False),
        "batch_size": (1.0, True),
        "weight_decay": (0.0, True),
        "label_smoothing": (0.0, True),
        "width": (1.0, True),
    }
    for name, dim in space.dimensions().items():
        values = dim.values if isinstance(dim, Choice) else (dim.low, dim.high)
        floor, inclusive = floors[name]
        for v in values:
            if v < floor or (v == floor and not inclusive):
                bound = "at least" if inclusive else "above"
                raise MnistflowError(f"{name} in {source} must be {bound} {floor:g}, got {v:g}.")
            if name == "label_smoothing" and v >= 1:
                raise MnistflowError(f"label_smoothing in {source} must be below 1, got {v:g}.")


def load_space(path: Path) -> SearchSpace:
    """Read a search space from a YAML file (see SearchSpace.as_dict for the form)."""
    import yaml  # a dependency of MLflow

    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise MnistflowError(f"Cannot read the search space file {path}: {e.strerror}.") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise MnistflowError(f"The search space file {path} is not valid YAML{at}.") from None
    return space_from_dict(raw, str(path))


# -- what a study is and what one command does ----------------------------------------------


@dataclass(frozen=True)
class SweepDefinition:
    """What makes a study's trials comparable: stored in the study, the same for every command
    that joins it."""

    preset: str = "fast"
    epochs: int | None = None  # None: see trial_epochs()
    limit_train: int | None = None
    space: SearchSpace = field(default_factory=SearchSpace)
    pruner: PrunerName = "median"
    # Pruning starts once this many trials have completed (the median needs a few to mean
    # something).
    prune_after_trials: int = 3
    # The training seed, the same for every trial, so that trials differ by their params only.
    seed: int = 0

    def validate(self) -> None:
        base = self.base_config()
        if self.pruner not in PRUNERS:
            raise MnistflowError(
                f"pruner must be one of {', '.join(PRUNERS)}, got {self.pruner!r}."
            )
        if self.limit_train is not None and self.limit_train < 1:
            raise MnistflowError(f"limit_train must be at least 1, got {self.limit_train}.")
        if self.prune_after_trials < 0:
            raise MnistflowError(
                f"prune_after_trials must be 0 or more, got {self.prune_after_trials}."
            )
        if self.space.width is not None and base.arch != "fast":
            raise MnistflowError(
                f"width applies only to the fast network, not to preset {self.preset!r}; remove "
                "it from the search space."
            )
        if not self.space.dimensions():
            raise MnistflowError("The search space is empty; give at least one parameter.")

    def trial_epochs(self) -> int:
        """Epochs per trial: as given, else the preset's, but at least 2 while a pruner is on:
        it decides after an epoch, and after the last one there is nothing left to save (the
        fast preset trains for one)."""
        if self.epochs is not None:
            return self.epochs
        epochs = preset_config(self.preset).epochs
        return max(epochs, 2) if self.pruner != "none" else epochs

    def base_config(self) -> TrainConfig:
        return preset_config(self.preset, epochs=self.trial_epochs(), seed=self.seed)

    def as_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "epochs": self.epochs,
            "limit_train": self.limit_train,
            "space": self.space.as_dict(),
            "pruner": self.pruner,
            "prune_after_trials": self.prune_after_trials,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SweepDefinition:
        return cls(**{**raw, "space": space_from_dict(raw["space"])})


@dataclass(frozen=True)
class SweepConfig:
    """One sweep command: which study, where it is stored, and how many trials this command
    adds with how many local worker processes."""

    study: str = "mnist-sweep"
    # None: DEFAULT_STORAGE in the working directory. A path is a journal file; a URL
    # (sqlite:///..., postgresql://...) is Optuna's RDB storage.
    storage: str | None = None
    trials: int = 20
    timeout: float | None = None  # seconds for this command's trials to start in
    workers: int = 1
    # None: the study's own definition when it exists, else the defaults.
    definition: SweepDefinition | None = None
    register_as: str | None = None  # register the best trial's model under this name
    sampler_seed: int | None = None  # worker i uses sampler_seed + i

    def validate(self) -> None:
        if not self.study.strip():
            raise MnistflowError("The study name must not be empty.")
        if self.trials < 1:
            raise MnistflowError(f"trials must be at least 1, got {self.trials}.")
        if self.workers < 1:
            raise MnistflowError(f"workers must be at least 1, got {self.workers}.")
        if self.timeout is not None and not self.timeout > 0:
            raise MnistflowError(f"timeout must be positive seconds, got {self.timeout}.")
        if self.definition is not None:
            self.definition.validate()


@dataclass
class SweepSummary:
    """What a sweep command leaves; the CLI prints it, --json prints it as JSON."""

    study: str
    storage: str
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    best_trial: int
    best_params: dict[str, Any]
    best_val_accuracy: float
    best_run_id: str
    best_test_accuracy: float
    best_model_uri: str
    trials_complete: int  # in the whole study, every command's
    trials_pruned: int
    trials_failed: int
    wall_seconds: float  # this command
    registered_model: str | None = None
    registered_version: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- storage --------------------------------------------------------------------------------


def storage_url(storage: str | None) -> str:
    """The storage as Optuna takes it: postgresql:// URLs get the psycopg 3 driver."""
    url = storage or DEFAULT_STORAGE
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url.removeprefix(scheme)
    return url


def open_storage(url: str, create_tables: bool = False) -> optuna.storages.BaseStorage:
    """Optuna's storage for url: a journal file for a path, the RDB storage for a URL.

    create_tables: only the command that sets the study up creates RDB tables (under a lock);
    its workers skip the creation, which would race between them.
    """
    import optuna

    if "://" not in url:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url).expanduser()
        if not path.parent.is_dir():
            raise MnistflowError(f"Cannot keep the study in {path}: {path.parent} is no folder.")
        return JournalStorage(JournalFileBackend(str(path)))
    try:
        return optuna.storages.RDBStorage(url, skip_table_creation=not create_tables)
    except Exception as e:  # SQLAlchemy's connection and driver errors, all one sentence here
        raise MnistflowError(
            _driver_missing(e, url)
            or f"Cannot open the study storage {redact(url)} ({type(e).__name__}); check the "
            "URL and that the database server is reachable."
        ) from e


def _driver_missing(error: BaseException, url: str) -> str | None:
    """One sentence when error (or its cause) is the database driver not being installed."""
    current: BaseException | None = error
    while current is not None:
        if isinstance(current, ImportError):
            if url.startswith("postgresql"):
                return (
                    "The PostgreSQL driver (psycopg) is not installed; install the team extra: "
                    "pip install 'mnistflow[team]'."
                )
            return (
                f"The database driver for {redact(url)} is not installed ({current}); install it "
                "or keep the study in a journal file (--storage PATH)."
            )
        current = current.__cause__ or current.__context__
    return None


@contextlib.contextmanager
def _setup_lock(url: str) -> Iterator[None]:
    """Serialise study set-up (tables, study, parent run) between commands that start at once.

    PostgreSQL: an advisory lock, which works across machines. Files: an fcntl lock on a
    file beside the storage. Other databases: no lock.
    """
    if url.startswith("postgresql"):
        import sqlalchemy

        try:
            engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
            connection = engine.connect()
        except Exception as e:
            raise MnistflowError(
                _driver_missing(e, url)
                or f"Cannot reach the study storage {redact(url)} ({type(e).__name__}); check "
                "the URL and that PostgreSQL is running."
            ) from e
        try:
            connection.execute(sqlalchemy.text(f"SELECT pg_advisory_lock({_ADVISORY_LOCK_KEY})"))
            yield
        finally:
            # Closing the session releases the advisory lock with it.
            connection.close()
            engine.dispose()
        return
    path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url
    if "://" in path:
        yield
        return
    import fcntl

    lock_path = Path(path).expanduser().with_name(Path(path).name + ".setup-lock")
    try:
        handle = lock_path.open("a")
    except OSError as e:
        raise MnistflowError(f"Cannot keep the study beside {path}: {e.strerror}.") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _pruner(definition: SweepDefinition) -> optuna.pruners.BasePruner:
    import optuna

    if definition.pruner == "median":
        # Stops a trial whose validation accuracy after an epoch is below the median of the
        # earlier trials at that epoch: needs no budget or rung set-up, and with the fast
        # preset's 1-2 epochs there is only one decision point anyway, where halving would
        # keep just the top 1/reduction_factor.
        return optuna.pruners.MedianPruner(n_startup_trials=definition.prune_after_trials)
    if definition.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.NopPruner()


def _sampler(seed: int | None) -> optuna.samplers.BaseSampler:
    import optuna

    # constant_liar: running trials count as bad so parallel workers do not draw the same point.
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def _describe_pruner(definition: SweepDefinition) -> str:
    if definition.pruner == "median":
        return f"MedianPruner(n_startup_trials={definition.prune_after_trials})"
    if definition.pruner == "halving":
        return "SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)"
    return "NopPruner (no pruning)"


# -- one trial ------------------------------------------------------------------------------


class PruningReporter(Reporter):
    """Hands each epoch's validation accuracy to Optuna and ends the trial when its pruner
    says so (TrialPruned propagates out of train.fit)."""

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


def _trial_network(config: TrainConfig, params: Mapping[str, Any]) -> Any:
    from mnistflow.lifecycle import networks

    if "width" in params:
        return networks.FastNet(width=int(params["width"]))
    return networks.build(config.arch)


def _objective(trial: optuna.Trial, job: WorkerJob, splits: MnistSplits) -> float:
    """Train one trial in its own child run; return its final validation accuracy."""
    import optuna
    import torch

    from mnistflow.engines.plain import fit, resolve
    from mnistflow.lifecycle import networks
    from mnistflow.reporting import Tee
    from mnistflow.tracking import TrackedRun, set_run_tags

    started = time.perf_counter()
    params = job.definition.space.suggest(trial)
    base = resolve(job.definition.base_config())
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
    state, note, run_id, fit_seconds = "failed", "", "", 0.0
    value = float("nan")
    try:
        with (
            tempfile.TemporaryDirectory(prefix="mnistflow-trial-") as tmp,
            TrackedRun(tracking) as run,
        ):
            run_id = run.run_id
            trial.set_user_attr("mlflow_run_id", run_id)
            resolved = {
                "train": {**as_dict(train_config), "width": width},
                "data": {
                    **as_dict(DataConfig(limit_train=job.definition.limit_train)),
                    "source": splits.source,
                    "train_size": len(splits.train),
                    "val_size": len(splits.val),
                    "test_size": len(splits.test),
                },
                "trial": {"study": job.study, "number": trial.number},
            }
            config_file = Path(tmp) / "config.json"
            config_file.write_text(json.dumps(resolved, indent=2, default=str))
            run.log_config(resolved, config_file)
            run.set_tags(train_config.preset, device, tags)
            run.log_datasets(splits)
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
        if run_id:
            set_run_tags(run_id, {"trial_state": state, "mlflow.note.content": note})
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

    from mnistflow import data
    from mnistflow.tracking import ParentRun

    if job.threads:
        torch.set_num_threads(job.threads)
    uri, parent_run_id = job.tracking.tracking_uri, job.tracking.parent_run_id
    assert uri is not None and parent_run_id is not None  # set by run_sweep
    mlflow.set_tracking_uri(uri)
    parent = ParentRun(MlflowClient(uri), parent_run_id)
    study = optuna.load_study(
        study_name=job.study,
        storage=open_storage(job.storage_url),
        sampler=_sampler(job.sampler_seed),
        pruner=_pruner(job.definition),
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


def _interrupt_once(signum: int, frame: Any) -> None:
    # The first SIGTERM from the sweep's main process ends the running trial as Ctrl-C
    # would (KILLED run); further ones are ignored so that the clean-up is not cut short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _worker_process(job: WorkerJob) -> None:
    # A terminal's Ctrl-C reaches every process of the group; the main process forwards
    # exactly one SIGTERM instead, so a worker is interrupted once, not twice.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _interrupt_once)
    try:
        work(job)
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def _run_workers(jobs: list[WorkerJob]) -> None:
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


# -- the study and its parent run -----------------------------------------------------------


def _prepare(
    config: SweepConfig, tracking: TrackingConfig, url: str
) -> tuple[optuna.Study, SweepDefinition, ParentRun]:
    """Create or join the study and its parent run, once, under the set-up lock."""
    import optuna

    from mnistflow.tracking import ParentRun

    with _setup_lock(url):
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
            "pruner": _describe_pruner(definition),
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

    from mnistflow import data, reports
    from mnistflow.engines.plain import evaluate
    from mnistflow.lifecycle import logged_models, networks
    from mnistflow.tracking import TrackedRun, download_artifact, get_run, set_run_tags

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
        per_class = reports.per_class(labels, predictions)
        final = {
            "test_loss": test.loss,
            "test_macro_f1": per_class["macro avg"]["f1-score"],
            **{f"test_accuracy_digit_{d}": per_class[str(d)]["accuracy"] for d in reports.DIGITS},
        }
        resume = dataclasses.replace(
            tracking, resume_run_id=run_id, parent_run_id=None, system_metrics=False
        )
        with TrackedRun(resume) as run:
            logged = logged_models.log_torch_models(network, splits.test.images[:256], out)
            final["onnx_max_abs_diff"] = logged.onnx_max_abs_diff
            run.log_results(test.accuracy, final, logged.model_id)
            report_dir = out / "reports"
            report_dir.mkdir()
            reports.write_per_class(per_class, report_dir)
            reports.confusion_matrix_png(labels, predictions, report_dir / "confusion_matrix.png")
            reports.misclassified_png(
                splits.test.images.numpy(),
                labels,
                predictions,
                test.probabilities.numpy().astype(np.float64),
                report_dir / "misclassified.png",
            )
            run.log_folder(report_dir, "reports")
        set_run_tags(run_id, {"sweep_best": "true", "best_model_uri": logged.model_uri})
    return best, test.accuracy, logged.model_uri


def run_sweep(config: SweepConfig, tracking: TrackingConfig | None = None) -> SweepSummary:
    """Run (or join) a study: this command's trials over its workers, then the best trial
    (on validation) evaluated on the test set, its model logged and optionally registered.

    Ctrl-C: running trials end KILLED, the parent run ends KILLED with what it has, and the
    same command (or only --study) later resumes the study.
    """
    from mnistflow.lifecycle import registry
    from mnistflow.store.checks import resolve_tracking_uri

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
        _run_workers([job for job in jobs if job.trials > 0])
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
