"""Run the learner's tour (notebooks/mlflow_tour.py) top to bottom in a fresh kernel, on a
fresh store, and save it with its outputs as notebooks/mlflow_tour.ipynb (`make tour`).

The script is the source: the notebook is rewritten from it. When a cell fails, its error is
printed and the committed notebook is left as it was.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jupytext
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SCRIPT, NOTEBOOK = NOTEBOOKS / "mlflow_tour.py", NOTEBOOKS / "mlflow_tour.ipynb"


def cells(notebook: jupytext.jupytext.NotebookNode) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in notebook.cells]


def main() -> int:
    notebook = jupytext.read(SCRIPT)
    if (
        NOTEBOOK.exists()
        and NOTEBOOK.stat().st_mtime > SCRIPT.stat().st_mtime
        and cells(jupytext.read(NOTEBOOK)) != cells(notebook)
    ):
        # Edited in Jupyter without jupytext: rewriting the notebook would lose the edits.
        print(
            f"{NOTEBOOK.name} has changes that {SCRIPT.name} lacks; bring them over with "
            "`jupytext --sync notebooks/mlflow_tour.ipynb` first.",
            file=sys.stderr,
        )
        return 1
    client = NotebookClient(
        notebook,
        timeout=600,  # per cell
        kernel_name="python3",
        # No start and end times in every cell's metadata: a rerun changes only the outputs.
        record_timing=False,
        resources={"metadata": {"path": str(NOTEBOOKS)}},  # the kernel's working directory
    )
    try:
        client.execute()
    except CellExecutionError as e:
        print(f"The tour failed; {NOTEBOOK.name} is unchanged.\n{e}", file=sys.stderr)
        return 1
    jupytext.write(notebook, NOTEBOOK)
    print(f"Saved {NOTEBOOK.name} with the outputs of this run.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
