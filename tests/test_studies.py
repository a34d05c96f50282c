"""Every declared study end to end on tiny params (plan -> train -> generate -> evaluate -> report, in
process, in a temporary folder), then what each study's declaration promises: shared networks,
identical tasks across studies, nested samples, paired shifts, matched widths, the results schema."""
from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline import studies as S
from pipeline.__main__ import main as cli
from pipeline.core import plan as P
from pipeline.core.arrays import load_arrays
from pipeline.core.config import from_dict, load
from pipeline.core.evaluate import load_set, set_path
from pipeline.core.results import ROW_KEYS
from tests.conftest import REPO, TINY_PARAMS

ALL = ["tgmm", "robustness", "ablation", "linreg"]


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """The whole chain once for every study; yields (folder, cfg)."""
    root = tmp_path_factory.mktemp("studies")
    p = copy.deepcopy(TINY_PARAMS)
    p.update(studies=ALL, out_dir=str(root / "outputs"))
    (root / "params.yaml").write_text(yaml.safe_dump(p))
    (root / "sweeps").mkdir()
    old = os.getcwd()
    os.environ["WANDB_MODE"] = "disabled"
    os.chdir(root)
    try:
        for cmd in (["plan"], ["train", "--no-track"], ["generate"], ["evaluate", "--no-track"], ["report"]):
            assert cli(cmd) == 0, cmd
        yield root, load(root / "params.yaml")
    finally:
        os.chdir(old)


def _results(root: Path, study: str) -> dict:
    return json.loads((root / "outputs" / study / "results.json").read_text())


def test_identical_runs_are_one_network(done):
    root, cfg = done
    plan = P.resolve(cfg)
    # robustness at N0 = task.gmm.n0 and the ablation's base variant are the tgmm network at d = 2
    assert plan.studies["robustness"].networks["n0_16"] == "tgmm-d2"
    assert plan.studies["ablation"].networks["transformer"] == "tgmm-d2"
    assert plan.studies["robustness"].networks["n0_8"] == "robustness-n0_8"
    assert sorted(p.name for p in (root / "outputs" / "runs").iterdir()) == sorted(plan.runs)
    assert len(plan.runs) == 5  # tgmm-d2, robustness-n0_8, ablation-lstm, ablation-anisotropic, linreg-main


@pytest.mark.parametrize("study", ALL)
def test_results_schema_and_report(done, study):
    root, cfg = done
    res = _results(root, study)
    assert res["study"] == study and res["rows"]
    for r in res["rows"]:
        assert set(ROW_KEYS) <= set(r), set(ROW_KEYS) - set(r)
        if r["applicable"]:
            assert r["n"] > 0 and r["seconds"] >= 0
        else:
            assert r["reason"] and r["mean"] is None
    st = S.get(study)
    grids = {g.name: g for g in st.grids(cfg)}
    for name, g in grids.items():  # every point x method x metric is there
        for point in g.points:
            for m in g.methods(cfg, point):
                assert any(r["grid"] == name and r["method"] == m.name and
                           all(r["point"].get(k) == v for k, v in point.items()) for r in res["rows"]), (name, point, m)
    rep = root / "outputs" / study / "report"
    text = (rep / "report.md").read_text()
    assert text.startswith(f"# {st.title}")
    for fig in st.figures(cfg):
        assert (rep / "figures" / f"{fig.name}.png").stat().st_size > 1000
        assert (rep / "plots" / f"{fig.name}.csv").read_text().startswith(f"panel,series,{fig.x},value,low,high")
    metrics = json.loads((rep / "metrics.json").read_text())
    row = next(r for r in res["rows"] if r["applicable"] and r["point"] == next(iter(
        [rr["point"] for rr in res["rows"] if rr["applicable"]])))
    key = f"{row['grid']}/{row['metric']}/" + ",".join(f"{k}={v}" for k, v in row["point"].items()) + f"/{row['method']}"
    assert metrics[key] == pytest.approx(row["mean"], abs=1e-6)


def test_tgmm_table_shows_the_results(done):
    root, _ = done
    res = _results(root, "tgmm")
    text = (root / "outputs" / "tgmm" / "report" / "report.md").read_text()
    from pipeline.core.report import fmt

    row = next(r for r in res["rows"] if r["method"] == "em_strong" and r["metric"] == "l2")
    assert fmt(row["mean"]) in text
    assert "n/a" in text  # spectral at K > d = 2
    net = [r for r in res["rows"] if r["method"] == "tgmm"]
    assert net and all(r["network"] == "tgmm-d2" for r in net)


