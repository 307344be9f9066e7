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

- targets.py: the spool store and its targets (where each is, the tags tying a spool run to
  its target run), the clients and request settings of a copy, why a copy failed
- copier.py: RunCopier, one run copied step by step, idempotently
- forwarder.py: copying while training runs, and the final copy with its deadline
- sync.py: `mnistflow sync`, the waiting runs and the per-run lock
- session.py: Session, one training run spooled from its start to its final copy

Imports config, store and lifecycle.registry (a registration the run asked for is made on
the target once the run is there); tracking.py above opens Sessions.
"""
