"""Helpers shared by the experiment scripts (``python -m experiments.toy2d``, ``experiments.ot``, ...).

* command line: :func:`build_parser` (``--steps``, ``--batch-size``, ``--seed``,
  ``--device``, ``--dtype``, ``--out-dir``, ``--quick``, ...) and :func:`setup_torch`;
* training: :func:`fit_density`, maximum likelihood with Adam and a cosine learning
  rate, a tqdm progress bar and an optional evaluation callback; its steps are those of
  :class:`DensityFit`, whose state a checkpoint can hold;
* output: :func:`write_json`, :func:`markdown_table`, :func:`replace_markdown_section` and
  :func:`save_run` (both at the end of a run)
  (each script owns one ``## ...`` section of ``experiments/RESULTS.md`` and
  regenerates it from its JSON file).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = [
    "EXPERIMENTS_DIR",
    "RESULTS_DIR",
    "RESULTS_MD",
    "DensityFit",
    "add_run_options",
    "build_parser",
    "count_parameters",
    "environment",
    "fit_density",
    "format_command",
    "link",
    "markdown_table",
    "positive",
    "progress",
    "read_json",
    "read_jsonl",
    "refuse_overwrite",
    "replace_markdown_section",
    "save_run",
    "run_header",
    "seed_everything",
    "setup_torch",
    "standard_normal",
    "stopwatch",
    "write_json",
]

EXPERIMENTS_DIR = Path(__file__).resolve().parent
RESULTS_DIR = EXPERIMENTS_DIR / "results"
RESULTS_MD = EXPERIMENTS_DIR / "RESULTS.md"
_DTYPES = {"float64": torch.float64, "float32": torch.float32}


# ----------------------------------------------------------------------------- CLI


def build_parser(
    prog: str, description: str, *, steps: int, batch_size: int, lr: float
) -> argparse.ArgumentParser:
    """The options every experiment takes, with the script's own defaults; ``prog`` is the
    command that runs it (``python -m experiments.<name>``)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=steps, help="optimiser steps per model")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="fresh samples per step")
    parser.add_argument("--lr", type=float, default=lr, help="peak Adam learning rate (cosine decay)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and probes")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float64")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1 is fastest for these small problems on a shared machine)",
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="JSON and PNG output")
    parser.add_argument(
        "--results-md",
        type=lambda value: Path(value) if value else None,
        default=RESULTS_MD,
        help="Markdown file whose section this script (re)writes; '' to skip",
    )
    parser.add_argument("--quick", action="store_true", help="tiny run for smoke tests")
    parser.add_argument("--no-progress", action="store_true", help="disable the progress bars")
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="no training: regenerate the Markdown section (and, for experiments.ot, the figure) "
        "from the JSON in --out-dir",
    )
    return parser


def positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type`` that parses with ``kind`` and refuses values that are not > 0."""

    def check(text: str) -> Any:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return check


def add_run_options(parser: argparse.ArgumentParser, out: Path, quick_help: str) -> None:
    """``--seed``, ``--quick``, ``--out`` (default ``out``), ``--overwrite`` and
    ``--no-progress`` (``args.progress``), for scripts that write one JSON run
    (check it with :func:`refuse_overwrite`)."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing full run")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def refuse_overwrite(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Stop (an argparse error) when a full run would replace the one in ``args.out``."""
    if not args.quick and args.out.exists() and not args.overwrite:
        parser.error(f"{args.out} holds a run: pass --overwrite to replace it or --out elsewhere")


def parse_run_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, quick: dict[str, Any]
) -> argparse.Namespace:
    """``argv`` parsed by ``parser``, with the smoke settings ``quick`` (option name to value)
    under ``--quick``; stops when a full run would replace another (:func:`refuse_overwrite`)."""
    args = parser.parse_args(argv)
    unknown = sorted(set(quick) - set(vars(args)))
    if unknown:
        raise ValueError(f"quick settings {unknown} are not options of {parser.prog}")
    if args.quick:
        vars(args).update(quick)
    refuse_overwrite(parser, args)
    return args


def run_header(module: str, argv: Sequence[str] | None, args: argparse.Namespace) -> dict[str, Any]:
    """``command``, ``environment`` and ``settings`` (the options, paths as text) of a run of
    the script ``module`` (e.g. ``experiments.ot``) with ``argv`` (``None``: the process's own
    arguments)."""
    return {
        "command": format_command(module, sys.argv[1:] if argv is None else argv),
        "environment": environment(torch.device("cpu")),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }


def setup_torch(device: str, dtype: str, threads: int | None, seed: int) -> tuple[torch.device, torch.dtype]:
    """Set the default dtype, CPU threads and seeds; return ``(device, dtype)``."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    torch_dtype = _DTYPES[dtype]
    torch.set_default_dtype(torch_dtype)
    if threads:
        torch.set_num_threads(threads)
    torch_device = torch.device(device)
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available")
    seed_everything(seed)
    return torch_device, torch_dtype


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) through Pyro."""
    pyro.set_rng_seed(seed)


def format_command(module: str, argv: Sequence[str]) -> str:
    """The shell command, run from the repository root, that reproduces a run of the script
    ``module`` with ``argv``.

    >>> format_command("experiments.ot", ["--steps", "10", "--out-dir", "a b"])
    "python -m experiments.ot --steps 10 --out-dir 'a b'"
    """
    return " ".join(["python", "-m", module, *map(shlex.quote, argv)])


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and hardware, recorded next to the results."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ------------------------------------------------------------------------ training


def standard_normal(dim: int, device: torch.device, dtype: torch.dtype) -> dist.Distribution:
    """The base distribution :math:`N(0, I_d)` as a Pyro distribution with event dim 1."""
    zeros = torch.zeros(dim, device=device, dtype=dtype)
    return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def progress(total: int, desc: str, enabled: bool = True, leave: bool = False) -> tqdm:
    """A tqdm bar on stderr (a no-op bar when ``enabled`` is false)."""
    return tqdm(total=total, desc=desc, disable=not enabled, leave=leave, dynamic_ncols=True)


class DensityFit:
    r"""One maximum-likelihood fit, step by step: Adam with a cosine decay of the learning
    rate from ``lr`` to ``lr * final_lr_fraction`` over ``steps`` steps, gradients clipped to
    norm ``max_grad_norm``. :meth:`step` minimises :math:`-\frac1B\sum_i \log p(x_i)` on one
    batch; :meth:`state_dict` and :meth:`load_state_dict` (optimiser, schedule and steps
    done, tensors and plain data) let a checkpoint resume the fit exactly.
    """

    def __init__(
        self,
        module: nn.Module,
        distribution: dist.Distribution,
        steps: int,
        lr: float,
        *,
        final_lr_fraction: float = 0.01,
        max_grad_norm: float | None = 100.0,
        desc: str = "fit",
    ) -> None:
        self.module, self.distribution, self.steps = module, distribution, steps
        self.max_grad_norm, self.desc = max_grad_norm, desc
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=lr)

        def factor(step: int) -> float:
            t = min(step / max(steps, 1), 1.0)
            return final_lr_fraction + (1.0 - final_lr_fraction) * 0.5 * (1.0 + math.cos(math.pi * t))

        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.done = 0

    def step(self, batch: Tensor) -> float:
        """One optimiser step on ``batch``; returns its loss (a non-finite one raises)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = -self.distribution.log_prob(batch).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{self.desc}: non-finite loss {float(loss)} at step {self.done}")
        loss.backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.schedule.step()
        self.done += 1
        return float(loss.detach())

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "done": self.done,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.done = int(state["done"])


def fit_density(
    module: nn.Module,
    distribution: dist.Distribution,
    sample_batch: Callable[[int], Tensor],
    steps: int,
    lr: float,
    *,
    final_lr_fraction: float = 0.01,
    max_grad_norm: float | None = 100.0,
    callback: Callable[[int], None] | None = None,
    callback_every: int = 0,
    desc: str = "fit",
    show_progress: bool = True,
) -> list[float]:
    r"""Maximum likelihood: minimise :math:`-\frac1B\sum_i \log p(x_i)` over fresh batches.

    The steps of a :class:`DensityFit` (Adam, cosine decay from ``lr`` to
    ``lr * final_lr_fraction``). ``sample_batch(step)`` returns the batch of a step.
    ``callback(step)`` runs before the first step, every ``callback_every`` steps and after
    the last one (``step`` counts steps done). Returns the training losses.
    """
    fit = DensityFit(
        module,
        distribution,
        steps,
        lr,
        final_lr_fraction=final_lr_fraction,
        max_grad_norm=max_grad_norm,
        desc=desc,
    )
    module.train()
    losses: list[float] = []
    if callback is not None:
        callback(0)
    with progress(steps, desc, show_progress) as bar:
        for step in range(steps):
            losses.append(fit.step(sample_batch(step)))
            bar.update()
            if step % 25 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            done = step + 1
            if callback is not None and (done == steps or (callback_every and done % callback_every == 0)):
                callback(done)
    module.eval()
    return losses


@contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    """``with stopwatch() as t: ...`` then ``t["seconds"]`` holds the elapsed time."""
    record = {"seconds": 0.0}
    start = time.perf_counter()
    try:
        yield record
    finally:
        record["seconds"] = time.perf_counter() - start


# -------------------------------------------------------------------------- output


def save_figure(fig: Any, path: Path, dpi: int = 90) -> Path:
    """Lay out, save (creating the folder) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def write_json(path: Path, data: Any) -> Path:
    """Write ``data`` as indented JSON (creating the folder); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, allow_nan=True) + "\n")
    return path


def read_json(path: Path) -> Any:
    """The contents of a JSON file (results, caches); a damaged file raises ``ValueError``
    naming it and the place of the damage.

    >>> import pathlib, tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = pathlib.Path(folder) / "results.json"
    ...     _ = path.write_text('{"elbo": -3.2')
    ...     read_json(path)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: .../results.json is not valid JSON (line 1, column 14: Expecting ',' delimiter): ...
    """
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON (line {error.lineno}, column {error.colno}: "
            f"{error.msg}): restore it from git or rerun the script that wrote it"
        ) from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file such as a run's ``metrics.jsonl``.

    A last line that does not parse was cut off by a kill during its write: it is dropped
    with a warning. A damaged line elsewhere raises :class:`ValueError` naming the file and
    the line.

    >>> import pathlib, tempfile, warnings
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = pathlib.Path(folder) / "metrics.jsonl"
    ...     _ = path.write_text('{"epoch": 1}\\n{"epoch": 2, "lo')
    ...     with warnings.catch_warnings(record=True):
    ...         read_jsonl(path)
    [{'epoch': 1}]
    """
    path = Path(path)
    lines = path.read_text().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):
                warnings.warn(
                    f"{path}: dropped its last line, cut off in the middle of a record "
                    f"(a write interrupted by a kill): {line[:80]!r}",
                    stacklevel=2,
                )
                break
            raise ValueError(
                f"{path}, line {number}: not a JSON record ({error.msg}); the file "
                "is damaged: repair or delete that line"
            ) from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {number}: a JSON record must be an object, got {line[:80]!r}")
        records.append(record)
    return records


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub Markdown table; ``align`` is one letter per column (``l``/``r``/``c``)."""
    align = align or "l" + "r" * (len(headers) - 1)
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = [
        "| " + " | ".join(map(str, headers)) + " |",
        "| " + " | ".join(marks[a] for a in align) + " |",
    ]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def replace_markdown_section(path: Path, title: str, body: str) -> Path:
    """Replace (or append) the ``## title`` section of a Markdown file, keeping the others."""
    path = Path(path)
    text = path.read_text() if path.exists() else "# Experiment results\n"
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}[ \t]*\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def save_run(
    results: dict[str, Any],
    args: argparse.Namespace,
    default_out: Path,
    title: str,
    render: Callable[[dict[str, Any]], str],
) -> None:
    """The end of a script's run: ``results`` to ``args.out`` (nothing for ``--quick``) and, when
    that is the script's default file, the RESULTS.md section ``title`` regenerated from them by
    ``render``; other runs (variants, subsets) keep to their own file."""
    if args.quick:
        return
    write_json(args.out, results)
    if Path(args.out) == Path(default_out):
        replace_markdown_section(RESULTS_MD, title, render(results))


def relative_to_repo(path: Path) -> str:
    """``path`` relative to the repository root when possible (for links in Markdown)."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(EXPERIMENTS_DIR.parent))
    except ValueError:
        return str(path)


def link(path: str | Path, markdown_path: Path) -> str:
    """A link to ``path`` (absolute, or relative to the repository root) from ``markdown_path``."""
    target = Path(path)
    if not target.is_absolute():
        target = EXPERIMENTS_DIR.parent / target
    return os.path.relpath(target, Path(markdown_path).resolve().parent)


def script_argv() -> list[str]:
    """The command-line arguments of this process (without the program name)."""
    return list(sys.argv[1:])
