"""The Colab notebook: its .ipynb is paired with the jupytext text file, and it executes end to
end on the tiny variant."""

from pathlib import Path

import jupytext
import nbclient
import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
TEXT = REPO / "notebooks" / "moa_demo.py"
NOTEBOOK = REPO / "notebooks" / "moa_demo.ipynb"


def _sources(notebook):
  return [(cell.cell_type, cell.source.strip()) for cell in notebook.cells]


def test_ipynb_is_paired_with_the_text_file():
  assert _sources(jupytext.read(TEXT)) == _sources(nbformat.read(NOTEBOOK, as_version=4)), (
    "notebooks/moa_demo.ipynb is out of date: run "
    "`jupytext --to ipynb notebooks/moa_demo.py -o notebooks/moa_demo.ipynb`"
  )


@pytest.mark.slow
def test_notebook_runs_on_the_tiny_variant(tmp_path, monkeypatch):
  monkeypatch.setenv("MOA_NOTEBOOK_VARIANT", "tiny")
  monkeypatch.setenv("MOA_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
  notebook = jupytext.read(TEXT)
  client = nbclient.NotebookClient(
    notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
  )
  client.execute()
  errors = [
    o for cell in notebook.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"
  ]
  assert not errors
  assert (tmp_path / "run" / "results.json").is_file()
  assert (tmp_path / "run" / "compress" / "plan.json").is_file()
