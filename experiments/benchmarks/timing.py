"""Timing, peak memory and result files: the helpers of the benchmark scripts in this folder.

* :func:`base_parser` - the common command line (``--quick``, ``--out``, ``--seed``,
  ``--device``, ``--threads``);
* :func:`setup` - seeds, thread count and device from those options;
* :func:`time_call` - wall time of a callable: warm-up runs, then the median of
  repeats (bounded by a time budget so slow configurations run fewer times);
* :func:`fmt` - table cells (the tables themselves: :func:`experiments.common.markdown_table`);
* :func:`save_results` - the JSON file (with :func:`machine_info`) and a ``.md`` copy
  of the printed tables next to it;
* :func:`peak_memory_bytes` - peak tensor memory allocated while a callable runs (on the
  CPU from the profiler's allocation events, on CUDA from the caching allocator).

Run the scripts as modules from the repository root:
``python -m experiments.benchmarks.<script>``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # quiet the profiler's C++ logging

import torch
from torch.profiler import ProfilerActivity, profile

__all__ = [
    "RESULTS_DIR",
    "Timing",
    "base_parser",
    "default_output",
    "fmt",
    "machine_info",
    "machine_summary",
    "peak_memory_bytes",
    "save_results",
    "setup",
    "synchronize",
    "time_call",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
"""Default folder of the JSON and Markdown outputs."""

T = TypeVar("T")


def default_output(script_file: str) -> Path:
    """``results/<script name>.json`` next to this module."""
    return RESULTS_DIR / f"{Path(script_file).stem}.json"


def base_parser(script_file: str, description: str) -> argparse.ArgumentParser:
    """The options every benchmark accepts; scripts add their own."""
    parser = argparse.ArgumentParser(
        prog=f"python -m experiments.benchmarks.{Path(script_file).stem}",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (well under 30 s)")
    parser.add_argument(
        "--out",
        type=Path,
        default=default_output(script_file),
        help="JSON output; the printed tables go next to it with suffix .md (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="torch.manual_seed (default 0)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: stable timings on a shared machine; "
        "0 keeps torch's default)",
    )
    return parser


def setup(args: argparse.Namespace) -> torch.device:
    """Apply ``--seed`` and ``--threads``; return the ``--device`` (checked)."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was given but CUDA is not available")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so wall times include them (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Wall times of the timed runs (warm-up excluded); ``median_s`` summarises them."""

    times_s: list[float] = field(default_factory=list)
    warmup: int = 0

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def repeats(self) -> int:
        return len(self.times_s)

    def as_dict(self) -> dict[str, Any]:
        return {"median_s": self.median_s, "times_s": self.times_s, "warmup": self.warmup}


def time_call(
    fn: Callable[[], T],
    device: torch.device,
    warmup: int = 1,
    repeats: int = 5,
    budget_s: float | None = None,
    min_repeats: int = 1,
) -> tuple[Timing, T]:
    """Run ``fn`` ``warmup`` times untimed, then time up to ``repeats`` runs.

    Repeats stop early once ``min_repeats`` runs are done and their total time exceeds
    ``budget_s``. Returns the timings and the result of the last run.
    """
    if repeats < 1:
        raise ValueError("repeats must be positive")
    for _ in range(warmup):
        fn()
    synchronize(device)
    timing = Timing(warmup=warmup)
    result: T
    while True:
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        timing.times_s.append(time.perf_counter() - start)
        enough = len(timing.times_s) >= max(min_repeats, 1)
        over_budget = budget_s is not None and sum(timing.times_s) >= budget_s
        if len(timing.times_s) >= repeats or (enough and over_budget):
            return timing, result


def fmt(value: Any, spec: str = ".3g") -> str:
    """Format a table cell: ``None`` and NaN as an em dash, numbers with ``spec``."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and math.isnan(value):
            return "—"
        return format(value, spec)
    return str(value)


def machine_info(device: torch.device) -> dict[str, Any]:
    """Versions, CPU count, threads and device, to store with every result."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "device": str(device),
    }
    if hasattr(os, "getloadavg"):
        info["load_average"] = list(os.getloadavg())
    if device.type == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(device)
        info["cuda_version"] = torch.version.cuda
    return info


def machine_summary(device: torch.device) -> str:
    """One line for the printed tables: versions, threads and the load when they ran."""
    info = machine_info(device)
    load = info.get("load_average")
    load_text = f", load average {load[0]:.1f}" if load else ""
    return (
        f"torch {info['torch']}, device {info['device']}, {info['cpu_count']} CPUs, "
        f"{info['torch_threads']} torch thread(s){load_text}"
    )


def _jsonable(value: Any) -> Any:
    """Strict JSON: non-finite floats become ``None``, tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def save_results(
    path: Path,
    payload: dict[str, Any],
    markdown: str,
    device: torch.device,
    args: argparse.Namespace,
    started: float,
) -> None:
    """Write ``payload`` (plus machine info, options, runtime) as JSON and ``markdown`` as .md."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "total_runtime_s": time.perf_counter() - started,
        **payload,
    }
    path.write_text(json.dumps(_jsonable(document), indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown.rstrip() + "\n")
    print(f"\nsaved {path} and {path.with_suffix('.md')}")


# ---------------------------------------------------------------------------------------
# peak memory
# ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: the profiler logs start/stop lines from C++."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


def _profiled_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of the running sum of tensor allocations reported to the profiler by ``fn``."""
    with _native_stderr_silenced():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def _cuda_peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak tensor memory allocated while ``fn`` runs.

    *CPU*: ``fn`` runs under ``torch.profiler.profile(profile_memory=True)``; the CPU
    allocator reports every allocation and release to the profiler, and the maximum of
    their running sum in time order is the peak of the tensor memory allocated by
    ``fn`` (tensors that existed before, and memory outside torch's allocator such as
    BLAS scratch buffers, are not counted). *CUDA*: ``torch.cuda.max_memory_allocated()``
    after ``reset_peak_memory_stats()``, minus the memory allocated before ``fn``.

    This counts exactly the tensor memory (the autograd graph's saved tensors, Hessian
    columns, CG vectors, gradients), independent of the system allocator, whereas
    ``ru_maxrss`` is a process-wide high-water mark that includes the interpreter and
    libraries and never goes down, and ``tracemalloc`` does not see torch tensors at all.
    """
    if device.type == "cuda":
        return _cuda_peak_bytes(fn, device)
    if device.type == "cpu":
        return _profiled_peak_bytes(fn)
    raise ValueError(f"peak memory is measured on cpu and cuda only, not {device.type}")
