"""Backbone ablation + anisotropic study: matched parameter counts, reuse of the main network, the CLI chain."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.__main__ import main as cli
from pipeline.config import deep_merge, from_dict, load
from pipeline.models.tgmm import TGMMNet, count_parameters
from pipeline.studies import ablation as A

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
EXTRA = {
    "baselines": {"strong_restarts": 2, "em_max_iter": 20, "spectral_restarts": 2, "spectral_iters": 10},
    "ablation": {"d": 2, "variants": {"transformer": {}, "relu_attention": {"attention": "relu"},
                                      "mamba2": {"backbone": "mamba2", "headdim": 8, "d_state": 8},
                                      "lstm": {"backbone": "lstm"}}},
}


@pytest.fixture
def params(tiny_params) -> dict:
    p = deep_merge(tiny_params, EXTRA)
    p["ablation"]["variants"] = EXTRA["ablation"]["variants"]  # replace, not merge, the defaults
    return p


def test_meta_device_count_equals_a_real_network():
    cfg = load(REPO / "params.yaml")
    for name in cfg.ablation.variants:
        m = A.matched_model(cfg, name)
        real = sum(p.numel() for p in TGMMNet(2, cfg.task.ks, m).parameters())
        assert count_parameters(2, cfg.task.ks, m) == real


def test_default_variants_match_the_main_network_within_5_percent():
    cfg = load(REPO / "params.yaml")
    ref = A.n_params(cfg, cfg.model)
    info = A.describe_variants(cfg)
    assert set(info) == {"transformer", "relu_attention", "linear_attention", "mamba2", "lstm"}
    for name, v in info.items():
        assert abs(v["params"] / ref - 1) < 0.05, (name, v)
    assert info["transformer"]["reuses_main_model"] and not info["mamba2"]["reuses_main_model"]
    assert info["relu_attention"]["n_embd"] == cfg.model.n_embd  # same architecture size: width unchanged
    assert info["mamba2"]["n_embd"] != cfg.model.n_embd and info["lstm"]["n_embd"] != cfg.model.n_embd
    # the matched width is the best one: its neighbours are not closer
    for name in ("mamba2", "lstm"):
        m = A.matched_model(cfg, name)
        gap = abs(A.n_params(cfg, m) - ref)
        for w in (m.n_embd - 16, m.n_embd + 16):
            other = A.variant_model(cfg, name).__class__(**{**m.__dict__, "n_embd": w})
            assert abs(A.n_params(cfg, other) - ref) >= gap


def test_explicit_width_is_kept_and_matching_can_be_switched_off(params):
    params["ablation"]["variants"]["lstm"] = {"backbone": "lstm", "n_embd": 24}
    cfg = from_dict(params)
    assert A.matched_model(cfg, "lstm").n_embd == 24
    assert A.matched_model(cfg, "mamba2").n_embd != cfg.model.n_embd
    params["ablation"]["match_params"] = False
    assert A.matched_model(from_dict(params), "mamba2").n_embd == cfg.model.n_embd


def test_nothing_is_reused_when_ablation_d_is_not_a_study_dimension(params):
    params["ablation"]["d"] = 3
    cfg = from_dict(params)
    assert not A.reuses_main_model(cfg, "transformer")
    params["task"]["anisotropic"] = True
    params["ablation"]["d"] = 2
    assert A.reuses_main_model(from_dict(params), A.ANISO)


def test_variant_switching_backbone_drops_keys_of_the_other_backbone(params):
    params["model"].update(position="gpt2", attention="relu")
    cfg = from_dict(params)  # would fail if mamba2 inherited gpt2 / relu
    m = A.matched_model(cfg, "mamba2")
    assert (m.backbone, m.position, m.attention) == ("mamba2", "set", "softmax")
    assert A.matched_model(cfg, "relu_attention").position == "gpt2"


def test_cli_chain_trains_evaluates_and_reports(tmp_path, params, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data/gmm and data/ablation land here
    params["out_dir"] = "outputs"
    Path("params.yaml").write_text(yaml.safe_dump(params))
    out, data = Path("outputs"), Path("data")
    cfg = from_dict(params)
    assert cli(["generate"]) == 0 and cli(["train", "--no-track"]) == 0
    # evaluating before anything of the ablation exists: one line naming the file, exit 2, nothing written
    capsys.readouterr()
    assert cli(["ablation", "evaluate", "--no-track"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "iso_d2_K2.npz" in err and "ablation generate" in err
    assert cli(["ablation", "generate"]) == 0
    assert cli(["ablation", "evaluate", "--no-track"]) == 2
    assert "ablation train --variant" in capsys.readouterr().err
    assert not (out / "ablation" / "eval").exists()
    assert cli(["ablation", "train", "--variant", "nope"]) == 2
    assert "no variant 'nope'" in capsys.readouterr().err
    assert cli(["ablation", "train", "--no-track"]) == 0
    printed = capsys.readouterr().out
    assert "[ablation train transformer] reused the main model" in printed
    assert "[ablation train anisotropic] trained" in printed
    main = (out / "train" / "d2" / "model.safetensors").read_bytes()
    assert (out / "ablation" / "train" / "transformer" / "model.safetensors").read_bytes() == main
    assert (out / "ablation" / "train" / "mamba2" / "model.safetensors").read_bytes() != main
    assert cli(["ablation", "params"]) == 0
    assert "(the main network, reused)" in capsys.readouterr().out

    from pipeline.studies import tgmm

    main_sets = tgmm.load_eval_sets(cfg, data / "gmm")
    iso, aniso_sets = A.load_sets(cfg)
    for key, batch in iso.items():  # the ablation scores the main study's very tasks
        assert torch.equal(batch.x, main_sets[key].x) and torch.equal(batch.means, main_sets[key].means)
        assert aniso_sets[key].scales is not None and batch.scales is None
    res = A.evaluate(cfg, track=False)
    cells = {(c["method"], c["K"]): c for c in res[A.BACKBONES]["cells"]}
    for m in (*params["ablation"]["variants"], "em_paper", "em_strong", "spectral"):
        assert (m, 2) in cells and (m, 3) in cells
    assert not cells[("spectral", 3)]["applicable"]  # K > d
    assert cells[("mamba2", 2)]["applicable"] and cells[("mamba2", 2)]["l2"]["n"] == cfg.eval.n_tasks
    # the reused network scores exactly what the main study's network scores on the same set
    from pipeline.models.tgmm import NetworkSolver, load_network
    from pipeline.studies.evaluate import evaluate_solver

    batch = tgmm.load_eval_sets(cfg, data / "gmm")[(2, 3)]
    direct = evaluate_solver(NetworkSolver(load_network(out / "train" / "d2" / "model.safetensors")), batch)
    assert direct["l2"]["mean"] == pytest.approx(cells[("transformer", 3)]["l2"]["mean"], rel=1e-6)

    aniso = {(c["method"], c["K"]): c for c in res[A.ANISO]["cells"]}
    assert not aniso[("spectral", 2)]["applicable"] and "spherical" in aniso[("spectral", 2)]["reason"]
    assert aniso[("em_paper", 2)]["applicable"] and aniso[("tgmm", 2)]["applicable"]
    assert res["variants"]["transformer"]["params"] == res["reference_params"]

    paths = A.write_report(res, out / "ablation" / "report")
    md = (out / "ablation" / "report" / "report.md").read_text()
    assert f"| mamba2 | mamba2(causal) L1 D{res['variants']['mamba2']['n_embd']} |" in md
    assert f"{res['variants']['lstm']['params']:,}" in md and "n/a" in md
    for part in (A.BACKBONES, A.ANISO):
        png = out / "ablation" / "report" / "figures" / part / "l2_vs_K.png"
        assert png.read_bytes()[:8] == PNG
        rows = list(csv.DictReader(open(out / "ablation" / "report" / "plots" / part / "l2.csv")))
        assert {r["method"] for r in rows} >= ({"mamba2", "lstm", "em_paper"} if part == A.BACKBONES
                                               else {"tgmm", "em_paper"})
    metrics = json.loads((out / "ablation" / "report" / "metrics.json").read_text())
    assert metrics["params"]["lstm"] == res["variants"]["lstm"]["params"]
    assert "spectral d=2 K=2" in metrics[A.ANISO]["not_applicable"]
    assert all(p.is_file() for p in paths)


def test_anisotropic_network_predicts_scales(tmp_path, params):
    cfg = from_dict(params)
    path, reused = A.train_one(cfg, A.ANISO, track=False, progress_bar=False)
    from pipeline.models.tgmm import NetworkSolver, load_network
    from pipeline.tasks.gmm import make_generator, sample_gmm

    assert not reused
    b = sample_gmm(4, 2, 3, 16, 16, make_generator(0), anisotropic=True)
    est = NetworkSolver(load_network(path))(b)
    assert est.scales is not None and est.scales.shape == (4, 3, 2) and bool((est.scales > 0).all())
    assert torch.isfinite(est.means).all()
