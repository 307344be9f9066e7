"""`python -m mnistflow` runs the command-line program."""

from mnistflow.cli import app

app()
