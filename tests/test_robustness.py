"""Robustness study: shifted and resized evaluation sets, reuse of the main model, the full CLI chain."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib.image
import pytest
import torch
import yaml

from pipeline.__main__ import main as cli
from pipeline.config import deep_merge, from_dict
from pipeline.studies import robustness as R

EXTRA = {
    "baselines": {"strong_restarts": 2, "em_max_iter": 20, "spectral_restarts": 2, "spectral_iters": 10},
    "robustness": {"d": 2, "train_n0": [8, 16], "eval_n": [8, 16, 32], "sigma_p": [0.0, 1.0, 5.0], "n_tasks": 6},
}
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def params(tiny_params) -> dict:
    """conftest's tiny config (d=2, K in {2, 3}, task.n0=16, 1 layer, width 16, 4 steps) + robustness."""
    return deep_merge(tiny_params, EXTRA)


def _cfg(params: dict, **robustness):
    return from_dict(deep_merge(params, {"robustness": robustness}))


def _write(tmp_path: Path, params: dict) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return str(path)


# ----------------------------------------------------------------------------- evaluation sets

def test_shift_sets_move_means_by_sigma_p_and_redraw_data(tmp_path, params):
    sigmas = [0.0, 1.0, 2.5, 10.0]
    cfg = _cfg(params, n_tasks=300, eval_n=[8, 16], sigma_p=sigmas)
    R.generate(cfg, tmp_path / "data")
    _, shift = R.load_sets(cfg, tmp_path / "data")
    for K in cfg.task.ks:
        base = R.first_points(R.base_tasks(cfg, K), cfg.eval.n)
        zero = shift[(0.0, K)]
        assert torch.equal(zero.means, base.means) and torch.equal(zero.x, base.x)  # sigma_p = 0: unshifted
        noise = {}
        for s in sigmas[1:]:
            b = shift[(s, K)]
            assert b.N == cfg.eval.n and bool(b.mask.all())
            assert torch.equal(b.weights, base.weights) and torch.equal(b.labels, base.labels)  # weights kept
            delta = (b.means - base.means).double()
            assert abs(delta.std().item() / s - 1) < 0.1, (K, s, delta.std().item())  # right empirical sigma_p
            assert abs(delta.mean().item()) < 4 * s / delta.numel() ** 0.5
            noise[s] = delta / s
            # data redrawn around the moved means: x_i - mu'_{y_i} is the same noise z_i for every sigma_p
            centre = torch.gather(b.means, 1, b.labels[..., None].expand(-1, -1, cfg.robustness.d))
            base_centre = torch.gather(base.means, 1, base.labels[..., None].expand(-1, -1, cfg.robustness.d))
            torch.testing.assert_close(b.x - centre, base.x - base_centre, atol=1e-4 * s, rtol=0)
        for s in sigmas[2:]:  # one eps for every sigma_p: a paired comparison
            torch.testing.assert_close(noise[s], noise[1.0], atol=1e-5, rtol=0)


def test_sample_size_sets_hold_exactly_N_points_of_the_same_mixtures(tmp_path, params):
    cfg = _cfg(params)
    R.generate(cfg, tmp_path / "data")
    size, _ = R.load_sets(cfg, tmp_path / "data")
    for K in cfg.task.ks:
        largest = size[(max(cfg.robustness.eval_n), K)]
        for N in cfg.robustness.eval_n:
            b = size[(N, K)]
            assert (b.B, b.N, b.K) == (cfg.robustness.n_tasks, N, K)
            assert b.n.tolist() == [N] * b.B and bool((b.labels >= 0).all())  # N real points, no padding
            assert torch.equal(b.means, largest.means) and torch.equal(b.weights, largest.weights)
            assert torch.equal(b.x, largest.x[:, :N])  # nested samples
    other = _cfg(deep_merge(params, {"seed": 1}))
    with pytest.raises(Exception, match="generated for other params"):
        R.load_sets(other, tmp_path / "data")


# ----------------------------------------------------------------------------- reuse of the main model

def test_main_model_is_reused_at_task_n0_and_refused_when_stale(tmp_path, params, capsys):
    p = _write(tmp_path, params)
    assert cli(["--params", p, "robustness", "train", "--n0", "16", "--no-track"]) == 2  # no main model yet
    assert "python -m pipeline train --d 2" in capsys.readouterr().err
    assert cli(["--params", p, "train", "--no-track"]) == 0
    capsys.readouterr()
    assert cli(["--params", p, "robustness", "train", "--n0", "16", "--no-track"]) == 0
    assert "reused the main model" in capsys.readouterr().out
    out, main = tmp_path / "outputs" / "robustness" / "train" / "n0_16", tmp_path / "outputs" / "train" / "d2"
    assert (out / "model.safetensors").read_bytes() == (main / "model.safetensors").read_bytes()
    assert not (out / "checkpoints").exists()  # nothing was trained
    assert json.loads((out / "metrics.json").read_text())["reused_main_model"] == 1
    spec = json.loads((out / "model.json").read_text())
    assert spec["task_n0"] == 16 and spec["reused_from"].endswith("model.safetensors")
    stale = _write(tmp_path, deep_merge(params, {"train": {"lr": 3e-4}}))  # main model now belongs to other params
    assert cli(["--params", stale, "robustness", "train", "--n0", "16", "--no-track"]) == 2
    assert "trained with other params" in capsys.readouterr().err
    assert cli(["--params", p, "robustness", "train", "--n0", "12", "--no-track"]) == 2  # not in train_n0


