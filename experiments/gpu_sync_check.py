"""Count the host synchronisations of VAE training steps on a GPU (part of ``gpu_check.sh``).

For each posterior, builds the paper-sized VAE on Frey Faces, takes a few warm-up steps (the
first ones initialise ActNorm and CUDA), then runs ``--steps`` training steps under
``torch.cuda.set_sync_debug_mode("warn")``, which warns at every operation that makes the
host wait for the device, and prints how many warnings each step raised and where. The
trainer's settings are used: Pyro validation off and the CUDA CG settings of
:meth:`experiments.vae.config.Config.cg_options`.

Example::

    python -m experiments.gpu_sync_check --flows gaussian cpflow --steps 3
"""

from __future__ import annotations

import argparse
import collections
import sys
import traceback
import warnings
from pathlib import Path

import pyro
import torch

from experiments.vae.config import Config
from experiments.vae.data import load_dataset
from experiments.vae.train import build_vae


def _where(message: warnings.WarningMessage) -> str:
    return f"{Path(message.filename).name}:{message.lineno}"


def count_synchronisations(flow: str, steps: int, warmup: int, batch_size: int) -> list[collections.Counter]:
    """One counter per measured step: synchronising call sites and how often each fired."""
    device = torch.device("cuda")
    data = load_dataset("freyfaces")
    config = Config(dataset="freyfaces", flow=flow, device="cuda")
    torch.manual_seed(0)
    vae = build_vae(config, data).to(device)
    optimizer = torch.optim.Adamax(vae.parameters(), lr=5e-4, eps=1e-7)
    images = data.train[:batch_size].to(device)
    x = data.batch(images, torch.float32)
    counters = []
    with pyro.validation_enabled(False):
        for step in range(warmup + steps):
            measured = step >= warmup
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if measured:
                    torch.cuda.set_sync_debug_mode("warn")
                try:
                    loss = vae(x, 1.0)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            if measured:
                synchronising = [w for w in caught if "synchroniz" in str(w.message).lower()]
                counters.append(collections.Counter(_where(w) for w in synchronising))
    torch.cuda.synchronize()
    return counters


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.gpu_sync_check", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--flows", nargs="+", default=["gaussian", "iaf", "cpflow"])
    parser.add_argument("--steps", type=int, default=3, help="measured training steps")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps first")
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("CUDA is not available: this check needs a GPU", file=sys.stderr)
        return 2
    failures = 0
    for flow in args.flows:
        try:
            counters = count_synchronisations(flow, args.steps, args.warmup, args.batch_size)
        except Exception:  # report and go on with the next posterior
            print(f"{flow}: failed\n{traceback.format_exc()}")
            failures += 1
            continue
        totals = [sum(c.values()) for c in counters]
        print(f"{flow}: host synchronisations per training step: {totals}")
        for where, count in sum(counters, collections.Counter()).most_common(10):
            print(f"    {count:4d}  {where}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
