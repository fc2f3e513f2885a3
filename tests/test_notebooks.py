"""Execute every tutorial notebook in ``notebooks/`` in quick mode (``CPFLOW_QUICK=1``): one in
the default suite, the others marked slow.

Each notebook runs top to bottom in a fresh kernel started from this interpreter (the
project's virtual environment), and the test fails on the first cell that raises. The
executed copy stays in memory: the committed notebooks, with the outputs of a full run,
are never overwritten.
"""

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL_NAME = "pyro-cpflow-test"
CELL_TIMEOUT_S = 300


@pytest.fixture
def kernel_from_this_interpreter(tmp_path, monkeypatch):
    """A kernel spec, found first on JUPYTER_PATH, that runs ``sys.executable``."""
    spec_dir = tmp_path / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "pyro-cpflow tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    monkeypatch.setenv("CPFLOW_QUICK", "1")  # inherited by the kernel process
    return KERNEL_NAME


def test_every_notebook_has_a_quick_mode_read_from_the_environment():
    """The quick runs below are quick only if each notebook reads ``CPFLOW_QUICK`` into ``QUICK``
    and uses it (and an empty folder would leave nothing to run)."""
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"
    for path in NOTEBOOKS:
        code = [cell.source for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"]
        assert any('QUICK = os.environ.get("CPFLOW_QUICK") == "1"' in source for source in code), path.name
        assert sum(source.count("QUICK") for source in code) > 1, f"{path.name} never uses QUICK"


# the default suite runs one notebook (the quickest, about 40 s on two cores); ``make test-slow``
# runs the others, still in quick mode
DEFAULT_NOTEBOOK = "03_amortized_vae"
NOTEBOOK_PARAMS = [
    pytest.param(path, id=path.stem, marks=() if path.stem == DEFAULT_NOTEBOOK else pytest.mark.slow)
    for path in NOTEBOOKS
]


def test_the_default_suite_runs_a_notebook():
    """A renamed or removed notebook must not leave the default suite without one."""
    assert DEFAULT_NOTEBOOK in [p.stem for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOK_PARAMS)
def test_notebook_runs_in_quick_mode(path, kernel_from_this_interpreter):
    notebook = nbformat.read(path, as_version=4)
    # a last cell checks that the kernel ran this interpreter and saw quick mode
    notebook.cells.append(
        nbformat.v4.new_code_cell(
            "import os, sys\n"
            f"assert sys.executable == {sys.executable!r}, sys.executable\n"
            "assert QUICK and os.environ['CPFLOW_QUICK'] == '1'"
        )
    )
    client = nbclient.NotebookClient(
        notebook,
        kernel_name=kernel_from_this_interpreter,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, on any error
