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

- space.py: the search space (ranges and choices over TrainConfig fields, YAML)
- definition.py: SweepDefinition (what a study is), SweepConfig, SweepSummary
- storage.py: where a study lives (journal file or database), the set-up lock, pruner, sampler
- workers.py: one trial (a nested run through tracking.TrackedRun) and the worker processes
- study.py: run_sweep: the study and its parent run, the best trial's model, registration

Imports engines.plain (fit, evaluate), lifecycle, tracking, store and below; cli/ above.
space, definition and storage need no torch, so `mnistflow sweep` parses its options fast.
"""
