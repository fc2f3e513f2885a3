"""Short runs of ``experiments/toy2d.py`` and ``experiments/ot.py`` (issue 4).

The experiment scripts are imported as modules and run in a temporary directory
with ``--quick`` settings; the assertions check what must already hold in a short
run (losses fall, the OT map error falls, outputs are written), not only that
nothing raised.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from experiments import common, toy2d
from experiments import ot as ot_experiment
from experiments.toy_data import TOY_DATASETS, sample_toy

# ---------------------------------------------------------------- toy data sets


@pytest.mark.parametrize("name", sorted(TOY_DATASETS))
def test_toy_sampler_shape_dtype_and_seed(name):
    x = sample_toy(name, 1001, seed=3)
    assert x.shape == (1001, 2) and x.dtype == torch.float64
    assert bool(torch.isfinite(x).all())
    assert torch.equal(x, sample_toy(name, 1001, seed=3))
    assert not torch.equal(x, sample_toy(name, 1001, seed=4))
    assert sample_toy(name, 10, seed=0, dtype=torch.float32).dtype == torch.float32
    # every set lives in the plotting window [-4, 4]^2 (up to rare Gaussian tails)
    assert float((x.abs() > 4.5).any(-1).double().mean()) < 0.01


def test_toy_samplers_match_their_definitions():
    n = 20000
    # 8 gaussians: every point is near one of the 8 centres at radius 4 / 1.414
    x = sample_toy("8gaussians", n, seed=0)
    angles = torch.arange(8) * (math.pi / 4)
    centres = 4 / 1.414 * torch.stack([torch.cos(angles), torch.sin(angles)], -1)
    nearest = torch.cdist(x, centres).min(-1).values
    assert float(nearest.pow(2).mean()) == pytest.approx(2 * (0.5 / 1.414) ** 2, rel=0.05)
    # checkerboard: uniform on the 8 squares of side 2 of [-4, 4]^2 with floor(x/2)+floor(y/2) even
    x = sample_toy("checkerboard", n, seed=0)
    assert bool((x.abs() <= 4).all())
    cells = torch.floor(x / 2) + 2
    assert bool((cells.sum(-1).remainder(2) == 0).all())
    counts = torch.bincount((4 * cells[:, 0] + cells[:, 1]).long(), minlength=16)
    assert int((counts > 0).sum()) == 8 and float(counts.max()) < 1.1 * n / 8
    # rings: radii 3, 2.25, 1.5, 0.75 with equal mass
    radius = sample_toy("rings", n, seed=0).norm(dim=-1)
    ring = torch.round(radius / 0.75).clamp(1, 4)
    assert float((radius - 0.75 * ring).abs().mean()) < 0.1
    assert torch.bincount(ring.long())[1:].double().div(n).sub(0.25).abs().max() < 0.02
    # moons and two spirals: two symmetric halves
    for name in ("moons", "2spirals"):
        x = sample_toy(name, n, seed=0)
        centre = torch.tensor([0.0, 0.3]) if name == "moons" else torch.zeros(2)
        assert torch.allclose(x.mean(0), centre, atol=0.08)


def test_unknown_toy_set_is_rejected():
    with pytest.raises(ValueError, match="unknown toy set"):
        sample_toy("swissroll", 10, seed=0)


# ------------------------------------------------------------------ markdown


def test_replace_markdown_section_keeps_other_sections(tmp_path):
    path = tmp_path / "RESULTS.md"
    common.replace_markdown_section(path, "A", "first")
    common.replace_markdown_section(path, "B", "second")
    common.replace_markdown_section(path, "A", "third")
    text = path.read_text()
    assert text.count("## A") == 1 and text.count("## B") == 1
    assert "third" in text and "first" not in text and "second" in text
    assert text.index("## A") < text.index("## B")


# ------------------------------------------------------------------ run options


def _run_parser(out):
    parser = argparse.ArgumentParser(prog="script")
    parser.add_argument("--steps", type=int, default=3000)
    common.add_run_options(parser, out, "smoke run")
    return parser


def test_parse_run_args_applies_quick_settings_only_under_quick(tmp_path):
    out = tmp_path / "run.json"
    assert common.parse_run_args(_run_parser(out), [], quick={"steps": 30}).steps == 3000
    assert common.parse_run_args(_run_parser(out), ["--quick"], quick={"steps": 30}).steps == 30


def test_parse_run_args_names_unknown_quick_settings(tmp_path):
    with pytest.raises(ValueError, match=r"\['step'\] are not options of script"):
        common.parse_run_args(_run_parser(tmp_path / "run.json"), ["--quick"], quick={"step": 30})


def test_parse_run_args_refuses_to_replace_a_full_run(tmp_path, capsys):
    out = tmp_path / "run.json"
    out.write_text("{}")
    with pytest.raises(SystemExit):
        common.parse_run_args(_run_parser(out), [], quick={})
    assert "pass --overwrite" in capsys.readouterr().err
    assert common.parse_run_args(_run_parser(out), ["--overwrite"], quick={}).overwrite
    assert common.parse_run_args(_run_parser(out), ["--quick"], quick={}).quick


# --------------------------------------------------------------------- toy2d


def test_toy2d_short_run_writes_outputs_and_learns(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# Experiment results\n\n## Other\n\nkept\n")
    models = ["CP-Flow (1 block)", "MAF (affine AR)"]
    argv = [
        "--quick",
        "--no-progress",
        "--out-dir",
        str(tmp_path),
        "--results-md",
        str(md),
        "--datasets",
        "moons",
        "--models",
        *models,
        "--steps",
        "150",
    ]
    record = toy2d.main(argv)

    data = json.loads((tmp_path / "toy2d.json").read_text())
    assert data["config"]["datasets"] == ["moons"] and data["config"]["models"] == models
    assert data["config"]["steps"] == 150 and data["config"]["n_test"] == toy2d.QUICK["n_test"]
    assert data["command"].startswith("python -m experiments.toy2d --quick")
    entries = data["datasets"]["moons"]
    gaussian = data["gaussian_fit_loglik"]["moons"]
    for model_name, entry in entries.items():
        assert math.isfinite(entry["test_loglik"]), model_name
        # maximum likelihood makes progress ...
        assert entry["train_loss_end"] < entry["train_loss_start"] - 0.03, model_name
        # ... at least to the best Gaussian (CP-Flow only just passes it in 150 steps; MAF bends faster)
        assert entry["test_loglik"] > gaussian - 0.01, model_name
    assert entries["MAF (affine AR)"]["test_loglik"] > gaussian + 0.1
    # the one-block CP-Flow has about the parameter count of the baseline
    assert 0.8 < entries["CP-Flow (1 block)"]["parameters"] / entries["MAF (affine AR)"]["parameters"] < 1.25

    figure = tmp_path / "toy2d.png"
    assert figure.stat().st_size > 5_000
    text = md.read_text()
    assert "## Other\n\nkept" in text and "## Toy densities" in text
    assert "| moons |" in text and "toy2d.png" in text
    assert f"{record['datasets']['moons']['MAF (affine AR)']['test_loglik']:.3f}" in text

    # the section is regenerated from the JSON alone, identically
    before = md.read_text()
    toy2d.main(["--render-only", "--out-dir", str(tmp_path), "--results-md", str(md)])
    assert md.read_text() == before


def test_toy2d_models_have_matched_sizes_and_normalised_densities():
    device, dtype = torch.device("cpu"), torch.float64
    sizes = {}
    for name in toy2d.MODELS:
        module, distribution = toy2d.build_model(name, seed=0, device=device, dtype=dtype)
        sizes[name] = common.count_parameters(module)
        distribution.log_prob(sample_toy("moons", 256, seed=0))  # initialises the leading ActNorm
        if name.startswith("CP-Flow"):
            # the density direction is normalised: it integrates to one on a wide grid
            # (NSF starts with spikes and NAF with heavy tails, too rough for this check)
            density = toy2d.density_grid(distribution, limit=10.0, size=201, device=device, dtype=dtype)
            assert float(density.sum() * (20.0 / 200) ** 2) == pytest.approx(1.0, abs=0.01), name
    assert max(sizes.values()) < 1.25 * min(sizes.values()), sizes


# ------------------------------------------------------------------------ OT


def test_gaussian_problem_closed_forms():
    problem = ot_experiment.paper_problem()
    x = problem.sample(200_000, seed=0)
    t = problem.ot_map(x)
    # T pushes N(m, Sigma) to N(0, I) ...
    assert torch.allclose(t.mean(0), torch.zeros(2), atol=0.01)
    assert torch.allclose(torch.cov(t.T), torch.eye(2), atol=0.01)
    # ... and its cost is the closed-form W2^2
    assert float((x - t).pow(2).sum(-1).mean()) == pytest.approx(problem.w2_squared(), rel=0.01)
    # the paper's numbers: |m|^2 + tr S + d - 2 tr S^1/2 with eigenvalues 0.15 and 1.65
    expected = 1.5**2 + 1 + 1.8 + 2 - 2 * (math.sqrt(0.15) + math.sqrt(1.65))
    assert problem.w2_squared() == pytest.approx(expected, rel=1e-12)
    random = ot_experiment.random_problem(8, seed=1)
    eigenvalues = torch.linalg.eigvalsh(random.cov)
    assert bool((eigenvalues > 0.2 - 1e-9).all()) and bool((eigenvalues < 5 + 1e-9).all())
    assert torch.equal(random.cov, ot_experiment.random_problem(8, seed=1).cov)


def test_linear_iaf_closed_form_matches_monte_carlo():
    problem = ot_experiment.random_problem(4, seed=2)
    flow = ot_experiment.LinearIAF(4)
    with torch.no_grad():
        flow.shift.normal_()
        flow.lower.normal_()
        flow.log_diag.uniform_(-0.5, 0.5)
    base = common.standard_normal(4, torch.device("cpu"), torch.float64)
    model = torch.distributions.TransformedDistribution(base, [flow.inv])
    x = problem.sample(400_000, seed=1)
    monte_carlo = ot_experiment.map_metrics(
        flow, model.log_prob, problem, x, problem.distribution().log_prob(x)
    )
    exact = flow.closed_form(problem)
    for key in ("kl", "cost", "l2_uvp"):
        assert monte_carlo[key] == pytest.approx(exact[key], rel=0.02), key


def test_ot_quick_run_learns_the_ot_map(tmp_path):
    md = tmp_path / "RESULTS.md"
    record = ot_experiment.main(
        ["--quick", "--no-progress", "--out-dir", str(tmp_path), "--results-md", str(md)]
    )
    data = json.loads((tmp_path / "ot.json").read_text())
    assert list(data["problems"]) == ["paper (d=2)", "random d=2"]
    for name, entry in data["problems"].items():
        w2 = entry["w2_squared"]
        cp = entry["cpflow"]
        uvp = [point["l2_uvp"] for point in cp["curve"]]
        kl = [point["kl"] for point in cp["curve"]]
        assert cp["train_loss_end"] < cp["train_loss_start"], name
        # the map error and the KL fall by orders of magnitude in a short run
        assert uvp[-1] < 0.05 * uvp[0] and kl[-1] < 0.05 * kl[0], name
        assert cp["final"]["l2_uvp"] < 0.5, name
        # the transport cost approaches W2^2 (within 3%, the Monte Carlo error of 4000 held-out
        # points included)
        assert abs(cp["final"]["cost"] - w2) < 0.03 * w2, name
        # the linear flow fits the density as well, but not with the OT map
        linear = entry["linear_iaf"]["final"]
        assert linear["kl"] < 0.05 and linear["l2_uvp"] > 5 * cp["final"]["l2_uvp"], name
    paper = data["problems"]["paper (d=2)"]
    assert paper["linear_iaf"]["final"]["cost"] > 1.05 * paper["w2_squared"]
    assert (tmp_path / "ot_cost_vs_kl.png").stat().st_size > 10_000
    text = md.read_text()
    assert "## Optimal transport" in text and "| paper (d=2) |" in text and "ot_cost_vs_kl.png" in text
    assert f"{record['problems']['random d=2']['w2_squared']:.4f}" in text
    # the figure and the section are regenerated from the JSON alone
    (tmp_path / "ot_cost_vs_kl.png").unlink()
    before = md.read_text()
    ot_experiment.main(["--render-only", "--out-dir", str(tmp_path), "--results-md", str(md)])
    assert md.read_text() == before and (tmp_path / "ot_cost_vs_kl.png").exists()
