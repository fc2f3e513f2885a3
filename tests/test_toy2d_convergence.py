"""``experiments/toy2d_convergence.py``: the ``--quick`` run's JSON, exact resumption from a
checkpoint, refusals (other settings, a finished run), the section rendered from the JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from experiments import toy2d_convergence as conv
from pyro_cpflow import CheckpointError

MODELS = ["CP-Flow (112x2, gain 4)", "MAF (affine AR)"]


def _quick(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--quick",
        "--no-progress",
        "--out",
        str(tmp_path / "conv.json"),
        "--run-dir",
        str(tmp_path / "runs"),
        "--datasets",
        "moons",
        "--models",
        *MODELS,
        "--steps",
        "16",
        *extra,
    ]


def _finite(value: float) -> bool:
    return isinstance(value, float) and math.isfinite(value)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One ``--quick`` run (1 set, 2 models, 2 seeds, 16 steps): its folder and record."""
    folder = tmp_path_factory.mktemp("toy2d_convergence")
    return folder, conv.main(_quick(folder))


def test_quick_run_writes_finite_curves_summaries_and_figures(quick_run):
    tmp_path, record = quick_run
    data = json.loads((tmp_path / "conv.json").read_text())
    assert data["command"].startswith("python -m experiments.toy2d_convergence --quick")
    assert data["settings"]["seed_list"] == [0, 1] and data["settings"]["models"] == MODELS
    assert set(data["models"]) == set(MODELS)
    assert 0.8 < data["models"][MODELS[0]]["parameters"] / data["models"][MODELS[1]]["parameters"] < 1.25
    entry = data["datasets"]["moons"]
    assert _finite(entry["gaussian_fit_loglik"])
    for model_name in MODELS:
        runs = entry["models"][model_name]["seeds"]
        assert sorted(runs) == ["0", "1"]
        for run in runs.values():
            assert [p["step"] for p in run["curve"]] == [0, 8, 16]
            for point in run["curve"]:
                assert all(_finite(float(point[k])) for k in ("seconds", "cpu_seconds", "test_loglik"))
            seconds = [p["cpu_seconds"] for p in run["curve"]]
            assert seconds == sorted(seconds) and seconds[-1] == pytest.approx(run["train_cpu_seconds"])
            assert run["test_loglik"] == run["curve"][-1]["test_loglik"]
            assert all(_finite(run[k]) for k in ("test_loglik_stderr", "ms_per_step", "train_loss_end"))
        assert runs["0"]["init_seed"] != runs["1"]["init_seed"]
    summary = data["summary"]["moons"]
    assert summary["best"] in MODELS and _finite(summary["equal_time_seconds"])
    for row in summary["models"].values():
        for key in ("equal_steps", "equal_time"):
            assert _finite(row[key]["mean"]) and _finite(row[key]["stderr"]) and row[key]["stderr"] >= 0
        assert row["seeds"] == 2 and _finite(row["last_quarter_gain"])
    for figure in data["figures"].values():
        assert Path(figure).stat().st_size > 5_000
    # a second start finds every unit finished: nothing is trained again, the numbers are the same
    again = conv.main(_quick(tmp_path))
    assert again["datasets"] == record["datasets"]


