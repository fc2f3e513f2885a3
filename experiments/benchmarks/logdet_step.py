r"""Time and peak memory of one CP-Flow training step, exact against stochastic log-det.

What is measured
----------------
One training step of ``flow = cpflow(d, hidden_dims=(64, 64), logdet=mode)``::

    y = flow(x)                                   # x: (batch, d), standard normal
    logdet = flow.log_abs_det_jacobian(x, y)
    loss = -logdet.mean() + 0.5 * (y ** 2).sum(-1).mean()
    loss.backward()

(parameter gradients are reset before, and ``x`` is a fresh tensor each step so the
flow's one-entry cache cannot return the previous step's ``y``). ``mode`` is
``"exact"`` (dense Hessian from ``d`` Hessian-vector products, Cholesky) or
``"stochastic"`` (Lanczos value, CG gradient surrogate; library defaults:
``num_probes=1``, ``lanczos_steps=10``, ``cg_rtol=1e-6``, ``cg_max_iter=2d``), for
``d`` in ``--dims`` (2 ... 256), batch 100, float32 and float64.

**Table 1** - per configuration: time per step (one warm-up step, then the median of
up to ``--repeats`` steps within ``--budget`` seconds), peak memory of the step, and
for the stochastic mode the CG iterations of its gradient solve (mean / max over the
batch of ``flow.last_cg.iterations``) and the fraction of samples that met
``cg_rtol``. Exact configurations with ``d > --max-exact-dim`` are skipped and shown
as such.

**Table 2** - peak memory of the stochastic step with the CG solve forced to run
exactly 10 and exactly 100 iterations (``flow.cg_rtol = 0.0``, ``flow.cg_max_iter =
N``, ``on_failure="ignore"``), float64, ``d`` in ``--memory-dims``. The CG products
carry no graph, so memory should not depend on the iteration count (expected: flat
within 20 %). At small ``d`` the solve can stop before ``N`` because its recursively
updated residual underflows to exactly 0 (a zero tolerance is then met); the table
shows the iterations actually done.

**Recommended threshold** of ``logdet="auto"`` (``exact_max_dim``): for each dtype,
the largest ``d`` of the grid at which exact is not slower than stochastic (time
ratio <= 1; the ratios are in the table). It is printed and stored in the JSON
(``recommended_exact_max_dim``). Speed only: the exact mode also has exact,
noise-free gradients, which argues for a slightly larger threshold when in doubt.

How peak memory is measured
---------------------------
*CPU*: the step runs once under ``torch.profiler.profile(profile_memory=True)``.
PyTorch's CPU allocator then reports every tensor allocation and release (with its
size) to the profiler; summing these events in time order gives the bytes of tensor
memory allocated by the step and alive at each moment, and the maximum of that
running sum is the peak (tensors that existed before the step, and their release,
are not counted). This counts exactly the tensor memory - the autograd graph's saved
tensors, Hessian columns, CG vectors, gradients - independent of the system
allocator, whereas ``ru_maxrss`` is a process-wide high-water mark that includes the
interpreter and libraries and never goes down (it would need one subprocess per
configuration), and ``tracemalloc`` does not see torch tensors at all. Memory
outside torch's allocator (BLAS scratch buffers) is not included. The profiled step
is separate from the timed steps.
*CUDA* (``--device cuda``): ``torch.cuda.max_memory_allocated()`` after
``reset_peak_memory_stats()``, minus the memory allocated before the step - the same
quantity, from the caching allocator's own statistics.

How to run
----------
From the repository root::

    nice -n 10 .venv/bin/python experiments/benchmarks/logdet_step.py        # about 1 minute
    .venv/bin/python experiments/benchmarks/logdet_step.py --quick           # smoke run, < 30 s
    .venv/bin/python experiments/benchmarks/logdet_step.py --device cuda
    .venv/bin/python experiments/benchmarks/logdet_step.py --max-exact-dim 128

Results go to ``experiments/benchmarks/results/logdet_step.json`` (``--out``) and
the printed tables to the ``.md`` file next to it. ``--threads`` (default 1) sets
torch's intra-op threads: one thread gives stable timings on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # quiet the profiler's C++ logging

import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from common import (  # noqa: E402
    base_parser,
    fmt,
    machine_summary,
    markdown_table,
    save_results,
    setup,
    time_call,
)
from pyro_cpflow import cpflow  # noqa: E402
from pyro_cpflow.transforms import DEFAULT_EXACT_MAX_DIM, CPFlow  # noqa: E402

MODES = ("exact", "stochastic")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
HIDDEN = (64, 64)
MIB = 2.0**20


# ---------------------------------------------------------------------------------------
# the step and its measurements
# ---------------------------------------------------------------------------------------


def make_flow(dim: int, mode: str, dtype: torch.dtype, device: torch.device) -> CPFlow:
    flow = cpflow(dim, hidden_dims=HIDDEN, logdet=mode, on_failure="ignore")
    return flow.to(device=device, dtype=dtype)


def training_step(flow: CPFlow, x: Tensor) -> Tensor:
    """Forward, log-det, loss and backward; returns the detached loss."""
    flow.zero_grad(set_to_none=True)
    x = x.clone()  # a new tensor: the flow's cache must not hand back last step's y
    y = flow(x)
    logdet = flow.log_abs_det_jacobian(x, y)
    loss = -logdet.mean() + 0.5 * (y * y).sum(-1).mean()
    loss.backward()
    return loss.detach()


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
    """Peak tensor memory allocated while ``fn`` runs (see the module docstring)."""
    if device.type == "cuda":
        return _cuda_peak_bytes(fn, device)
    if device.type == "cpu":
        return _profiled_peak_bytes(fn)
    raise ValueError(f"peak memory is measured on cpu and cuda only, not {device.type}")


@dataclass
class CGStats:
    mean: float | None = None
    max: int | None = None
    converged: float | None = None

    @classmethod
    def of(cls, flow: CPFlow) -> "CGStats":
        if flow.last_cg is None:
            return cls()
        iterations = flow.last_cg.iterations
        return cls(
            float(iterations.double().mean()),
            int(iterations.max()),
            float(flow.last_cg.converged.double().mean()),
        )


# ---------------------------------------------------------------------------------------
# table 1: exact against stochastic
# ---------------------------------------------------------------------------------------


@dataclass
class StepRow:
    dtype: str
    dim: int
    mode: str
    skipped: bool
    time_ms: float | None = None
    timed_runs: int = 0
    peak_mib: float | None = None
    cg_mean: float | None = None
    cg_max: int | None = None
    cg_converged: float | None = None
    exact_over_stochastic: float | None = None


def measure_step(
    dim: int, mode: str, dtype_name: str, args: argparse.Namespace, device: torch.device
) -> StepRow:
    if mode == "exact" and dim > args.max_exact_dim:
        return StepRow(dtype_name, dim, mode, skipped=True)
    dtype = DTYPES[dtype_name]
    flow = make_flow(dim, mode, dtype, device)
    x = torch.randn(args.batch, dim, dtype=dtype, device=device)
    timing, _ = time_call(
        lambda: training_step(flow, x), device, warmup=1, repeats=args.repeats,
        budget_s=args.budget, min_repeats=3,
    )
    cg = CGStats.of(flow)
    peak = peak_memory_bytes(lambda: training_step(flow, x), device)
    return StepRow(
        dtype_name, dim, mode, skipped=False, time_ms=1e3 * timing.median_s,
        timed_runs=timing.repeats, peak_mib=peak / MIB, cg_mean=cg.mean, cg_max=cg.max,
        cg_converged=cg.converged,
    )


def step_rows(args: argparse.Namespace, device: torch.device) -> list[StepRow]:
    rows: list[StepRow] = []
    for dtype_name in args.dtypes:
        for dim in args.dims:
            pair = {mode: measure_step(dim, mode, dtype_name, args, device) for mode in MODES}
            exact, stochastic = pair["exact"], pair["stochastic"]
            if not exact.skipped:
                exact.exact_over_stochastic = exact.time_ms / stochastic.time_ms
            rows += [exact, stochastic]
            print(f"  {dtype_name} d={dim:<4} exact {fmt(exact.time_ms, '.1f'):>8} ms  "
                  f"stochastic {fmt(stochastic.time_ms, '.1f'):>8} ms", flush=True)
    return rows


def step_table(rows: list[StepRow]) -> str:
    headers = [
        "dtype", "d", "log-det", "time / step (ms)", "exact / stochastic", "peak memory (MiB)",
        "CG iters mean / max", "CG converged",
    ]
    cells = []
    for r in rows:
        if r.skipped:
            cells.append([r.dtype, r.dim, r.mode, "skipped (d > --max-exact-dim)", "", "", "", ""])
            continue
        cg = f"{fmt(r.cg_mean, '.1f')} / {fmt(r.cg_max)}" if r.cg_max is not None else ""
        ratio = fmt(r.exact_over_stochastic, ".2f") if r.exact_over_stochastic else ""
        converged = fmt(r.cg_converged, ".0%") if r.cg_converged is not None else ""
        cells.append([
            r.dtype, r.dim, r.mode, fmt(r.time_ms, ".1f"), ratio, fmt(r.peak_mib, ".2f"), cg,
            converged,
        ])
    return markdown_table(headers, cells)


def exact_threshold(rows: list[StepRow], dtype_name: str) -> tuple[int, bool]:
    """Largest measured d at which exact is not slower than stochastic (0 if none).

    Returns ``(d, complete)``; ``complete`` is False when exact was not slower at the
    largest dimension it was measured at, so the true threshold may be larger.
    """
    measured = [
        r for r in rows if r.dtype == dtype_name and r.mode == "exact" and not r.skipped
    ]
    not_slower = [r.dim for r in measured if r.exact_over_stochastic <= 1.0]
    threshold = max(not_slower, default=0)
    return threshold, threshold < max((r.dim for r in measured), default=0)


# ---------------------------------------------------------------------------------------
# table 2: memory against forced CG iterations
# ---------------------------------------------------------------------------------------


@dataclass
class ForcedRow:
    dim: int
    iterations: int
    peak_mib: float
    cg_mean: float | None
    cg_max: int | None
    time_ms: float


def measure_forced(
    dim: int, iterations: int, args: argparse.Namespace, device: torch.device
) -> ForcedRow:
    flow = make_flow(dim, "stochastic", torch.float64, device)
    flow.cg_rtol, flow.cg_max_iter = 0.0, iterations
    x = torch.randn(args.batch, dim, dtype=torch.float64, device=device)
    timing, _ = time_call(lambda: training_step(flow, x), device, warmup=1, repeats=1)
    cg = CGStats.of(flow)
    peak = peak_memory_bytes(lambda: training_step(flow, x), device)
    return ForcedRow(dim, iterations, peak / MIB, cg.mean, cg.max, 1e3 * timing.median_s)


def forced_rows(args: argparse.Namespace, device: torch.device) -> list[ForcedRow]:
    return [
        measure_forced(dim, iterations, args, device)
        for dim in args.memory_dims
        for iterations in args.forced_iterations
    ]


def forced_table(rows: list[ForcedRow], iterations: list[int]) -> str:
    low, high = iterations[0], iterations[-1]
    headers = [
        "d", f"peak MiB @ {low} CG iters", f"peak MiB @ {high} CG iters", "ratio",
        "CG iters done (mean / max)", f"time (ms) @ {low} / {high}",
    ]
    cells = []
    for dim in dict.fromkeys(r.dim for r in rows):
        a = next(r for r in rows if r.dim == dim and r.iterations == low)
        b = next(r for r in rows if r.dim == dim and r.iterations == high)
        cells.append([
            dim, fmt(a.peak_mib, ".3f"), fmt(b.peak_mib, ".3f"), fmt(b.peak_mib / a.peak_mib, ".3f"),
            f"{fmt(a.cg_mean, '.1f')} / {a.cg_max}; {fmt(b.cg_mean, '.1f')} / {b.cg_max}",
            f"{fmt(a.time_ms, '.1f')} / {fmt(b.time_ms, '.1f')}",
        ])
    return markdown_table(headers, cells)


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = base_parser(__file__, __doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "float64"])
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--max-exact-dim", type=int, default=256,
                        help="skip the exact mode above this d (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=15, help="timed steps at most")
    parser.add_argument("--budget", type=float, default=3.0,
                        help="stop repeating a configuration after this many seconds (>= 3 steps)")
    parser.add_argument("--memory-dims", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--forced-iterations", type=int, nargs=2, default=[10, 100])
    args = parser.parse_args()
    if args.quick:
        args.dims, args.memory_dims, args.repeats = [2, 8, 16], [16], 3
        args.max_exact_dim = min(args.max_exact_dim, 8)
    return args


def threshold_text(thresholds: dict[str, dict[str, Any]]) -> str:
    lines = [f"## Recommended `exact_max_dim` for `logdet=\"auto\"` (library default: "
             f"{DEFAULT_EXACT_MAX_DIM})", ""]
    for dtype_name, entry in thresholds.items():
        bound = "" if entry["complete"] else " (lower bound: larger d not measured)"
        lines.append(f"- {dtype_name}: largest d at which exact is not slower than "
                     f"stochastic: exact_max_dim = {entry['exact_max_dim']}{bound}")
    return "\n".join(lines)


def warm_up(args: argparse.Namespace, device: torch.device) -> None:
    """One small step per dtype and mode: loads kernels before anything is timed."""
    for dtype_name in args.dtypes:
        for mode in MODES:
            flow = make_flow(2, mode, DTYPES[dtype_name], device)
            training_step(flow, torch.randn(4, 2, dtype=DTYPES[dtype_name], device=device))


def main() -> None:
    started = time.perf_counter()
    args = parse_args()
    device = setup(args)
    conditions = machine_summary(device)
    warm_up(args, device)
    print("Table 1: time and memory per training step ...", flush=True)
    steps = step_rows(args, device)
    print("Table 2: memory against forced CG iterations ...", flush=True)
    forced = forced_rows(args, device)
    thresholds = {}
    for dtype_name in args.dtypes:
        threshold, complete = exact_threshold(steps, dtype_name)
        thresholds[dtype_name] = {"exact_max_dim": threshold, "complete": complete}
    memory_method = "CUDA allocator peak" if device.type == "cuda" else "profiler tensor allocations"
    markdown = "\n\n".join([
        f"## One training step: exact vs stochastic log-det\n\nbatch {args.batch}, "
        f"ICNN hidden {HIDDEN}; {conditions}; "
        f"time = median of up to {args.repeats} steps after 1 warm-up; peak memory = "
        f"{memory_method} during one step.",
        step_table(steps),
        f"## Peak memory of the stochastic step against CG iterations\n\nfloat64, batch "
        f"{args.batch}; cg_rtol = 0 and cg_max_iter = N force N iterations, except where "
        "CG's recursively updated residual underflows to exactly 0 first (small d: see "
        "the iterations done).",
        forced_table(forced, args.forced_iterations),
        threshold_text(thresholds),
    ])
    print("\n" + markdown)
    payload = {
        "memory_method": memory_method,
        "steps": [asdict(r) for r in steps],
        "forced_cg_memory": [asdict(r) for r in forced],
        "recommended_exact_max_dim": thresholds,
        "library_default_exact_max_dim": DEFAULT_EXACT_MAX_DIM,
    }
    save_results(args.out, payload, markdown, device, args, started)


if __name__ == "__main__":
    main()
