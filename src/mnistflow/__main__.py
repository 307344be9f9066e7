"""`python -m mnistflow` runs the command-line program."""

from mnistflow.cli.app import app

app()
