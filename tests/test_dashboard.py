"""The W&B dashboard: built from real wandb-workspaces objects, one section per study in `studies`
(from its declaration: the metric keys its evaluation logs) and one per sweep file (its metric, by
default the family's monitor); offline it prints the plan and never touches the network; online it
saves (the save itself is replaced here)."""
from __future__ import annotations

import socket

import numpy as np
import pytest
import yaml

from pipeline import studies as S
from pipeline.__main__ import main as cli
from pipeline.core import dashboard as D
from pipeline.core import family as F
from pipeline.core.config import from_dict
from pipeline.core.evaluate import flat_metrics, rows_for
from tests.conftest import REPO

STUDIES = ["tgmm", "robustness", "ablation", "linreg"]
SWEEPS = {"depth": "model.n_layer", "width": "model.n_embd", "heads": "model.n_head", "sample_size": "task.n0"}


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    """The dashboard reads sweeps/*.yaml relative to the working directory, as the CLI runs it."""
    monkeypatch.chdir(REPO)


@pytest.fixture
def params(tiny_params) -> dict:
    return {**tiny_params, "studies": list(STUDIES)}


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
    for name in STUDIES:  # a section per study, its runs: the study's group, job type evaluate
        assert f"Section: {S.get(name).title}" in out
        assert f"Metric(\"Group\") == '{name}' and Metric(\"JobType\") == 'evaluate'" in out
    assert "tgmm/main/l2/d=2/K=3/em_paper" in out                        # per (d, K) and method
    assert "robustness/sample_size/l2/N=8/K=3/tgmm (N0=8)" in out        # per training N0
    assert "robustness/shift/accuracy/sigma_p=2.0/K=2/spectral" in out
    assert "ablation/backbones/loglik/K=2/lstm" in out and "ablation/anisotropic/l2/K=3/tgmm" in out
    # linreg: the error after every k = 0 .. n_points-1 in-context examples, per method
    assert "linreg/main/sq_error/k=0/transformer" in out and "linreg/main/sq_error/k=6/least_squares" in out
    assert "k=7/" not in out and "k=*" not in out
    assert "Section: Scaling sweeps" in out
    for name, param in SWEEPS.items():
        assert f"Metric(\"Group\") == 'sweep-{name}'" in out
        assert f"grouped by config.{param}.value" in out and f"val/l2 vs {param}" in out


def _declared_flat_metrics(cfg, name: str) -> set[str]:
    """The keys evaluate.flat_metrics logs for study `name`: every declared grid x point x method x
    metric, through the same row builder evaluate() uses (per-task values faked; linreg's axis k has
    n_points values)."""
    st = S.get(name)
    fam = F.get(st.family)
    rows = []
    for g in st.grids(cfg):
        for p in g.points:
            n_axis = st.task(cfg).n_points if st.family == "linreg" else None
            values = {m: np.ones((4, n_axis)) if spec.axis else np.ones(4) for m, spec in fam.metrics.items()}
            for method in g.methods(cfg, p):
                rows += rows_for(g.name, p, method, None, fam.metrics, values, 0.0, True, "")
    return set(flat_metrics({"study": name, "rows": rows}))


def test_panels_show_what_each_evaluation_logs(params, no_network):
    """Every study's panels reference exactly the metric keys its evaluation run logs."""
    cfg = from_dict(params)
    report = D.build_report(cfg, None, "proj")
    for name in STUDIES:
        (grid,) = [g for g in D.panel_grids(report) if any(rs.name == f"{name} evaluation" for rs in g.runsets)]
        shown = {m for p in grid.panels for m in p.metrics}
        assert shown == _declared_flat_metrics(cfg, name), name


def test_plan_is_made_of_wandb_workspaces_objects(params, no_network):
    import wandb_workspaces.reports.v2 as wr

    report = D.build_report(from_dict(params), None, "proj")
    assert isinstance(report, wr.Report) and report.title == D.TITLE
    grids = D.panel_grids(report)
    assert len(grids) == len(STUDIES) + len(SWEEPS)  # one per study, one per swept param of every sweep
    panels = [p for g in grids for p in g.panels]
    assert all(isinstance(p, (wr.BarPlot, wr.LinePlot)) for p in panels)
    assert {rs.name for g in grids for rs in g.runsets} >= {f"sweep-{n}" for n in SWEEPS}
    # the full W&B spec serialises offline (no entity: no project lookup), with flat config keys
    spec = report._to_model().spec.model_dump_json(by_alias=True, exclude_none=True)
    for needle in ("model.n_layer.value", "task.n0.value", "tgmm/main/l2/d=2/K=2/tgmm",
                   "linreg/main/sq_error/k=3/gd", "robustness/shift/l2/sigma_p=0.0/K=3/tgmm (N0=16)", "val/l2"):
        assert needle in spec, needle


def test_only_listed_studies_and_every_sweep_file(tmp_path, tiny_params, monkeypatch, no_network):
    """Sections: the studies in `studies` only; a sweep of a linreg-family study plots its default
    metric, val/mse."""
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "lr.yaml").write_text(yaml.safe_dump({
        "study": "linreg", "base": {"train.steps": 20, "train.ckpt_every": 10, "train.val_every": 10,
                                    "train.warmup_steps": 1, "train.accelerator": "cpu"},
        "params": {"train.lr": {"loguniform": [1.0e-4, 1.0e-2]}}}))
    monkeypatch.chdir(tmp_path)
    cfg = from_dict({**tiny_params, "studies": ["linreg"]})
    text = D.describe(D.build_report(cfg, None, "proj"))
    assert f"Section: {S.get('linreg').title}" in text
    assert all(f"Section: {S.get(n).title}" not in text for n in STUDIES if n != "linreg")
    assert "Subsection: sweep-lr (linreg): val/mse vs train.lr" in text
    assert "metrics=val/mse; grouped by config.train.lr.value" in text and "val/l2" not in text


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