def test_bad_robustness_params_exit_2_before_compute(tmp_path, params, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = _write(tmp_path, deep_merge(params, {"robustness": {"eval_n": [4, 16]}}))
    assert cli(["--params", p, "robustness", "generate"]) == 2
    assert "robustness.eval_n[0]: must be >= 2*max(task.ks)=6" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()  # nothing written


def test_evaluate_names_the_missing_network(tmp_path, params, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = _write(tmp_path, params)
    assert cli(["--params", p, "robustness", "generate"]) == 0
    assert cli(["--params", p, "robustness", "evaluate", "--no-track"]) == 2
    assert "robustness train --n0 8" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the whole chain

def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_whole_chain_via_cli(tmp_path, params, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data/robustness is relative to the working directory, like data/gmm
    p = _write(tmp_path, params)
    cfg = from_dict(params)
    r, ks = cfg.robustness, cfg.task.ks
    assert cli(["--params", p, "train", "--no-track"]) == 0
    assert cli(["--params", p, "robustness", "train", "--no-track"]) == 0
    out = capsys.readouterr().out
    assert "[robustness train N0=16] reused the main model" in out and "[robustness train N0=8] trained" in out
    trained = json.loads((tmp_path / "outputs/robustness/train/n0_8/model.json").read_text())
    assert trained["task_n0"] == 8 and "reused_from" not in trained
    assert trained["fingerprint"] != json.loads((tmp_path / "outputs/train/d2/model.json").read_text())["fingerprint"]
    assert cli(["--params", p, "robustness", "generate"]) == 0
    monkeypatch.setenv("WANDB_MODE", "offline")  # one offline W&B run, no network
    assert cli(["--params", p, "robustness", "evaluate"]) == 0
    assert list((tmp_path / "outputs" / "wandb").glob("offline-run-*"))
    assert cli(["--params", p, "robustness", "report"]) == 0

    res = json.loads((tmp_path / "outputs/robustness/eval/results.json").read_text())
    size, shift = res["sample_size"]["cells"], res["shift"]["cells"]
    baselines = cfg.baselines.methods
    assert {(c["n0"], c["N"], c["K"]) for c in size if c["method"] == "tgmm"} == \
        {(n0, N, K) for n0 in r.train_n0 for N in r.eval_n for K in ks}
    assert {(c["method"], c["N"], c["K"]) for c in size if c["method"] != "tgmm"} == \
        {(m, N, K) for m in baselines for N in r.eval_n for K in ks}
    assert {(c["method"], c["sigma_p"], c["K"]) for c in shift} == \
        {(m, s, K) for m in ["tgmm", *baselines] for s in r.sigma_p for K in ks}
    assert {c["n0"] for c in shift if c["method"] == "tgmm"} == {cfg.task.n0}  # the main-n0 network
    assert all(c["n_tasks"] == r.n_tasks for c in size + shift)
    for c in size + shift:  # spectral is n/a for K > d; everything else is scored
        assert c["applicable"] == (c["method"] != "spectral" or c["K"] <= r.d)
        assert c["l2"]["mean"] is not None or not c["applicable"]

    flat = R.metrics_flat(res)
    assert "robustness/sample_size/l2/n0=8/N=16/K=3/tgmm" in flat
    assert "robustness/sample_size/l2/N=32/K=2/em_paper" in flat
    assert "robustness/shift/l2/sigma_p=5/K=3/tgmm" in flat
    assert not any("spectral" in k and "K=3" in k for k in flat)

    rep = tmp_path / "outputs/robustness/report"
    n_na = len(r.eval_n)  # spectral at K=3 per N (or per sigma_p: same count here)
    rows = _rows(rep / "plots/sample_size_l2.csv")
    assert list(rows[0]) == ["K", "panel", "method", "n0", "series", "N", "l2", "low", "high"]
    assert len(rows) == (len(r.train_n0) + len(baselines)) * len(r.eval_n) * len(ks) - n_na
    rows = _rows(rep / "plots/shift_l2.csv")
    assert list(rows[0]) == ["K", "panel", "method", "series", "sigma_p", "l2", "low", "high"]
    assert len(rows) == (1 + len(baselines)) * len(r.sigma_p) * len(ks) - len(r.sigma_p)
    rows = _rows(rep / "plots/fixed_model_l2.csv")
    assert {(int(x["K"]), int(x["N"])) for x in rows} == {(K, N) for K in ks for N in r.eval_n}
    metrics = json.loads((rep / "metrics.json").read_text())
    assert set(metrics["sample_size"]["tgmm"]) == {f"n0={n0}" for n0 in r.train_n0}
    assert set(metrics["shift"]) == {"tgmm", *baselines}
    assert metrics["fixed_n0"] == cfg.task.n0
    md = (rep / "report.md").read_text()
    assert "train N0 \\ test N" in md and "method \\ σ_p" in md and "tgmm (N0=8)" in md
    for name in ("l2_vs_N_by_n0", "l2_vs_sigma_p", "l2_vs_N_fixed_model"):
        png = rep / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == PNG
        h, w, _ = matplotlib.image.imread(png).shape
        assert h > 200 and w > 300
        assert f"figures/{name}.png" in md
