"""A smoke run of the NeuTra measurement script (``experiments/neutra.py``)."""

import json
import math

import pytest

from experiments import neutra

MEASURES = (
    "ess_per_1000_gradients",
    "ess_per_second",
    "min_ess",
    "median_ess",
    "ms_per_gradient",
    "gradients_per_draw",
    "step_size",
    "max_mean_error",
    "max_mean_error_in_se",
    "mean_abs_log_sd_ratio",
)


@pytest.mark.slow  # NUTS with every guide, even at --quick: about 100 s on two cores
def test_quick_run_measures_every_sampler_with_finite_numbers():
    results = neutra.main(["--quick", "--no-progress"])
    json.dumps(results, allow_nan=False)  # JSON-able, no NaN or Inf anywhere
    assert set(results["methods"]) == set(neutra.METHODS)
    for method, row in results["methods"].items():
        assert all(math.isfinite(row[key]) for key in MEASURES), method
        assert row["gradients"] > 0 and row["divergences"] >= 0
        assert set(row["ess"]) == {"mu", "tau", *(f"theta[{j}]" for j in range(8))}
        assert ("training" in row) == (neutra.METHODS[method] is not None)
    assert results["reading"].startswith("CP-Flow NeuTra")
    assert "| NeuTra + AutoCPFlow |" in neutra.section(results)


def test_a_full_run_is_never_overwritten(tmp_path):
    out = tmp_path / "neutra.json"
    out.write_text("{}")
    with pytest.raises(SystemExit):
        neutra.parse_args(["--out", str(out)])
    assert neutra.parse_args(["--out", str(out), "--overwrite"]).overwrite


def test_the_warped_potential_of_the_exact_posterior_has_unit_curvature():
    """``neutra_geometry``: a guide equal to a Gaussian posterior warps it to N(0, I), so every
    eigenvalue of the Hessian of U is 1 (and its parts' are not)."""
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.infer.autoguide import AutoMultivariateNormal

    from experiments import neutra_geometry

    covariance = torch.tensor([[1.0, 0.6], [0.6, 2.0]], dtype=torch.float64)

    def model():
        pyro.sample("z", dist.MultivariateNormal(torch.zeros(2, dtype=torch.float64), covariance))

    guide = AutoMultivariateNormal(model)
    guide()
    cholesky = torch.linalg.cholesky(covariance)
    with torch.no_grad():
        guide.loc.zero_()
    # PyroParams: assigning the constrained value sets the parameter behind it; Pyro's
    # covariance is diag(scale) T T^T diag(scale) with T unit lower triangular
    guide.scale = cholesky.diagonal()
    guide.scale_tril = cholesky / cholesky.diagonal()[:, None]
    parts = neutra_geometry.warped_parts(guide)
    points = torch.randn(4, 2, dtype=torch.float64)
    total = neutra_geometry.curvature(parts["total"], points)
    assert all(abs(v - 1) < 1e-8 for v in total["largest"] + total["smallest"])
    assert max(neutra_geometry.curvature(parts["guide"], points)["largest"]) == 0  # a constant Jacobian
    guide.scale = 2 * cholesky.diagonal()  # a wider guide: the warped potential curves more
    wider = neutra_geometry.curvature(neutra_geometry.warped_parts(guide)["total"], points)
    assert min(wider["largest"]) > 3.9


@pytest.mark.slow  # three guides trained for 30 steps
def test_quick_geometry_run_is_finite():
    from experiments import neutra_geometry

    results = neutra_geometry.main(["--quick", "--no-progress"])
    for record in results["guides"].values():
        assert all(math.isfinite(v) for part in ("total", "model", "guide") for v in record[part]["largest"])
