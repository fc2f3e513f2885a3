"""Harness of ``engine.py``: the measured tasks, and the worker that runs them on an old commit.

Every ``task_*`` function takes JSON-able keyword arguments and returns a JSON-able
dict, and uses only the public API of whichever ``pyro_cpflow`` is importable, so the
same code measures the working tree's library (:class:`LocalBackend`, in the calling
process) and the library of an earlier commit (:class:`WorkerBackend`: ``git archive``
into a folder, then this module run as a subprocess with that folder first on
``PYTHONPATH``, answering one JSON request per line of stdin). Flows are float64; options are
only ever passed as ``cpflow`` keywords, and solver reports are read from
``flow.diagnostics`` or, for code without it, ``flow.last_cg`` / ``flow.last_inverse``.

Run as a module (``python -m experiments.benchmarks.engine_harness``) it is the worker
(``engine.py`` starts it; there is no other use).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from experiments.benchmarks.reference_algorithm import reference_density_step
from experiments.benchmarks.svi_models import build_model
from experiments.benchmarks.timing import peak_memory_bytes, time_call

__all__ = ["BIAS_ALPHA", "BIAS_GAIN", "Backend", "LocalBackend", "TASKS", "WorkerBackend"]

REPO_ROOT = Path(__file__).resolve().parents[2]
DTYPE = torch.float64
DATA_SEED = 2021
BIAS_ALPHA, BIAS_GAIN, BIAS_RAW_BETA = 1e-2, 32.0, -60.0
"""Flows of the bias measurement: floor alpha, input gain, raw beta (beta ~ 1e-26)."""


def make_flow(dim: int, hidden: list[int], state: str | None, device: str, **options: Any):
    """``cpflow(dim, hidden_dims=hidden, on_failure="ignore", **options)`` in float64."""
    from pyro_cpflow import cpflow

    options.setdefault("on_failure", "ignore")
    flow = cpflow(dim, hidden_dims=tuple(hidden), **options).to(device=device, dtype=DTYPE)
    if state is not None:
        saved = torch.load(state, map_location=device, weights_only=True)
        flow.load_state_dict(split_input_paths(saved, flow))
    return flow


def split_input_paths(state: dict[str, Tensor], flow: Any) -> dict[str, Tensor]:
    """The state of the current ICNN in the layout of ``df8048e`` when ``flow`` has that layout.

    The current ICNN holds one linear map of ``x`` per layer (rows of the convex units, then
    of the input-augmented ones); ``df8048e`` held them as ``input_paths`` and
    ``augment_paths``. The values are the same, only split.
    """
    network = flow.potential.network
    if not hasattr(network, "augment_paths") or any("augment_paths" in key for key in state):
        return state
    converted = dict(state)
    for k, path in enumerate(network.input_paths):
        rows = path.out_features
        for name in ("weight", "bias"):
            merged = converted.pop(f"potential.network.input_paths.{k}.{name}")
            converted[f"potential.network.input_paths.{k}.{name}"] = merged[:rows]
            converted[f"potential.network.augment_paths.{k}.{name}"] = merged[rows:]
    return converted


def base_distribution(dim: int, device: str) -> dist.Distribution:
    return dist.Normal(torch.zeros(dim, dtype=DTYPE, device=device), 1.0).to_event(1)


def data_factor(dim: int) -> Tensor:
    """``A`` with data ``x = A z``: random rotation times log-uniform std devs (var 0.1..10)."""
    generator = torch.Generator().manual_seed(DATA_SEED + dim)
    log_var = torch.empty(dim, dtype=DTYPE).uniform_(math.log(0.1), math.log(10.0), generator=generator)
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=DTYPE, generator=generator))
    return rotation * (0.5 * log_var).exp()


def data_batch(dim: int, size: int, generator: torch.Generator, device: str) -> Tensor:
    z = torch.randn(size, dim, dtype=DTYPE, generator=generator)
    return (z @ data_factor(dim).T).to(device)


def fixed_batch(dim: int, size: int, seed: int, device: str) -> Tensor:
    return data_batch(dim, size, torch.Generator().manual_seed(seed), device)


def _report(flow: Any, name: str, legacy: str) -> Any:
    """``flow.diagnostics.<name>``, or ``flow.<legacy>`` for code without ``diagnostics``."""
    diagnostics = getattr(flow, "diagnostics", None)
    if diagnostics is None:
        return getattr(flow, legacy, None)
    return getattr(diagnostics, name, None)


def cg_stats(flow: Any) -> dict[str, Any]:
    report = _report(flow, "cg", "last_cg")
    if report is None:
        return {"cg_mean": None, "cg_max": None, "cg_converged": None}
    iterations = report.iterations.double()
    return {
        "cg_mean": float(iterations.mean()),
        "cg_max": int(iterations.max()),
        "cg_converged": float(report.converged.double().mean()),
    }


def _timed(fn: Callable[[], Any], device: str, timing: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """``common.time_call(fn, **timing)``: ``{"ms": median, "times_ms": [...]}``, last result."""
    result, value = time_call(fn, torch.device(device), **timing)
    times = [1e3 * t for t in result.times_s]
    return {"ms": 1e3 * result.median_s, "times_ms": times}, value


def density_step(flow: Any, x: Tensor) -> Callable[[], Tensor]:
    """The maximum-likelihood step of (a), (b) and (e) as a closure."""
    p = dist.TransformedDistribution(base_distribution(x.shape[-1], str(x.device)), [flow.inv])

    def step() -> Tensor:
        flow.zero_grad(set_to_none=True)
        loss = -p.log_prob(x.clone()).mean()
        loss.backward()
        return loss.detach()

    return step


def task_info() -> dict[str, Any]:
    import pyro_cpflow

    return {
        "file": str(Path(pyro_cpflow.__file__).resolve()),
        "version": getattr(pyro_cpflow, "__version__", None),
        "diagnostics": hasattr(pyro_cpflow.cpflow(2, hidden_dims=(4, 4)), "diagnostics"),
    }


def task_train(
    dim: int,
    hidden: list[int],
    logdet: str,
    steps: int,
    lr: float,
    batch: int,
    seed: int,
    out: str,
    device: str,
) -> dict[str, Any]:
    """Maximum likelihood on the anisotropic Gaussian; saves the state dict to ``out``."""
    torch.manual_seed(seed)
    flow = make_flow(dim, hidden, None, device, logdet=logdet)
    p = dist.TransformedDistribution(base_distribution(dim, device), [flow.inv])
    optimizer = torch.optim.Adam(flow.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    start, loss = time.perf_counter(), torch.tensor(math.nan)
    for _ in range(steps):
        loss = -p.log_prob(data_batch(dim, batch, generator, device)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save(flow.state_dict(), out)
    return {"final_loss": float(loss.detach()), "seconds": time.perf_counter() - start}


def task_density_step(
    dim: int,
    hidden: list[int],
    logdet: str,
    state: str | None,
    batch: int,
    seed: int,
    timing: dict[str, Any],
    device: str,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    flow = make_flow(dim, hidden, state, device, logdet=logdet, **(options or {}))
    torch.manual_seed(seed)
    times, loss = _timed(density_step(flow, fixed_batch(dim, batch, seed, device)), device, timing)
    return {**times, "loss": float(loss), **cg_stats(flow)}


def task_gradient_step(
    dim: int, hidden: list[int], state: str | None, batch: int, seed: int, timing: dict[str, Any], device: str
) -> dict[str, Any]:
    """The density step of (a) without its log-det, ``-log p_base(grad F(x))`` and backward:
    a floor under any step that also needs the log-det."""
    flow = make_flow(dim, hidden, state, device)
    x, base = fixed_batch(dim, batch, seed, device), base_distribution(dim, device)

    def step() -> Tensor:
        flow.zero_grad(set_to_none=True)
        loss = -base.log_prob(flow(x.clone())).mean()
        loss.backward()
        return loss.detach()

    times, _ = _timed(step, device, timing)
    return times


def task_reference_step(
    dim: int, hidden: list[int], state: str | None, batch: int, seed: int, timing: dict[str, Any], device: str
) -> dict[str, Any]:
    flow = make_flow(dim, hidden, state, device, logdet="stochastic")
    x, base = fixed_batch(dim, batch, seed, device), base_distribution(dim, device)
    torch.manual_seed(seed)

    def step() -> int:
        return reference_density_step(flow.potential, lambda: flow.zero_grad(set_to_none=True), x, base)

    times, iterations = _timed(step, device, timing)
    return {**times, "cg_iterations": iterations}


def task_peak_memory(
    dim: int, hidden: list[int], state: str | None, batch: int, seed: int, iterations: int, device: str
) -> dict[str, Any]:
    flow = make_flow(dim, hidden, state, device, logdet="stochastic", cg_rtol=0.0, cg_max_iter=iterations)
    step = density_step(flow, fixed_batch(dim, batch, seed, device))
    times, _ = _timed(step, device, {"warmup": 1, "repeats": 1})
    peak = peak_memory_bytes(step, torch.device(device))
    return {**times, "peak_mib": peak / 2.0**20, **cg_stats(flow)}


def task_inversion(
    dim: int,
    hidden: list[int],
    state: str | None,
    points: int,
    seed: int,
    tol: float,
    timing: dict[str, Any],
    device: str,
) -> dict[str, Any]:
    flow = make_flow(dim, hidden, state, device, logdet="stochastic", inverse_tol=tol)
    x = fixed_batch(dim, points, seed, device)
    with torch.no_grad():
        y = flow(x)
        flow.inv(y[:8].clone())  # warm-up on a few points
        times, x_hat = _timed(lambda: flow.inv(y.clone()), device, timing)
    report = _report(flow, "inverse", "last_inverse")
    return {
        **times,
        "converged": float(report.converged.double().mean()),
        "max_residual": float(report.residual.max()),
        "max_error": float((x_hat - x).abs().max()),
    }


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def task_svi_step(
    model: str,
    guide: str,
    particles: int,
    hidden: list[int],
    lr: float,
    warmup: int,
    timing: dict[str, Any],
    seed: int,
) -> dict[str, Any]:
    """Time ``SVI.step`` with a CP-Flow (``guide="cpflow"``) or an IAF guide, in float64."""
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoIAFNormal, AutoNormalizingFlow

    with default_dtype(DTYPE), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        fn = build_model(model)
        if guide == "cpflow":
            from pyro_cpflow import cpflow

            auto = AutoNormalizingFlow(fn, functools.partial(cpflow, hidden_dims=tuple(hidden)))
        else:
            auto = AutoIAFNormal(fn)
        elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
        svi = SVI(fn, auto, pyro.optim.Adam({"lr": lr}), elbo)
        times, loss = _timed(svi.step, "cpu", {**timing, "warmup": warmup})
    return {**times, "loss": loss, "latent_dim": auto.latent_dim, "warnings": len(caught)}


def conditioned_flow(dim: int, hidden: list[int], scale: float, seed: int, device: str):
    """The flow of (f): network scale ``scale``, ``Q = alpha I`` (no factor, beta ~ 0)."""
    torch.manual_seed(seed)
    flow = make_flow(
        dim,
        hidden,
        None,
        device,
        logdet="stochastic",
        alpha=BIAS_ALPHA,
        initial_scale=scale,
        quadratic_rank=0,
        input_gain=BIAS_GAIN,
    )
    with torch.no_grad():
        flow.potential.raw_beta.fill_(BIAS_RAW_BETA)
    return flow


def exact_hessian(flow: Any, x0: Tensor) -> Tensor:
    return torch.autograd.functional.hessian(lambda x: flow.potential(x[None]).sum(), x0)


def condition_number(flow: Any, x0: Tensor) -> float:
    eigenvalues = torch.linalg.eigvalsh(exact_hessian(flow, x0))
    return float(eigenvalues[-1] / eigenvalues[0])


def task_conditioned_flow(
    dim: int, hidden: list[int], kappa: float, seed: int, out: str, device: str
) -> dict[str, Any]:
    """Bisection on ``log s`` for condition number ``kappa`` at ``x0``; saves the state dict."""
    x0 = torch.randn(dim, dtype=DTYPE, generator=torch.Generator().manual_seed(seed)).to(device)
    low, high = math.log(1e-4), math.log(1e9)
    for _ in range(60):
        middle = 0.5 * (low + high)
        flow = conditioned_flow(dim, hidden, math.exp(middle), seed, device)
        achieved = condition_number(flow, x0)
        if abs(math.log(achieved / kappa)) < 1e-3:
            break
        low, high = (middle, high) if achieved < kappa else (low, middle)
    flow = conditioned_flow(dim, hidden, math.exp(middle), seed, device)
    torch.save(flow.state_dict(), out)
    return {"scale": math.exp(middle), "kappa": condition_number(flow, x0), "x0": x0.tolist()}


def task_logdet_bias(
    dim: int, hidden: list[int], state: str, x0: list[float], batch: int, repeats: int, seed: int, device: str
) -> dict[str, Any]:
    """Mean of ``repeats * batch`` stochastic log-det values at ``x0`` against ``slogdet``."""
    import pyro_cpflow

    flow = make_flow(
        dim,
        hidden,
        state,
        device,
        logdet="stochastic",
        alpha=BIAS_ALPHA,
        quadratic_rank=0,
        input_gain=BIAS_GAIN,
    )
    point = torch.tensor(x0, dtype=DTYPE, device=device)
    exact = float(torch.linalg.slogdet(exact_hessian(flow, point))[1])
    torch.manual_seed(seed)
    values = []
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for _ in range(repeats):
            rows = point.expand(batch, dim).clone()
            values.append(flow.log_abs_det_jacobian(rows, flow(rows)))
    samples = torch.cat(values)
    sd = float(samples.std())
    se = sd / math.sqrt(samples.numel())
    nonconvergence = getattr(pyro_cpflow, "NonConvergenceWarning", UserWarning)
    kinds = (nonconvergence, UserWarning, RuntimeWarning)
    warned = sorted({w.category.__name__ for w in caught if issubclass(w.category, kinds)})
    mean = float(samples.mean())
    return {
        "exact": exact,
        "mean": mean,
        "bias": mean - exact,
        "se": se,
        "sd": sd,
        "bias_over_se": (mean - exact) / se if se > 0 else math.nan,
        "warnings": warned,
        "nonfinite": int((~torch.isfinite(samples)).sum()),
    }


def task_sampling_step(
    dim: int, hidden: list[int], logdet: str, batch: int, seed: int, timing: dict[str, Any], device: str
) -> dict[str, Any]:
    """The SVI-direction step of (g) at initialisation."""
    torch.manual_seed(seed)
    flow = make_flow(dim, hidden, None, device, logdet=logdet)
    q = dist.TransformedDistribution(base_distribution(dim, device), [flow])

    def step() -> None:
        flow.zero_grad(set_to_none=True)
        q.log_prob(q.rsample((batch,))).mean().backward()

    times, _ = _timed(step, device, timing)
    return times


TASKS: dict[str, Callable[..., dict[str, Any]]] = {
    "info": task_info,
    "train": task_train,
    "density_step": task_density_step,
    "reference_step": task_reference_step,
    "gradient_step": task_gradient_step,
    "peak_memory": task_peak_memory,
    "inversion": task_inversion,
    "svi_step": task_svi_step,
    "conditioned_flow": task_conditioned_flow,
    "logdet_bias": task_logdet_bias,
    "sampling_step": task_sampling_step,
}

# ---------------------------------------------------------------------------------------
# backends: this process, or a worker subprocess on the library of an old commit
# ---------------------------------------------------------------------------------------


class Backend(Protocol):
    label: str

    def call(self, task: str, **kwargs: Any) -> dict[str, Any]: ...


class LocalBackend:
    """Runs the tasks here (after the same JSON round trip as the worker's arguments)."""

    label = "ours"

    def call(self, task: str, **kwargs: Any) -> dict[str, Any]:
        return TASKS[task](**json.loads(json.dumps(kwargs)))


class WorkerBackend:
    """Runs the tasks in this file as a subprocess, with ``pyro_cpflow`` from ``commit``."""

    label = "today"

    def __init__(self, commit: str, folder: Path, threads: int) -> None:
        self.library = folder / "library"
        self.library.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "archive", commit, "pyro_cpflow"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(self.library)], input=archive, check=True)
        # the copy first, then the repository for the experiments package; the working
        # directory is the run's folder, not the repository, whose pyro_cpflow would come first
        paths = [str(self.library), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "experiments.benchmarks.engine_harness", "--threads", str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=folder,
        )
        try:
            self.info = self.call("info")
        except Exception:
            self.close()
            raise
        if not Path(self.info["file"]).is_relative_to(self.library.resolve()):
            self.close()
            raise RuntimeError(f"the worker imported {self.info['file']}, not the copy of {commit}")

    def call(self, task: str, **kwargs: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"task": task, "kwargs": kwargs}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker exited (code {self.process.poll()})")
        reply = json.loads(line)
        if not reply["ok"]:
            raise RuntimeError(reply["error"])
        return reply["result"]

    def close(self) -> None:
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def worker_main() -> None:
    """Answer one JSON request per line of stdin; everything else printed goes to stderr."""
    protocol, sys.stdout = sys.stdout, sys.stderr
    for line in iter(sys.stdin.readline, ""):
        request = json.loads(line)
        try:
            reply = {"ok": True, "result": TASKS[request["task"]](**request["kwargs"])}
        except Exception as error:  # reported to the main process, which carries on
            trace = traceback.format_exc(limit=-2)
            reply = {"ok": False, "error": f"{type(error).__name__}: {error}\n{trace}"}
        protocol.write(json.dumps(reply) + "\n")
        protocol.flush()


def _main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.benchmarks.engine_harness",
        description="engine.py worker (JSON lines on stdin/stdout)",
    )
    parser.add_argument("--threads", type=int, default=1)
    threads = parser.parse_args().threads
    if threads > 0:
        torch.set_num_threads(threads)
    worker_main()


if __name__ == "__main__":
    _main()
