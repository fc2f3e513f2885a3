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
