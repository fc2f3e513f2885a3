"""The interleaved guide-step benchmark: separate parameters per guide, ratios per round."""

import sys

import pyro
import pytest
import torch
from pyro.infer.autoguide import AutoNormalizingFlow

from experiments.benchmarks import guide_step


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def test_two_cpflow_settings_train_their_own_parameters(float64):
    pyro.clear_param_store()
    labels = ["AutoIAFNormal", "AutoCPFlow", "AutoCPFlow (Gaussian local block)"]
    svis, skipped = guide_step.build_svis(guide_step.SETTINGS["panel"], "eight_schools", labels, 4, seed=0)
    assert skipped == {} and list(svis) == labels
    names = list(pyro.get_param_store().keys())
    default = {n.split(".", 1)[1] for n in names if n.startswith("AutoCPFlow1.")}
    local = {n.split(".", 1)[1] for n in names if n.startswith("AutoCPFlow2.")}
    # the Gaussian local block has no local network: its own, smaller set of parameters
    assert default and local and local < default
    times = guide_step.interleaved_times(svis, warmup=1, rounds=3)
    assert all(len(v) == 3 and min(v) > 0 for v in times.values())


def test_a_local_block_option_on_a_model_without_plates_is_reported_not_built(float64):
    pyro.clear_param_store()
    labels = ["AutoIAFNormal", "AutoCPFlow (Gaussian local block)"]
    svis, skipped = guide_step.build_svis(guide_step.SETTINGS["panel"], "diabetes", labels, 4, 0)
    assert list(svis) == ["AutoIAFNormal"]
    assert "only apply to structure='hierarchical'" in skipped["AutoCPFlow (Gaussian local block)"]


def test_ratios_are_taken_round_by_round():
    # the machine doubles its speed after two rounds: every round's ratio is still 2
    times = {"AutoIAFNormal": [1.0, 1.0, 0.5, 0.5, 0.5], "AutoCPFlow": [2.0, 2.0, 1.0, 1.0, 1.0]}
    summary = guide_step.summarise(times)
    assert summary["AutoCPFlow"]["ratio_median"] == 2.0
    assert summary["AutoCPFlow"]["ratio_q1"] == summary["AutoCPFlow"]["ratio_q3"] == 2.0
    assert summary["AutoIAFNormal"]["ms"] == 500.0


def test_the_engine_setting_builds_both_normalizing_flow_guides_with_their_own_networks(float64):
    pyro.clear_param_store()
    setting = guide_step.SETTINGS["engine"]
    labels = ["AutoIAFNormal", *guide_step.ENGINE_NETWORKS]
    svis, skipped = guide_step.build_svis(setting, "logistic", labels, 1, 0)
    assert skipped == {} and list(svis) == labels
    for label, hidden in guide_step.ENGINE_NETWORKS.items():
        flow_guide = svis[label].guide
        assert flow_guide.latent_dim == 31 and isinstance(flow_guide, AutoNormalizingFlow)
        assert flow_guide.transform.potential.network.hidden_dims == hidden
    # each setting trains its own parameters under its own name
    prefixes = {name.split(".", 1)[0] for name in pyro.get_param_store().keys()}
    assert {"AutoNormalizingFlow1", "AutoNormalizingFlow2"} <= prefixes


def test_no_timed_rounds_is_refused_by_name(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["guide_step", "--rounds", "0"])
    with pytest.raises(SystemExit) as exit_:
        guide_step.main()
    assert exit_.value.code == 2
    assert "argument --rounds: must be positive, got 0" in capsys.readouterr().err
