"""The fuzz of ``tests/fuzz_inverse.py``: a fast subset here, the full run marked slow."""

import pytest
import torch

from tests.fuzz_inverse import fuzz_arguments, fuzz_inverse, fuzz_options


@pytest.mark.parametrize("kind", ["block", "stack"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_no_inverse_is_silently_wrong(kind, dtype):
    counts = fuzz_inverse(kind, dtype, models=2, targets=60, seed=1)
    assert counts.targets == 120
    assert counts.silent == 0 and counts.nonfinite_unreported == 0, counts
    assert counts.converged >= 60  # most targets are met, the rest are reported


def test_bad_arguments_get_clear_errors_at_every_entry_point():
    outcomes = fuzz_arguments()
    assert not outcomes.misleading, "\n".join(outcomes.misleading)
    assert not outcomes.silent, "\n".join(outcomes.silent)
    assert sum(outcomes.counts.values()) >= 200


def test_bad_options_get_clear_errors():
    outcomes = fuzz_options()
    assert not outcomes.misleading and not outcomes.silent, outcomes.misleading + outcomes.silent


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["block", "stack"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_full_fuzz_no_inverse_is_silently_wrong(kind, dtype):
    counts = fuzz_inverse(kind, dtype, models=40, targets=1000, seed=0)
    assert counts.silent == 0 and counts.nonfinite_unreported == 0, counts
