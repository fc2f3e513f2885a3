"""Shared pytest setup: float64 by default, one thread per worker, ``--device``."""

import importlib.util

import pytest
import torch

# pyro_cpflow/zuko_bridge.py needs the optional extra pyro-cpflow[zuko]: without zuko, its
# doctests are not collected (importing it would raise the ImportError that says so)
collect_ignore = [] if importlib.util.find_spec("zuko") else ["pyro_cpflow/zuko_bridge.py"]


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="torch device for the tests (e.g. cuda)")


@pytest.fixture(autouse=True)
def _float64_and_seed():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def device(request) -> torch.device:
    return torch.device(request.config.getoption("--device"))


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace["torch"] = torch


def pytest_configure(config):
    torch.set_num_threads(1)
