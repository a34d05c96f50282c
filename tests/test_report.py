"""Report outputs (DVC metrics JSON, plot CSVs, figures, markdown) from a synthetic results dict."""
from __future__ import annotations

import csv
import json

import pytest

from pipeline.studies.evaluate import evaluate_grid, json_ready
from pipeline.studies.report import (markdown_table, markdown_time_table, method_order, metrics_json,
                                     write_figures, write_plot_data, write_report)
from pipeline.tasks.gmm import GMMEstimate, make_generator, sample_gmm

DS, KS = (2, 8), (2, 3, 4, 5)
METHODS = ("spectral", "em_strong", "tgmm", "em_paper")  # deliberately not in canonical order
NAN = float("nan")
RANK = {"tgmm": 0, "em_paper": 1, "em_strong": 2, "spectral": 3}  # l2 grows with rank: tgmm is best


def _summary(mean: float, ci: float) -> dict:
    return {"mean": mean, "std": ci * 4, "ci95": ci, "n": 64}


def _value(method: str, d: int, K: int) -> float:
    return (1 + RANK[method]) * 0.01 * K * (1 + d / 10)


def _cell(method: str, d: int, K: int) -> dict:
    applicable = not (method == "spectral" and K > d)
    v = _value(method, d, K)
    stats = {"l2": _summary(v, v / 10), "accuracy": _summary(1 - v / 4, 0.01), "loglik": _summary(-2 - v, 0.05)}
    if not applicable:
        stats = {m: {"mean": NAN, "std": NAN, "ci95": NAN, "n": 0} for m in stats}
    return {"d": d, "K": K, "method": method, "applicable": applicable, "reason": "" if applicable else "K > d",
            "n_tasks": 64, "seconds": 0.5 + RANK[method], **stats}


@pytest.fixture(params=["memory", "json"])
def results(request) -> dict:
    res = {"cells": [_cell(m, d, K) for d in DS for K in KS for m in METHODS]}
    if request.param == "json":  # as read back from results.json: NaN is null
        res = json.loads(json.dumps(json_ready(res), allow_nan=False))
    return res


def test_method_order():
    assert method_order(METHODS) == ["tgmm", "em_paper", "em_strong", "spectral"]
    assert method_order(["zeta", "spectral", "mamba2", "tgmm"]) == ["tgmm", "spectral", "mamba2", "zeta"]


def test_metrics_json_omits_not_applicable(results):
    mj = metrics_json(results)
    json.dumps(mj, allow_nan=False)  # numbers only
    assert list(mj) == ["tgmm", "em_paper", "em_strong", "spectral", "not_applicable"]
    assert mj["not_applicable"] == ["spectral d=2 K=3", "spectral d=2 K=4", "spectral d=2 K=5"]
    assert set(mj["spectral"]["d=2"]) == {"K=2"}
    assert set(mj["spectral"]["d=8"]) == {f"K={K}" for K in KS}
    v = _value("em_paper", 8, 4)
    assert mj["em_paper"]["d=8"]["K=4"] == pytest.approx({"l2": v, "accuracy": 1 - v / 4, "loglik": -2 - v})


