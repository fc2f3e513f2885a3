r"""First run: a CP-Flow block learns the optimal-transport map, checked against its closed form.

Data :math:`N(m, \Sigma)`; a CP-Flow block :math:`f = \nabla F` is fitted by maximum likelihood
to push the data to :math:`N(0, I)`. Being the gradient of a convex function, it should land on
the Brenier map :math:`T(x) = \Sigma^{-1/2}(x - m)`, whose cost :math:`W_2^2` is known in
closed form (:mod:`ot`, the paper's section 5.2). A linear autoregressive flow fitted the same
way matches the density as well but learns another map. The demo runs the paper's 2-D problem
and a random 8-D one (about a minute and a half on a CPU), prints

* the transport cost :math:`\mathbb E|x - f(x)|^2` of each flow against :math:`W_2^2`, and
* the L2-UVP, :math:`100\,\mathbb E|f(x) - T(x)|^2 / \mathrm{Var}\,T(x)`: how far each map is
  from the true OT map (0 is the OT map),

and writes ``demo.json`` and the figure ``ot_cost_vs_kl.png`` (transport cost against KL
along training) into ``--out-dir``, a new folder per run (``make demo`` names it
``experiments/runs/demo-<time>``; an existing run is never replaced).

>>> args = parse_args(["--out-dir", "/tmp/never-written", "--quick"])
>>> args.steps
40
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from experiments import common, ot

DEMO_STEPS = 800
"""Maximum-likelihood steps per flow (the full OT experiment takes 1500)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, required=True, help="a new folder for this run")
    parser.add_argument("--steps", type=common.positive(int), default=DEMO_STEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a smoke run of seconds (40 steps)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = 40
    if args.out_dir.exists() and any(args.out_dir.iterdir()):
        parser.error(f"{args.out_dir} already holds a run: choose a new --out-dir")
    return args


def table(record: dict[str, Any]) -> str:
    """The printed comparison with the closed-form OT quantities."""
    rows = []
    for name, entry in record["problems"].items():
        w2 = entry["w2_squared"]
        cells = [name, f"{w2:.3f}"]
        for key in ("cpflow", "linear_iaf"):
            final = entry[key]["final"]
            gap = 100 * (final["cost"] - w2) / w2
            cells += [f"{final['cost']:.3f} ({gap:+.1f}%)", f"{final['l2_uvp']:.2f}%", f"{final['kl']:.4f}"]
        rows.append(cells)
    headers = [
        "problem",
        "W2² (closed form)",
        "CP-Flow cost (gap)",
        "CP-Flow L2-UVP",
        "CP-Flow KL",
        "linear IAF cost (gap)",
        "linear IAF L2-UVP",
        "linear IAF KL",
    ]
    return common.markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    common.setup_torch("cpu", "float64", 1, args.seed)
    config = ot.OTConfig(
        dims=(8,), steps=args.steps, n_eval=5000, n_curve=1000, evals=8, show_progress=args.progress
    )
    start = time.perf_counter()
    record = ot.run(config)
    record.update(
        command=common.format_command("experiments.demo", sys.argv[1:] if argv is None else argv),
        seconds=time.perf_counter() - start,
        environment=common.environment(torch.device("cpu")),
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    figure = ot.plot_cost_vs_kl(record, args.out_dir / "ot_cost_vs_kl.png")
    common.write_json(args.out_dir / "demo.json", record)
    print(table(record) + "\n")
    for name, entry in record["problems"].items():
        cp, linear = entry["cpflow"]["final"], entry["linear_iaf"]["final"]
        print(
            f"{name}: CP-Flow's map is {cp['l2_uvp']:.2f}% (L2-UVP) from the optimal-transport map, "
            f"the linear IAF's {linear['l2_uvp']:.1f}%, at KL {cp['kl']:.4f} and {linear['kl']:.4f}"
        )
    print(f"{record['seconds']:.0f} s; results in {args.out_dir / 'demo.json'}, figure {figure}")
    return record


if __name__ == "__main__":
    main()
