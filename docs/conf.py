"""Sphinx configuration of the pyro_cpflow documentation (``make docs``).

The build is offline: no intersphinx, the notebooks are rendered from their committed outputs
(never executed), and every name in ``pyro_cpflow.__all__`` must be documented, or the build
fails (``-W``).
"""

from __future__ import annotations

import json
import pkgutil
import re
import sys
from pathlib import Path

from sphinx.util import logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an installed copy

import pyro_cpflow

ROOT = Path(__file__).resolve().parents[1]

project = "pyro_cpflow"
author = "the pyro_cpflow authors"
copyright = "the pyro_cpflow authors"
release = version = pyro_cpflow.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
nitpicky = False  # references to torch and Pyro cannot resolve offline (no intersphinx)
html_theme = "alabaster"
html_theme_options = {"description": "Convex Potential Flows as Pyro transforms", "page_width": "1100px"}
html_static_path: list[str] = []

# the docstrings are reST with :param: fields and .. math:: blocks (no napoleon)
autodoc_default_options = {
    "members": True,
    "undoc-members": True,
    "member-order": "bysource",
    "show-inheritance": True,
}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_inherit_docstrings = False  # no torch docstrings on undocumented overrides (forward)
add_module_names = False

# the tutorials: rendered from the outputs committed with them, never executed
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
NOTEBOOKS = ROOT / "notebooks"
TUTORIALS = Path(__file__).resolve().parent / "tutorials"


def _repository_links_as_text(notebook: str) -> str:
    """The notebooks link repository files (``../experiments/RESULTS.md``) that are not part of
    the documentation: in the copy, such a Markdown link becomes its text."""
    data = json.loads(notebook)
    for cell in data["cells"]:
        if cell["cell_type"] == "markdown":
            source = "".join(cell["source"])
            cell["source"] = re.sub(r"\[([^\]]*)\]\((\.\./[^)\s]*)\)", r"\1", source)
    return json.dumps(data, indent=1, ensure_ascii=False) + "\n"


def _copy_notebooks() -> None:
    """Sphinx reads sources under docs/ only: copy ../notebooks/*.ipynb into docs/tutorials/
    (gitignored), rewritten only where a copy differs, so an unchanged notebook is not read again."""
    TUTORIALS.mkdir(exist_ok=True)
    wanted = {path.name for path in NOTEBOOKS.glob("*.ipynb")}
    for stale in TUTORIALS.glob("*.ipynb"):
        if stale.name not in wanted:
            stale.unlink()
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        target = TUTORIALS / path.name
        text = _repository_links_as_text(path.read_text(encoding="utf-8"))
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8")


_copy_notebooks()


def _canonical(name: str) -> str | None:
    """``pyro_cpflow.CPFlow`` -> ``pyro_cpflow.transforms.CPFlow``: the module that defines a
    class or function, where it is documented (``None`` if ``name`` imports nothing)."""
    try:
        obj = pkgutil.resolve_name(name)
    except (ImportError, AttributeError, ValueError):
        return None
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not (isinstance(module, str) and isinstance(qualname, str)):
        return None
    return f"{module}.{qualname}"


def _resolve_reexports(app, env, node, contnode):  # type: ignore[no-untyped-def]
    """Let a reference to a re-exported name reach its documentation: ``:class:`~pyro_cpflow.CPFlow```
    from anywhere, ``:class:`InverseReport``` in :mod:`pyro_cpflow.solvers` (which imports it)."""
    if node.get("refdomain") != "py":
        return None
    target, module = node.get("reftarget", ""), node.get("py:module")
    candidates = [target] + ([f"{module}.{target}"] if module else [])
    for candidate in candidates:
        if not candidate.startswith("pyro_cpflow."):
            continue
        canonical = _canonical(candidate)
        if canonical is not None and canonical != candidate:
            resolved = env.get_domain("py").resolve_xref(
                env, node["refdoc"], app.builder, node["reftype"], canonical, node, contnode
            )
            if resolved is not None:
                return resolved
    return None


def _check_public_names_documented(app, env) -> None:  # type: ignore[no-untyped-def]
    """Fail the build (a warning under -W) when a name of ``pyro_cpflow.__all__`` has no entry."""
    documented = set(env.get_domain("py").objects)
    for name in pyro_cpflow.__all__:
        target = _canonical(f"pyro_cpflow.{name}")
        if target not in documented:
            logging.getLogger(__name__).warning(
                "pyro_cpflow.%s (%s) is in pyro_cpflow.__all__ but not in the API reference", name, target
            )


def setup(app):  # type: ignore[no-untyped-def]
    app.connect("missing-reference", _resolve_reexports)
    app.connect("env-check-consistency", _check_public_names_documented)
