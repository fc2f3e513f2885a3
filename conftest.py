"""Shared pytest setup: one thread per worker, a fixed seed, ``--device`` and ``--dtype``.

``pytest --device cuda --dtype float32`` runs the suite on a GPU in single precision: the
``device`` and ``dtype`` fixtures return the options, and every test starts with
``torch.set_default_dtype(dtype)`` (float64 unless ``--dtype`` says otherwise). A test or
module whose tolerances are those of float64 pins it with ``@pytest.mark.float64``, and the
doctests are pinned to float64.
"""

import importlib.util

import pyro
import pytest
import torch
from _pytest.doctest import DoctestItem

# pyro_cpflow/zuko_bridge.py needs the optional extra pyro-cpflow[zuko]: without zuko, its
# doctests are not collected (importing it would raise the ImportError that says so)
collect_ignore = [] if importlib.util.find_spec("zuko") else ["pyro_cpflow/zuko_bridge.py"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="torch device for the tests (e.g. cuda)")
    parser.addoption(
        "--dtype",
        default="float64",
        choices=sorted(DTYPES),
        help="default torch dtype for the tests (float64 unless given)",
    )


def pytest_configure(config):
    torch.set_num_threads(1)
    config.addinivalue_line("markers", "float64: runs in float64 whatever --dtype says")


@pytest.fixture
def dtype(request) -> torch.dtype:
    """The dtype given by ``--dtype`` (float64 by default)."""
    return DTYPES[request.config.getoption("--dtype")]


@pytest.fixture
def device(request) -> torch.device:
    """The device given by ``--device``; a test asking for an absent CUDA device is skipped."""
    device = torch.device(request.config.getoption("--device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    return device


@pytest.fixture(autouse=True)
def _default_dtype_and_seed(request):
    # doctests print float64 values: they are pinned too
    pinned = request.node.get_closest_marker("float64") is not None or isinstance(request.node, DoctestItem)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64 if pinned else DTYPES[request.config.getoption("--dtype")])
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(autouse=True)
def _fresh_param_store():
    # Pyro's global param store outlives a test: a guide left in it by one test (or doctest)
    # must not hand its parameters to the next
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace["torch"] = torch
