"""The README's code runs as written (with its loops shortened)."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _skip_without_extras(code):
    """Skip a block that needs the optional extra pyro-cpflow[zuko] when zuko is missing."""
    if "zuko" in code and importlib.util.find_spec("zuko") is None:
        pytest.skip("needs zuko: pip install pyro-cpflow[zuko]")


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_block_runs(index):
    code = re.sub(r"range\(\d+\)", "range(3)", _python_blocks()[index])
    _skip_without_extras(code)
    torch.set_default_dtype(torch.float32)  # as a user's session would be
    exec(compile(code, f"README.md block {index}", "exec"), {"__name__": "__readme__"})


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_block_runs_in_full(index):
    _skip_without_extras(_python_blocks()[index])
    torch.set_default_dtype(torch.float32)
    exec(compile(_python_blocks()[index], f"README.md block {index}", "exec"), {"__name__": "__readme__"})
