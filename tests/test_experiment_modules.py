"""Every module of the ``experiments`` package imports, and every script's ``--help`` parses.

The scripts run as ``python -m experiments.<name>`` from the repository root; a module moved
or renamed without its imports, or a parser that no longer builds, fails here instead of on
the next long run. Most are run in this process (``runpy``, as ``-m`` does); two through a
real ``python -m`` subprocess, which checks the command itself.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

import experiments

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(experiments.__path__, "experiments.")
    if not info.name.endswith(".__main__")
)


def _is_script(name: str) -> bool:
    spec = importlib.util.find_spec(name)
    if spec.submodule_search_locations:  # a package: a script when it has a __main__
        return importlib.util.find_spec(name + ".__main__") is not None
    return 'if __name__ == "__main__":' in Path(spec.origin).read_text()


SCRIPTS = [name for name in MODULES if _is_script(name)]


def test_the_package_holds_the_scripts_the_documentation_names():
    for name in (
        "experiments.demo",
        "experiments.ot",
        "experiments.toy2d",
        "experiments.vae",
        "experiments.vae.report",
        "experiments.benchmarks.engine",
        "experiments.data.build_omniglot28",
    ):
        assert name in SCRIPTS, name
    assert "experiments.benchmarks.common" not in MODULES  # one shared helpers module: experiments.common


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    importlib.import_module(name)


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
@pytest.mark.parametrize("name", SCRIPTS)
def test_script_help_parses(name, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module(name, run_name="__main__", alter_sys=False)
    assert exit_.value.code == 0
    usage = capsys.readouterr().out
    command = "python -m " + name
    assert usage.startswith("usage: " + command), usage[:200]  # the prog is the command that runs it


@pytest.mark.parametrize("name", ["experiments.vae", "experiments.benchmarks.engine"])
def test_python_dash_m_runs_the_script_from_the_repository_root(name):
    result = subprocess.run(
        [sys.executable, "-m", name, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(f"usage: python -m {name}")
