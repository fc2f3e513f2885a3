"""The guide panel's models and a smoke run of its script."""

import pyro
import pytest
import torch
from pyro.infer.autoguide import AutoDiagonalNormal

from experiments import guide_models, guide_panel


@pytest.mark.parametrize("name", guide_models.MODEL_NAMES)
def test_each_model_has_its_latent_dimension_and_vectorises(name):
    panel = guide_models.build(name)
    pyro.clear_param_store()
    guide = AutoDiagonalNormal(panel.model)
    guide()
    assert guide.latent_dim == panel.latent_dim
    elbo = pyro.infer.Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    single = pyro.infer.Trace_ELBO(max_plate_nesting=1)
    assert torch.isfinite(
        torch.tensor([elbo.loss(panel.model, guide), single.loss(panel.model, guide)])
    ).all()


def test_the_non_centred_reference_maps_back_to_the_centred_sites():
    panel = guide_models.build("eight_schools")
    samples = {"mu": torch.tensor([1.0, 2.0]), "tau": torch.tensor([2.0, 3.0]), "eta": torch.ones(2, 8)}
    theta = panel.to_sites(samples)["theta"]
    assert torch.equal(theta, torch.tensor([[3.0] * 8, [5.0] * 8]))


def test_quick_panel_run_reports_every_guide():
    results = guide_panel.main(
        ["--quick", "--no-progress", "--models", "eight_schools", "--guides", "AutoNormal", "AutoCPFlow"]
    )
    rows = results["models"]["eight_schools"]
    assert set(rows) == {"AutoNormal", "AutoCPFlow"}
    for row in rows.values():
        assert row["finite"] and 0 < row["is_ess"] <= 1 and row["elbo_se"] > 0


def test_a_full_run_is_never_overwritten(tmp_path):
    out = tmp_path / "panel.json"
    out.write_text("{}")
    with pytest.raises(SystemExit):
        guide_panel.parse_args(["--out", str(out)])
    assert guide_panel.parse_args(["--out", str(out), "--overwrite"]).overwrite


def test_a_damaged_results_file_is_named(tmp_path):
    from experiments import common

    path = tmp_path / "guide_panel_nuts.json"
    path.write_text('{"eight_schools": {"mean": ')
    with pytest.raises(ValueError, match=f"{path} is not valid JSON"):
        common.read_json(path)


def test_draws_map_to_the_guides_unconstrained_coordinates():
    from experiments import guide_capacity

    panel = guide_models.build("eight_schools")
    pyro.clear_param_store()
    guide = AutoDiagonalNormal(panel.model)
    guide()
    draws = {"mu": torch.tensor([1.0, 2.0]), "tau": torch.tensor([2.0, 3.0]), "theta": torch.ones(2, 8)}
    latent = guide_capacity.unconstrained_draws(guide, draws)
    assert latent.shape == (2, 10)
    assert torch.allclose(latent[:, 1], torch.tensor([2.0, 3.0]).log())  # tau's column, log-mapped
    # and back: the guide's own unpacking gives the draws again
    unpacked = {site["name"]: value for site, value in guide._unpack_latent(latent[1])}
    assert torch.allclose(unpacked["theta"], draws["theta"][1])
    assert torch.allclose(unpacked["mu"], draws["mu"][1])


def test_quick_capacity_run_scores_every_fit_of_every_family():
    from experiments import guide_capacity

    results = guide_capacity.main(["--quick", "--no-progress"])
    for family in guide_capacity.FAMILIES:
        fits = results["families"][family]
        assert set(fits) == {"svi", "mle", "mle+svi"}
        assert all(torch.isfinite(torch.tensor(fit["heldout_loglik"])) for fit in fits.values())