def test_the_finished_models_are_scored_again_on_fresh_held_out_sets(quick_run):
    """The fresh scores come from the finished checkpoints; the same loading path on the
    training-time held-out set gives back the recorded score, so the checkpoint holds the model
    that was scored (ActNorm's initialisation included)."""
    tmp_path, record = quick_run
    entry = record["datasets"]["moons"]
    assert _finite(entry["gaussian_fit_fresh_loglik"])
    assert entry["gaussian_fit_fresh_loglik"] != entry["gaussian_fit_loglik"]
    settings = record["settings"]
    for model_name in MODELS:
        for seed, run in entry["models"][model_name]["seeds"].items():
            assert _finite(run["fresh_test_loglik"]) and run["fresh_test_loglik"] != run["test_loglik"]
            replay = {"datasets": {"moons": {"models": {model_name: {"seeds": {seed: {}}}}}}}
            fresh = {
                "moons": conv.held_out_set(
                    "moons", settings["n_test"], torch.float64, conv.FRESH_HELD_OUT_SEED
                )
            }
            unit = ("moons", model_name, int(seed))
            conv.fresh_held_out_scores(replay, conv.pointwise_logliks(tmp_path / "runs", [unit], [fresh])[0])
            assert (
                replay["datasets"]["moons"]["models"][model_name]["seeds"][seed]["fresh_test_loglik"]
                == run["fresh_test_loglik"]
            )
        row = record["summary"]["moons"]["models"][model_name]["fresh"]
        assert _finite(row["mean"]) and _finite(row["stderr"])
    # the held-out set of training: the score recorded at the last step
    run = entry["models"][MODELS[0]]["seeds"]["0"]
    state = conv.load_checkpoint(conv.unit_path(tmp_path / "runs", "moons", MODELS[0], 0), map_location="cpu")
    module, distribution = conv.build(MODELS[0], 0)
    module.load_state_dict(state["module"])
    test = conv.held_out_set("moons", settings["n_test"], torch.float64)
    assert conv._evaluate(module, distribution, test)[0] == pytest.approx(run["test_loglik"], abs=1e-12)
    section = conv.markdown_section(record, tmp_path / "RESULTS.md")
    assert "fresh held-out sets" in section and section.count("| moons |") == 3


