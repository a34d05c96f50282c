"""The W&B dashboard: built from real wandb-workspaces objects; offline it prints the plan and never
touches the network; online it saves (the save itself is replaced here)."""
from __future__ import annotations

import socket

import pytest
import yaml

from pipeline.__main__ import main as cli
from pipeline.config import deep_merge, from_dict
from pipeline.studies import dashboard as D

GROUPS = ["sweep-depth", "sweep-width", "sweep-heads", "sweep-sample_size"]
SECTIONS = ["TGMM main study", "Robustness: sample size", "Robustness: distribution shift", "Scaling sweeps"]


@pytest.fixture
def params(tiny_params) -> dict:
    return deep_merge(tiny_params, {"robustness": {"train_n0": [8, 16], "eval_n": [8, 16], "sigma_p": [0, 1]}})


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt, a W&B API object or a save fails the test."""
    import wandb
    import wandb_workspaces.reports.v2 as wr

    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(wandb, "Api", refuse)
    monkeypatch.setattr(wr.Report, "save", refuse)


def _params_file(tmp_path, params) -> str:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(params))
    return str(p)


@pytest.mark.parametrize("mode,key", [("offline", None), ("disabled", None), ("offline", "fake-key"),
                                      (None, None)])  # None: auto without credentials
def test_offline_prints_the_plan_and_exits_0(tmp_path, params, monkeypatch, capsys, no_network, mode, key):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_MODE", raising=False)
    if mode:
        monkeypatch.setenv("WANDB_MODE", mode)
    if key:
        monkeypatch.setenv("WANDB_API_KEY", key)
    assert cli(["--params", _params_file(tmp_path, params), "dashboard", "--project", "proj"]) == 0
    out = capsys.readouterr().out
    assert "not saved" in out and "/proj" in out and D.TITLE in out
    for section in SECTIONS:
        assert f"Section: {section}" in out
    for group in GROUPS:
        assert f"Metric(\"Group\") == '{group}'" in out
    assert "Metric(\"Group\") == 'robustness' and Metric(\"JobType\") == 'robustness'" in out
    assert "Metric(\"Group\") == 'tgmm' and Metric(\"JobType\") == 'evaluate'" in out
    assert "eval/l2/d=2/K=3/em_paper" in out  # main study: per K and method
    assert "robustness/curve/sample_size/l2/K=3/tgmm_n0=8" in out  # per training N0
    assert "robustness/curve/shift/l2/K=2/spectral" in out and "x=robustness/curve/sigma_p" in out
    assert "error vs N for a fixed model (TGMM N0 = 16)" in out
    for param in D.SCALING_SWEEPS.values():
        assert f"grouped by config.{param}.value" in out and f"val/l2 vs {param}" in out


def test_plan_is_made_of_wandb_workspaces_objects(params, no_network):
    import wandb_workspaces.reports.v2 as wr

    report = D.build_report(from_dict(params), None, "proj")
    assert isinstance(report, wr.Report) and report.title == D.TITLE
    grids = D.panel_grids(report)
    assert len(grids) == 3 + len(D.SCALING_SWEEPS)
    panels = [p for g in grids for p in g.panels]
    assert all(isinstance(p, (wr.BarPlot, wr.LinePlot)) for p in panels)
    assert {rs.name for g in grids for rs in g.runsets} >= set(GROUPS)
    # the full W&B spec serialises offline (no entity: no project lookup), with flat config keys
    spec = report._to_model().spec.model_dump_json(by_alias=True, exclude_none=True)
    for needle in ("model.n_layer.value", "task.n0.value", "robustness/curve/N", "eval/l2/d=2/K=2/tgmm", "val/l2"):
        assert needle in spec, needle


def test_online_saves_the_report(tmp_path, params, monkeypatch, capsys):
    import wandb_workspaces.reports.v2 as wr

    saved = []
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "fake-key")
    monkeypatch.setattr(wr.Report, "save", lambda self, **kw: saved.append(self) or self)
    monkeypatch.setattr(wr.Report, "url", property(lambda self: f"https://wandb.example/{self.entity}/report"))
    p = _params_file(tmp_path, params)
    assert cli(["--params", p, "dashboard", "--entity", "team", "--project", "proj"]) == 0
    assert len(saved) == 1 and saved[0].entity == "team" and saved[0].project == "proj"
    assert all(rs.entity == "team" for g in D.panel_grids(saved[0]) for rs in g.runsets)
    assert "saved https://wandb.example/team/report" in capsys.readouterr().out
    assert cli(["--params", p, "dashboard", "--entity", "team", "--dry-run"]) == 0 and len(saved) == 1
    import types

    import wandb

    monkeypatch.setattr(wandb, "Api", lambda: types.SimpleNamespace(default_entity="me"))  # no --entity
    assert cli(["--params", p, "dashboard"]) == 0
    assert saved[-1].entity == "me" and all(rs.entity == "me" for g in D.panel_grids(saved[-1]) for rs in g.runsets)

    def broken(self, **kw):
        raise RuntimeError("permission denied")

    monkeypatch.setattr(wr.Report, "save", broken)
    assert cli(["--params", p, "dashboard", "--entity", "team"]) == 1
    assert "could not save the W&B report (RuntimeError: permission denied)" in capsys.readouterr().err
