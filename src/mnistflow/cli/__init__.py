"""The `mnistflow` command line: the only place that parses arguments.

- app.py: the Typer app, every command registered in --help's order, the error handling
- options.py: the options several commands share (typing.Annotated aliases), defined once
- output.py: consoles, result tables and --json, the progress bar, exit codes
- training.py (train, baseline, pipeline, sync), models.py (register, rollback, promote),
  predict.py (predict, serve), sweep.py (sweep), store.py (ui, doctor)

The top of the stack: may import anything in mnistflow; nothing imports it. Each command
imports what it runs inside its function: the modules below bring in torch and MLflow, and
`mnistflow --help` must start in a fraction of that time.
"""