def test_ablation_sets_are_the_tgmm_tasks(done):
    root, cfg = done
    from pipeline.studies.tgmm import eval_set

    a = load_arrays(set_path("ablation", "backbones", {"K": 3}, root / "data" / "ablation"))[0]
    sec = cfg.section("ablation")
    b = eval_set(cfg, S.get("tgmm").task(cfg, d=2), 3, sec.n_tasks, sec.n).to_numpy()  # what tgmm draws
    assert all(np.array_equal(a[k], b[k]) for k in b)
    full = load(REPO / "params.yaml", profile="full-cpu")  # ... and at full-cpu sizes exactly tgmm's tasks
    assert (full.section("ablation").n_tasks, full.section("ablation").n) == \
        (full.section("tgmm").n_tasks, full.section("tgmm").n)
    aniso = load_arrays(set_path("ablation", "anisotropic", {"K": 3}, root / "data" / "ablation"))[0]
    assert "scales" in aniso and not np.array_equal(aniso["x"], a["x"])


def test_robustness_samples_are_nested_and_shifts_paired(done):
    root, cfg = done
    st = S.get("robustness")
    grids = {g.name: g for g in st.grids(cfg)}
    d = root / "data" / "robustness"
    small = load_set(cfg, st, grids["sample_size"], {"N": 8, "K": 2}, d)
    big = load_set(cfg, st, grids["sample_size"], {"N": 16, "K": 2}, d)
    assert torch.equal(small.x, big.x[:, :8]) and torch.equal(small.means, big.means)
    s0 = load_set(cfg, st, grids["shift"], {"sigma_p": 0.0, "K": 2}, d)
    s2 = load_set(cfg, st, grids["shift"], {"sigma_p": 2.0, "K": 2}, d)
    assert torch.equal(s0.x, big.x[:, :16]) and torch.equal(s0.labels, s2.labels)
    moved = (s2.means - s0.means)  # (B, K, d): the same move for every point of a component
    delta = s2.x - s0.x
    expect = torch.gather(moved, 1, s0.labels.clamp_min(0)[..., None].expand_as(delta)) * s0.mask[..., None]
    assert torch.allclose(delta, expect, atol=1e-5)


def test_linreg_curves_and_findings(done):
    root, cfg = done
    res = _results(root, "linreg")
    t = cfg.task["linreg"]
    ls = {r["point"]["k"]: r["mean"] for r in res["rows"] if r["method"] == "least_squares"}
    assert sorted(ls) == list(range(t.n_points))
    assert all(ls[k] < 1e-8 for k in ls if k >= t.d)  # noiseless: exact once k >= d
    assert ls[0] > 0.2  # the zero prediction
    text = (root / "outputs" / "linreg" / "report" / "report.md").read_text()
    assert "## Findings" in text and "transformer vs averaging" in text


def test_stale_or_foreign_eval_set_is_refused(done, tmp_path):
    root, cfg = done
    st = S.get("tgmm")
    g = st.grids(cfg)[0]
    other = from_dict({**copy.deepcopy(TINY_PARAMS), "studies": ALL, "seed": 1})
    from pipeline.core.arrays import DataError

    with pytest.raises(DataError, match="generated for other params"):
        load_set(other, st, g, g.points[0], root / "data" / "tgmm")


def test_default_ablation_widths_match_parameter_counts():
    """At the default params each variant's parameter count is within 5 % of the base network's."""
    from pipeline.core.network import count_parameters

    for profile, base_run in ((None, "robustness-n0_32"), ("full-cpu", "tgmm-d2")):
        cfg = load(REPO / "params.yaml", profile=profile)
        plan = P.resolve(cfg)
        counts = {u: count_parameters(plan.runs[r]) for u, r in plan.studies["ablation"].networks.items()}
        base = counts["transformer"]
        for u, c in counts.items():
            if u != "anisotropic":
                assert abs(c - base) / base < 0.05, (profile, u, c, base)
        # the base variant is whichever run has its identity: no copy, no second training
        assert plan.studies["ablation"].networks["transformer"] == base_run
        # and one d = 2 network serves tgmm and robustness at the tgmm training N0 (64; full-cpu 128)
        assert plan.studies["robustness"].networks[f"n0_{cfg.task['gmm'].n0}"] == "tgmm-d2"
    assert {"lstm", "relu_attention", "linear_attention"} <= set(plan.studies["ablation"].networks)
