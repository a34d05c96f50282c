"""Metrics (l2 matching, clustering accuracy, log-likelihood, summaries), solver evaluation and
evaluation-set storage."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from pipeline.studies.evaluate import (evaluate_grid, evaluate_solver, load_eval_set, save_eval_set,
                                       write_results)
from pipeline.studies.metrics import clustering_accuracy, l2_error, log_likelihood, summarize
from pipeline.tasks.gmm import GMMBatch, GMMEstimate, make_generator, mean_log_likelihood, sample_gmm


def _random_params(B: int, K: int, d: int, seed: int):
    rng = np.random.default_rng(seed)
    tw = rng.dirichlet(np.ones(K), size=B)
    tm = rng.uniform(-5, 5, size=(B, K, d))
    ew = rng.dirichlet(np.ones(K), size=B)
    em = tm + rng.normal(0, 2.0, size=(B, K, d))  # noisy, so the best matching is not obvious
    return ew, em, tw, tm


def _brute_force_l2(ew, em, tw, tm) -> np.ndarray:
    """min over every sigma of (1/K) sum_k [(1/d)||em[sigma(k)] - tm[k]||^2 + (ew[sigma(k)] - tw[k])^2]."""
    K, d = tm.shape[1], tm.shape[2]
    P = np.array(list(itertools.permutations(range(K))))  # (P, K)
    mean_err = ((em[:, P] - tm[:, None]) ** 2).sum(-1) / d  # (B, P, K)
    weight_err = (ew[:, P] - tw[:, None]) ** 2  # (B, P, K)
    return (mean_err + weight_err).mean(-1).min(-1)


def _matched_l2(ew, em, tw, tm, perms) -> np.ndarray:
    """The error of a given matching: estimate perms[b, k] paired with truth k."""
    idx = np.arange(len(tw))[:, None]
    d = tm.shape[2]
    return (((em[idx, perms] - tm) ** 2).sum(-1) / d + (ew[idx, perms] - tw) ** 2).mean(-1)


# ----------------------------------------------------------------------------- l2 error

@pytest.mark.parametrize("K", [3, 4, 5])
def test_l2_invariant_under_every_permutation_and_equals_brute_force(K):
    ew, em, tw, tm = _random_params(B=6, K=K, d=3, seed=K)
    base, _ = l2_error(ew, em, tw, tm)
    assert np.allclose(base, _brute_force_l2(ew, em, tw, tm), rtol=1e-12, atol=0)
    for p in itertools.permutations(range(K)):
        p = list(p)
        err, perms = l2_error(ew[:, p], em[:, p], tw, tm)
        assert np.allclose(err, base, rtol=1e-12, atol=0), p
        # the returned matching, applied as documented, reproduces the error and is a permutation
        assert np.allclose(_matched_l2(ew[:, p], em[:, p], tw, tm, perms), err, rtol=1e-12)
        assert (np.sort(perms, 1) == np.arange(K)).all()


@pytest.mark.parametrize("K", [3, 4, 5])
def test_l2_exact_estimate_in_every_order_has_zero_error_and_inverse_matching(K):
    _, _, tw, tm = _random_params(B=3, K=K, d=2, seed=10 + K)
    for p in itertools.permutations(range(K)):
        p = np.array(p)
        err, perms = l2_error(tw[:, p], tm[:, p], tw, tm)  # estimate j is true component p[j]
        assert np.allclose(err, 0.0, atol=1e-24)
        assert (perms == np.argsort(p)).all(), p  # truth k is matched to the j with p[j] == k


def test_l2_three_cycle_explicit_and_hand_computed():
    # truth: means 0, 10, 20 (d = 1), weights .2 .3 .5; estimate is the truth rotated by a 3-cycle
    # (est 0 <-> truth 2, est 1 <-> truth 0, est 2 <-> truth 1) with some error added
    tw = np.array([[0.2, 0.3, 0.5]])
    tm = np.array([[[0.0], [10.0], [20.0]]])
    ew = np.array([[0.4, 0.2, 0.4]])
    em = np.array([[[21.0], [0.0], [10.0]]])
    err, perms = l2_error(ew, em, tw, tm)
    # truth0-est1: 0 + 0; truth1-est2: 0 + 0.1^2; truth2-est0: 1^2 + 0.1^2  -> (0.01 + 1.01) / 3
    assert err[0] == pytest.approx(1.02 / 3, rel=1e-12)
    assert perms.tolist() == [[1, 2, 0]]
    # the anchor's fault: using the inverse (3-cycle -> other 3-cycle) pairs the wrong components
    wrong = np.argsort(perms[0])
    assert wrong.tolist() != perms[0].tolist()
    assert _matched_l2(ew, em, tw, tm, wrong[None])[0] > 100 * err[0]
    # exact 3-cycle: zero error, perms is the matching (not its inverse)
    err0, perms0 = l2_error(tw[:, [2, 0, 1]], tm[:, [2, 0, 1]], tw, tm)
    assert err0[0] == 0.0 and perms0.tolist() == [[1, 2, 0]]


def test_l2_hand_computed_two_components_and_torch_input():
    tw, tm = torch.tensor([[0.3, 0.7]]), torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])
    ew, em = torch.tensor([[0.6, 0.4]]), torch.tensor([[[2.0, 1.0], [0.0, 0.0]]])
    err, perms = l2_error(ew, em, tw, tm)
    # truth0-est1: 0 + 0.1^2, truth1-est0: 1/2 + 0.1^2 -> 0.52 / 2
    assert err[0] == pytest.approx(0.26, rel=1e-6)
    assert perms.tolist() == [[1, 0]]


def test_l2_not_finite_estimate_gives_nan():
    ew, em, tw, tm = _random_params(B=3, K=3, d=2, seed=0)
    em[1, 0, 0] = np.nan
    err, perms = l2_error(ew, em, tw, tm)
    assert np.isnan(err[1]) and np.isfinite(err[[0, 2]]).all()
    assert (perms[1] == -1).all()


# ----------------------------------------------------------------------------- clustering accuracy

@pytest.fixture(scope="module")
def separated() -> GMMBatch:
    return sample_gmm(8, d=4, K=3, n_min=40, n_max=80, generator=make_generator(0), mean_range=50.0)


def test_accuracy_perfect_estimate_is_one(separated):
    b = separated
    acc = clustering_accuracy(b.x, b.mask, b.labels, b.weights, b.means)
    assert acc.shape == (b.B,)
    assert acc.min() >= 0.99


def test_accuracy_invariant_to_label_permutation(separated):
    b = separated
    noisy = b.means + 3.0 * torch.randn(b.means.shape, generator=make_generator(1))
    base = clustering_accuracy(b.x, b.mask, b.labels, b.weights, noisy)
    for p in itertools.permutations(range(b.K)):
        p = list(p)
        assert np.array_equal(clustering_accuracy(b.x, b.mask, b.labels, b.weights[:, p], noisy[:, p]), base)


def test_accuracy_ignores_padding_and_counts_real_points():
    # one task, d = 1: three real points, two padded ones that would be misclassified if counted
    x = torch.tensor([[[-10.0], [-9.0], [10.0], [10.0], [-10.0]]])
    mask = torch.tensor([[True, True, True, False, False]])
    labels = torch.tensor([[1, 1, 0, -1, -1]])  # true labels are swapped w.r.t. the estimate's order
    w, m = torch.tensor([[0.5, 0.5]]), torch.tensor([[[-10.0], [10.0]]])
    assert clustering_accuracy(x, mask, labels, w, m)[0] == 1.0
    x2 = x.clone()
    x2[0, 3:] = torch.tensor([[1e3], [-1e3]])
    assert clustering_accuracy(x2, mask, labels, w, m)[0] == 1.0
    labels_bad = labels.clone()
    labels_bad[0, 1] = 0  # one real point now disagrees -> 2 of 3 right
    assert clustering_accuracy(x, mask, labels_bad, w, m)[0] == pytest.approx(2 / 3)


def test_log_likelihood_matches_scipy_on_one_task():
    b = sample_gmm(2, d=3, K=2, n_min=5, n_max=10, generator=make_generator(3), anisotropic=True)
    ll = log_likelihood(b.x, b.mask, b.weights, b.means, b.scales)
    t = 0
    pts = b.x[t][b.mask[t]].double().numpy()
    dens = sum(float(b.weights[t, k]) * stats.multivariate_normal(b.means[t, k].double().numpy(),
                                                                   np.diag(b.scales[t, k].double().numpy() ** 2)).pdf(pts)
               for k in range(b.K))
    assert ll[t] == pytest.approx(np.log(dens).mean(), rel=1e-10)
    ref = mean_log_likelihood(b.x.double(), b.mask, b.weights.double(), b.means.double(), b.scales.double())
    assert np.allclose(ll, ref.numpy())


# ----------------------------------------------------------------------------- summarize

def test_summarize_known_values_and_nan():
    v = np.array([1.0, 2.0, 3.0, 4.0, np.nan])
    s = summarize(v)
    x = v[:4]
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert s["n"] == 4 and s["mean"] == pytest.approx(2.5) and s["std"] == pytest.approx(np.std(x, ddof=1))
    assert s["ci95"] == pytest.approx((hi - lo) / 2, rel=1e-12)
    empty = summarize(np.full(3, np.nan))
    assert empty["n"] == 0 and all(math.isnan(empty[k]) for k in ("mean", "std", "ci95"))
    one = summarize(torch.tensor([2.0]))
    assert one["n"] == 1 and one["mean"] == 2.0 and math.isnan(one["ci95"])
    assert isinstance(s["mean"], float) and isinstance(s["n"], int)


# ----------------------------------------------------------------------------- eval-set storage

@pytest.mark.parametrize("anisotropic", [False, True])
def test_eval_set_round_trip_exact(tmp_path, anisotropic):
    b = sample_gmm(5, d=3, K=4, n_min=6, n_max=12, generator=make_generator(7), anisotropic=anisotropic)
    meta = {"d": 3, "K": 4, "seed": 7, "n_range": [6, 12], "anisotropic": anisotropic}
    path = save_eval_set(tmp_path / "sets" / "d3_K4.npz", b, meta)
    assert path.name == "d3_K4.npz" and path.exists() and not list(path.parent.glob("*.tmp"))
    b2, meta2 = load_eval_set(path)
    assert meta2 == meta
    for name, a in b.to_numpy().items():
        a2 = b2.to_numpy()[name]
        assert a2.dtype == a.dtype and np.array_equal(a2, a), name
    assert (b2.scales is None) == (not anisotropic)


def test_eval_set_refuses_pickle_and_reports_bad_files(tmp_path):
    b = sample_gmm(2, d=2, K=2, n_min=3, n_max=4, generator=make_generator(0))
    arrays = b.to_numpy()
    arrays["x"] = np.array([object()] * 2, dtype=object)  # needs pickle to load
    evil = tmp_path / "evil.npz"
    np.savez(evil, meta=np.frombuffer(b"{}", dtype=np.uint8), **arrays)
    with pytest.raises(ValueError, match="evil.npz"):
        load_eval_set(evil)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="junk.npz"):
        load_eval_set(junk)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_eval_set(tmp_path / "missing.npz")
    no_meta = tmp_path / "no_meta.npz"
    np.savez(no_meta, **b.to_numpy())
    with pytest.raises(ValueError, match="no_meta.npz.*meta"):
        load_eval_set(no_meta)


# ----------------------------------------------------------------------------- evaluate_solver

class Oracle:
    """Answers with the true parameters."""
    name = "oracle"

    def __init__(self):
        self.calls = 0

    def __call__(self, batch: GMMBatch) -> GMMEstimate:
        self.calls += 1
        return GMMEstimate(weights=batch.weights.clone(), means=batch.means.clone(), scales=batch.scales)


class NeverApplicable:
    name = "spectral"

    def __call__(self, batch: GMMBatch) -> GMMEstimate:
        return GMMEstimate.not_applicable(batch.B, batch.K, batch.d, reason="K > d")


def test_evaluate_solver_oracle_and_chunks():
    b = sample_gmm(20, d=8, K=3, n_min=32, n_max=64, generator=make_generator(5))
    oracle = Oracle()
    cell, per_task = evaluate_solver(oracle, b, return_per_task=True)
    assert cell["method"] == "oracle" and cell["applicable"] and cell["reason"] == "" and cell["n_tasks"] == 20
    assert cell["seconds"] >= 0
    assert cell["l2"]["mean"] == 0.0 and cell["l2"]["n"] == 20
    assert cell["accuracy"]["mean"] > 0.9
    assert per_task["l2"].shape == (20,) and (per_task["perms"] == np.arange(3)).all()
    ref = mean_log_likelihood(b.x.double(), b.mask, b.weights.double(), b.means.double())
    assert np.allclose(per_task["loglik"], ref.numpy())
    chunked = Oracle()
    cell2 = evaluate_solver(chunked, b, chunk_size=7)
    assert chunked.calls == 3
    for m in ("l2", "accuracy", "loglik"):
        assert cell2[m] == pytest.approx(cell[m], nan_ok=True)


def test_evaluate_solver_not_applicable():
    b = sample_gmm(4, d=2, K=3, n_min=8, n_max=8, generator=make_generator(6))
    cell = evaluate_solver(NeverApplicable(), b, chunk_size=3)
    assert cell["applicable"] is False and cell["reason"] == "K > d"
    for m in ("l2", "accuracy", "loglik"):
        assert cell[m]["n"] == 0 and math.isnan(cell[m]["mean"]) and math.isnan(cell[m]["ci95"])


def test_evaluate_grid_json_ready(tmp_path):
    sets = {(d, K): sample_gmm(4, d=d, K=K, n_min=8, n_max=16, generator=make_generator(d, K))
            for d in (2, 3) for K in (2, 3)}
    results = evaluate_grid(lambda d: [Oracle(), NeverApplicable()], sets, per_task_dir=tmp_path / "per_task",
                            progress=False)
    cells = results["cells"]
    assert [(c["d"], c["K"], c["method"]) for c in cells][:3] == [(2, 2, "oracle"), (2, 2, "spectral"),
                                                                  (2, 3, "oracle")]
    assert len(cells) == 8
    na = [c for c in cells if c["method"] == "spectral"]
    assert all(c["l2"]["mean"] is None and c["l2"]["n"] == 0 for c in na)
    path = write_results(tmp_path / "results.json", results)
    assert json.loads(path.read_text()) == results  # strict JSON: NaN written as null
    assert len(list((tmp_path / "per_task").glob("*.npz"))) == 8