def test_the_paired_comparisons_agree_with_the_recorded_scores(quick_run):
    """The per-point values behind the paired differences give back, seed by seed, the scores
    recorded at the last training step and on the fresh sets: the pairs compare those models."""
    _, record = quick_run
    entry = record["datasets"]["moons"]
    pair = entry["paired"][f"{MODELS[0]} | {MODELS[1]}"]
    assert list(entry["paired"]) == [f"{MODELS[0]} | {MODELS[1]}"]
    runs = [entry["models"][m]["seeds"] for m in MODELS]
    for held_out, key in (("first", "test_loglik"), ("fresh", "fresh_test_loglik")):
        per_seed = [runs[0][s][key] - runs[1][s][key] for s in ("0", "1")]
        assert pair[held_out]["mean"] == pytest.approx(sum(per_seed) / 2, abs=1e-10)
        assert pair[held_out]["seed_stderr"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2, rel=1e-6)
        stats = pair[held_out]
        assert stats["stderr"] == pytest.approx(math.hypot(stats["seed_stderr"], stats["sample_stderr"]))
    pooled = pair["pooled"]
    assert pooled["mean"] == pytest.approx((pair["first"]["mean"] + pair["fresh"]["mean"]) / 2, abs=1e-10)
    assert pooled["sample_stderr"] < min(pair["first"]["sample_stderr"], pair["fresh"]["sample_stderr"])
    assert "Paired differences" in conv.markdown_section(record, Path("RESULTS.md"))
    (line,) = [line for line in conv.paired_lines(record) if line.startswith("* moons")]
    assert line.endswith(("standard error).", "standard errors."))
    # one seed has no standard error over seeds: the line says so instead of a ratio of nan
    one_seed = json.loads(json.dumps(record))
    for held_out in ("first", "fresh", "pooled"):
        one_seed["datasets"]["moons"]["paired"][f"{MODELS[0]} | {MODELS[1]}"][held_out]["stderr"] = math.nan
    (line,) = [line for line in conv.paired_lines(one_seed) if line.startswith("* moons")]
    assert line.endswith("one seed, no standard error over seeds.") and "nan standard" not in line
    # an ablation's section lists them too, and with a companion run the choice per data set
    ablation = {**record, "settings": {**record["settings"], "ablation": True}}
    section = conv.markdown_section(ablation, Path("RESULTS.md"), companion=record)
    assert "Paired differences" in section and "chosen per data set" in section
    (row,) = [line for line in section.splitlines() if line.startswith("| moons | ")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == MODELS[0] and cells[4] == conv._signed(pair["first"])
    assert cells[5] in ("ahead", "within", "outside")
    if pair["first"]["mean"] > 0:  # CP-Flow's mean is the higher one
        assert cells[5] == "ahead"
    other = {**record, "settings": {**record["settings"], "steps": 32}}
    with pytest.raises(ValueError, match="steps"):
        conv.block_choice_lines(ablation, other)


def test_a_missing_companion_run_is_named_and_the_section_written_without_it(quick_run, monkeypatch, capsys):
    """An ablation whose companion (:data:`BLOCK_CHOICE_RUNS`) is not there yet: the section is
    written without the per-set choice, and the missing file is named, not a traceback."""
    tmp_path, record = quick_run
    ablation = tmp_path / "ablation.json"
    ablation.write_text(json.dumps({**record, "settings": {**record["settings"], "ablation": True}}))
    monkeypatch.setitem(conv.BLOCK_CHOICE_RUNS, "ablation.json", "not-run-yet.json")
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Results\n")
    conv.main(
        [
            "--render-only",
            "--no-figures",
            "--out",
            str(ablation),
            "--run-dir",
            str(tmp_path / "runs"),
            "--results-md",
            str(results_md),
            "--section",
            "Ablation",
        ]
    )
    assert f"{tmp_path / 'not-run-yet.json'} is missing" in capsys.readouterr().out
    section = results_md.read_text()
    assert (
        "## Ablation" in section and "Paired differences" in section and "chosen per data set" not in section
    )


def test_the_paired_standard_error_matches_the_spread_over_replications():
    """Replicate a comparison many times, each with new training seeds (a random offset per
    seed) and a new held-out sample (two Gaussian models scored on Gaussian data): the
    standard errors of :func:`paired_difference` match the spread of its mean, each term alone
    and both together."""
    generator = torch.Generator().manual_seed(0)
    normal_a = torch.distributions.Normal(0.0, 1.0)
    normal_b = torch.distributions.Normal(0.3, 1.5)

    def replicate(seed_spread: float, sample: bool, points: torch.Tensor) -> dict[str, float]:
        x = torch.randn(500, generator=generator) if sample else points
        offsets = seed_spread * torch.randn(5, 1, generator=generator)
        a = normal_a.log_prob(x).expand(5, -1) + offsets
        return conv.paired_difference(a, normal_b.log_prob(x).expand(5, -1))

    fixed = torch.randn(500, generator=generator)
    for seed_spread, sample, term in (
        (0.05, False, "seed_stderr"),
        (0.0, True, "sample_stderr"),
        (0.03, True, "stderr"),
    ):
        results = [replicate(seed_spread, sample, fixed) for _ in range(2000)]
        means = torch.tensor([r["mean"] for r in results])
        estimated = sum(r[term] for r in results) / len(results)
        assert means.std().item() == pytest.approx(estimated, rel=0.08), term
    with pytest.raises(ValueError, match="shape"):
        conv.paired_difference(torch.zeros(2, 3), torch.zeros(3, 2))


def test_an_interrupted_unit_resumes_exactly(tmp_path):
    _, args = conv.parse_args(_quick(tmp_path, "--eval-every", "4"))
    test = conv.held_out_set("moons", args.n_test, torch.float64)
    for model_name in MODELS:
        whole = conv.train_unit("moons", model_name, 0, args, test, tmp_path / f"{model_name}-whole.pt")
        path = tmp_path / f"{model_name}-cut.pt"
        assert conv.train_unit("moons", model_name, 0, args, test, path, stop_after=8) is None
        assert path.exists()
        resumed = conv.train_unit("moons", model_name, 0, args, test, path)
        assert [p["test_loglik"] for p in resumed["curve"]] == [p["test_loglik"] for p in whole["curve"]]
        assert resumed["train_loss_end"] == whole["train_loss_end"]
        # the settings are part of the checkpoint: other ones are refused
        args.lr = 0.123
        with pytest.raises(CheckpointError, match="other settings"):
            conv.train_unit("moons", model_name, 0, args, test, path)
        args.lr = None


def test_a_finished_run_is_not_replaced_without_overwrite(tmp_path, capsys):
    out = tmp_path / "done.json"
    out.write_text("{}")
    with pytest.raises(SystemExit) as stop:
        conv.main(["--out", str(out), "--results-md", ""])
    assert stop.value.code == 2 and "--overwrite" in capsys.readouterr().err


def test_the_section_is_rendered_from_the_json(quick_run, tmp_path):
    folder, _ = quick_run
    md = tmp_path / "RESULTS.md"
    md.write_text("# Experiment results\n\n## Other\n\nkept\n")
    argv = [
        "--render-only",
        "--out",
        str(folder / "conv.json"),
        "--run-dir",
        str(folder / "runs"),
        "--results-md",
        str(md),
        "--section",
        "Toy check",
    ]
    record = conv.main(argv)
    text = md.read_text()
    assert "## Other\n\nkept" in text and "## Toy check" in text and "| moons |" in text
    best = record["summary"]["moons"]["models"][record["summary"]["moons"]["best"]]["equal_steps"]
    assert f"**{best['mean']:.3f} ± {best['stderr']:.3f}**" in text
    assert "conv_curves.png" in text and "conv_densities.png" in text
    # the default section is only written from the default results file
    conv.main(argv[:-2])
    assert f"## {conv.TITLE}" not in md.read_text()
    # a budget check against a longer run (here the run itself: no change)
    check = conv.markdown_section(record, md, longer=record)
    assert "Budget check" in check and "(+0.000)" in check and "(-" not in check
    margin = (
        record["datasets"]["moons"]["models"][MODELS[0]]["seeds"]["0"]["test_loglik"]
        - (record["datasets"]["moons"]["models"][MODELS[1]]["seeds"]["0"]["test_loglik"])
    )
    assert f"{margin:+.3f} → {margin:+.3f}" in check


def test_no_figures_and_readings(quick_run, tmp_path, monkeypatch):
    folder, record = quick_run
    out = tmp_path / "plain.json"
    out.write_text(json.dumps(record))
    plain = conv.main(["--render-only", "--no-figures", "--out", str(out), "--results-md", ""])
    assert plain.get("figures") == record.get("figures") and not (tmp_path / "plain_curves.png").exists()
    # a reading written for a results file is appended to its section, after a blank line
    monkeypatch.setitem(conv.READINGS, Path(record["settings"]["out"]).name, "What it says.")
    assert "\n\nWhat it says.\n" in conv.markdown_section(record, tmp_path / "RESULTS.md")


def test_later_variant_fields_keep_the_first_runs_fingerprints():
    # the fields added later (alpha, initial_scale) are left out at their defaults
    spec = conv.model_spec("CP-Flow (64x4, gain 8, lr 0.08)")
    assert spec == (
        "toy2d.cpflow_model: CPFlowVariant(hidden_dims=(64, 64, 64, 64), blocks=1, "
        "input_gain=8.0, activation='gaussian_softplus', lr=0.08)"
    )
    assert conv.model_spec("CP-Flow (64x4, gain 16, lr 0.08, scale 1)").endswith("initial_scale=1.0)")
    module, _ = conv.build("CP-Flow (64x4, gain 16, lr 0.08, scale 1)", 0)
    scales = [
        float(torch.nn.functional.softplus(m.raw_scale.detach()))
        for m in module.modules()
        if hasattr(m, "raw_scale")
    ]
    assert scales and all(s == pytest.approx(1.0) for s in scales)


def test_a_smaller_last_block():
    name = "CP-Flow (56x4, then 32x3, gain 16, lr 0.08)"
    assert conv.model_spec(name).endswith("last_block_hidden_dims=(32, 32, 32))")
    module, _ = conv.build(name, 0)
    widths = [m.hidden_dims for m in module.modules() if hasattr(m, "hidden_dims")]
    assert widths == [(56, 56, 56, 56), (32, 32, 32)]
    with pytest.raises(ValueError, match="last_block_hidden_dims needs blocks >= 2"):
        conv.toy2d.cpflow_model(2, 16.0, blocks=1, last_block_hidden_dims=(8,))
