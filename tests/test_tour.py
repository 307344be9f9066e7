"""The learner's tour (notebooks/mlflow_tour.ipynb): the notebook and its paired script say
the same, the committed notebook carries one clean run, and it runs top to bottom on the
current code (a failing cell fails the test)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import jupytext
import nbformat
import pytest
from mlflow.tracking import MlflowClient
from nbclient import NotebookClient

from conftest import ROOT

NOTEBOOK = ROOT / "notebooks" / "mlflow_tour.ipynb"
SCRIPT = ROOT / "notebooks" / "mlflow_tour.py"


def cells(notebook: nbformat.NotebookNode, kind: str) -> list[str]:
    return [cell.source for cell in notebook.cells if cell.cell_type == kind]


def test_notebook_and_script_have_the_same_cells():
    """Run `make tour` (or `jupytext --sync notebooks/mlflow_tour.py`) when this fails."""
    notebook, script = jupytext.read(NOTEBOOK), jupytext.read(SCRIPT)
    assert cells(notebook, "code") == cells(script, "code")
    assert cells(notebook, "markdown") == cells(script, "markdown")


def test_committed_notebook_carries_one_whole_clean_run():
    """Executed top to bottom in one go (as `make tour` does), no error, and no path of the
    machine that ran it in the outputs."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    outputs = [output for cell in code for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = json.dumps(outputs)
    for path in {str(ROOT), str(Path.home()), tempfile.gettempdir()}:
        assert path not in text


@pytest.mark.slow
def test_tour_runs_top_to_bottom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The script as a notebook, executed in a fresh kernel with its store under tmp_path."""
    tour = tmp_path / "tour"
    # The kernel is a child process: it inherits this environment (the MNIST mirror and the
    # spool from conftest, no MLFLOW_TRACKING_URI).
    monkeypatch.setenv("MNISTFLOW_TOUR_DIR", str(tour))
    notebook = jupytext.read(SCRIPT)
    NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    ).execute()  # raises CellExecutionError, with the cell and its traceback, on a failure

    client = MlflowClient(f"sqlite:///{tour / 'mlflow.db'}")
    experiments = {e.name for e in client.search_experiments()}
    assert {"mlflow-tour", "tour-mnistflow", "mnist-promotion", "tour-project"} <= experiments
    assert str(client.get_model_version_by_alias("tour-digits", "champion").version) == "1"
    # The first mnistflow version was promoted, the second refused.
    assert str(client.get_model_version_by_alias("tour-mnist", "champion").version) == "1"
    refused = client.get_model_version("tour-mnist", "2")
    assert "promotion_refused" in refused.tags
