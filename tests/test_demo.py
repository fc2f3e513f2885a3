"""The main job (`make demo`): a smoke run, and its refusal to reuse a run folder."""

import json

import pytest

from experiments import demo


def test_quick_demo_compares_both_flows_with_the_closed_form(tmp_path, capsys):
    out = tmp_path / "run"
    record = demo.main(["--out-dir", str(out), "--quick", "--no-progress"])
    saved = json.loads((out / "demo.json").read_text())
    assert (out / "ot_cost_vs_kl.png").stat().st_size > 0
    assert set(saved["problems"]) == {"paper (d=2)", "random d=8"} == set(record["problems"])
    printed = capsys.readouterr().out
    assert "W2² (closed form)" in printed and "optimal-transport map" in printed
    for entry in saved["problems"].values():
        assert entry["w2_squared"] > 0 and entry["cpflow"]["final"]["l2_uvp"] >= 0


def test_demo_refuses_a_folder_that_holds_a_run(tmp_path):
    (tmp_path / "demo.json").write_text("{}")
    with pytest.raises(SystemExit):
        demo.parse_args(["--out-dir", str(tmp_path)])
