"""The bench commands run and compare what they say they compare (no timing is asserted)."""
from __future__ import annotations

import pytest
import torch

from pipeline import bench
from pipeline.bench import solvers
from tests.conftest import make_run


def test_compare_variants_times_each_variant_of_the_run(capsys):
    run = make_run("gmm")
    med = bench.compare_variants(run, ["task.n_per=task", "train.grad_clip=0.0,train.lr=0.002"], steps=2,
                                 device="cpu", warmup=1)
    assert list(med) == ["as configured", "task.n_per=task", "train.grad_clip=0.0,train.lr=0.002"]
    assert all(v > 0 for v in med.values())
    out = capsys.readouterr().out
    assert "task.n_per=task" in out and "x  (precision 32-true)" in out


def test_compare_rejects_a_bad_variant():
    from pipeline.core.config import ConfigError

    with pytest.raises(ConfigError, match="model.n_layers"):
        bench.compare_variants(make_run("gmm"), ["model.n_layers=2"], steps=1, device="cpu")


def test_em_bench_agrees_with_sklearn_from_the_same_starts():
    for start in ("kmeans++", "paper"):
        res = solvers.em_vs_sklearn(n_tasks=16, d=3, K=3, N=40, start=start)
        assert res["agree_share"] == 1.0 and res["max_gap"] < 1e-6


def test_least_squares_bench_agrees_with_numpy():
    assert solvers.lstsq_vs_numpy(n_tasks=8, d=3, n=7)["max_gap"] < 1e-6


def test_anchor_style_model_trains_on_the_projects_tasks():
    pytest.importorskip("transformers")
    from pipeline.bench.anchor import AnchorStyle

    run = make_run("gmm")
    t = run.task
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = AnchorStyle(t.d, list(t.ks), 2, 16, 2, t.n0, t.k_embd)
    from pipeline.core.module import TaskModule

    batches = TaskModule(run.to_dict()).training_tasks(0, 0, 1)
    out = m.forward_many(batches)
    for K, (logits, means, scales) in out.items():
        assert logits.shape == (run.train.batch_size, K) and means.shape == (run.train.batch_size, K, t.d)
        assert scales is None


def test_vs_anchor_reports_the_median_of_paired_step_ratios(monkeypatch, capsys):
    """`bench --vs-anchor` (shrunk from paper size for the test): both models step on the same tasks, and
    the speed-up is the median of the per-step ratios (anchor / project), not a ratio of medians."""
    pytest.importorskip("transformers")
    import statistics

    from pipeline.bench import anchor as A

    monkeypatch.setattr(A, "PAPER_SIZE", {"model": {"backbone": "transformer", "n_layer": 1, "n_head": 2, "n_embd": 16},
                                          "task": {"d": 2, "n0": 16, "ks": [2, 3]}, "train": {"batch_size": 4}})
    res = A.run(make_run("gmm"), steps=3, warmup=1, device="cpu", precision="32-true")
    assert len(res["ratios"]) == 3 and res["ratios"] == sorted(res["ratios"])
    assert res["speedup"] == statistics.median(res["ratios"]) and res["project_s"] > 0 and res["anchor_s"] > 0
    out = capsys.readouterr().out
    assert "1 layers x 2 heads x width 16" in out and "median of the 3 per-step ratios" in out