def test_plot_csvs(results, tmp_path):
    paths = write_plot_data(results, tmp_path)
    assert sorted(p.name for p in paths) == ["accuracy.csv", "l2.csv", "loglik.csv"]
    with open(tmp_path / "l2.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["d", "K", "method", "l2", "low", "high"]
    by = {(int(r["d"]), int(r["K"]), r["method"]): r for r in rows}
    # spectral is n/a for K > d = 2: those rows are absent, every other cell is present
    assert {(d, K, m) for d, K, m in by if m == "spectral" and d == 2} == {(2, 2, "spectral")}
    assert len(rows) == len(DS) * len(KS) * 4 - 3
    assert float(by[(2, 2, "spectral")]["l2"]) == pytest.approx(_value("spectral", 2, 2))
    r = by[(2, 4, "tgmm")]
    assert float(r["l2"]) == pytest.approx(_value("tgmm", 2, 4))
    assert float(r["low"]) <= float(r["l2"]) <= float(r["high"])
    with open(tmp_path / "loglik.csv") as f:
        rows = list(csv.DictReader(f))
    assert sum(r["method"] == "spectral" and r["d"] == "8" for r in rows) == len(KS)


def _check_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert len(data) > 10_000, path


def test_figures(results, tmp_path):
    paths = write_figures(results, tmp_path)
    assert [p.name for p in paths] == ["l2_vs_K.png", "accuracy_vs_K.png", "loglik_vs_K.png"]
    for p in paths:
        _check_png(p)


def test_markdown_blocks(results):
    md = markdown_table(results, "l2")
    assert md.startswith("### ℓ2 parameter error")
    for m in ("tgmm", "em_paper", "em_strong", "spectral"):
        assert f"**{m}**" in md
    # blocks in canonical order
    pos = [md.index(f"**{m}**\n") for m in ("tgmm", "em_paper", "em_strong", "spectral")]
    assert pos == sorted(pos)
    spectral = md[pos[3]:]
    table = [ln for ln in spectral.splitlines() if ln.startswith("| ")]
    assert table[0] == "| d \\ K | 2 | 3 | 4 | 5 |"
    d2 = [c.strip() for c in table[1].strip("|").split("|")]
    assert d2[0] == "2" and d2[2:] == ["n/a", "n/a", "n/a"]
    d8 = [c.strip() for c in table[2].strip("|").split("|")]
    assert d8[0] == "8" and "n/a" not in d8
    # values: 3 significant digits, mean ± ci; tgmm has the lowest l2 everywhere -> bold
    tg = md[pos[0]:pos[1]]
    v = _value("tgmm", 2, 3)
    assert f"| **{v:.3g} ± {v / 10:.3g}** |" in tg
    assert "n/a" not in md[pos[0]:pos[3]]
    v = _value("em_paper", 2, 3)
    assert f"| {v:.3g} ± {v / 10:.3g} |" in md[pos[1]:pos[2]]  # not the best: plain
    acc = markdown_table(results, "accuracy")
    assert "higher is better" in acc and "n/a for spectral: K > d" in acc


def test_time_table(results):
    t = markdown_time_table(results)
    assert "| d=2 | d=8 | total |" in t
    lines = [ln for ln in t.splitlines() if ln.startswith("| tgmm") or ln.startswith("| spectral")]
    assert lines[0].startswith("| tgmm | 2 s (7.81 ms) |")  # 4 cells x 0.5 s over 256 tasks
    assert lines[1].startswith("| spectral | 3.5 s (54.7 ms) |")  # only K = 2 applicable at d = 2


def test_write_report(results, tmp_path):
    paths = write_report(results, tmp_path / "out")
    names = {p.relative_to(tmp_path / "out").as_posix() for p in paths}
    assert {"metrics.json", "report.md", "plots/l2.csv", "figures/l2_vs_K.png"} <= names
    assert all(p.exists() for p in paths)
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.count("**tgmm**") == 3 and "### Wall time" in md
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == metrics_json(results)


def test_grid_to_report_end_to_end(tmp_path):
    class Truth:
        name = "tgmm"

        def __call__(self, batch):
            return GMMEstimate(batch.weights, batch.means + 0.1)

    class Spectral:
        name = "spectral"

        def __call__(self, batch):
            if batch.K > batch.d:
                return GMMEstimate.not_applicable(batch.B, batch.K, batch.d, "K > d")
            return GMMEstimate(batch.weights, batch.means + 0.3)

    sets = {(d, K): sample_gmm(8, d=d, K=K, n_min=8, n_max=16, generator=make_generator(d, K))
            for d in (2, 4) for K in (2, 3)}
    res = evaluate_grid(lambda d: [Spectral(), Truth()], sets, progress=False)
    paths = write_report(res, tmp_path)
    mj = json.loads((tmp_path / "metrics.json").read_text())
    assert mj["not_applicable"] == ["spectral d=2 K=3"]
    assert mj["tgmm"]["d=4"]["K=3"]["l2"] == pytest.approx(0.01, rel=1e-5)
    for p in paths:
        if p.suffix == ".png":
            _check_png(p)
