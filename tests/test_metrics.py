"""Metrics (l2 matching, clustering accuracy, log-likelihood, summaries), solver scoring through the
generic evaluator (core/evaluate.score, rows_for) and evaluation-set storage (core/arrays + GMMBatch)."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from types import SimpleNamespace

from pipeline.core.arrays import DataError, MissingDataError, load_arrays, save_arrays
from pipeline.core.evaluate import rows_for, score
from pipeline.core.results import ROW_KEYS, load_results, summarize, write_results
from pipeline.families.gmm import FAMILY
from pipeline.families.gmm.data import GMMBatch, GMMEstimate, make_generator, mean_log_likelihood, sample_gmm
from pipeline.families.gmm.metrics import clustering_accuracy, l2_error, log_likelihood


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
    path = save_arrays(tmp_path / "sets" / "d3_K4.npz", b.to_numpy(), meta)
    assert path.name == "d3_K4.npz" and path.exists() and not list(path.parent.glob("*.tmp"))
    arrays, meta2 = load_arrays(path, GMMBatch.REQUIRED, what="evaluation set")
    assert meta2 == meta
    b2 = GMMBatch.from_numpy(arrays, where=str(path))
    for name, a in b.to_numpy().items():
        a2 = b2.to_numpy()[name]
        assert a2.dtype == a.dtype and np.array_equal(a2, a), name
    assert (b2.scales is None) == (not anisotropic)
    assert "index" not in arrays and torch.equal(b2.task_index(), torch.arange(5))  # the row order is the index


def test_from_numpy_rejects_inconsistent_arrays():
    arrays = sample_gmm(3, d=2, K=2, n_min=4, n_max=6, generator=make_generator(1)).to_numpy()
    bad = {"mask": arrays["mask"][:, :-1], "weights": arrays["weights"][:, :1], "means": arrays["means"][0],
           "labels": arrays["labels"][:2], "x": arrays["x"][..., :1]}
    for key, value in bad.items():
        with pytest.raises(ValueError, match="set.npz"):
            GMMBatch.from_numpy({**arrays, key: value}, where="set.npz")
    with pytest.raises(ValueError, match="set.npz"):
        GMMBatch.from_numpy({**arrays, "mask": arrays["mask"].astype(np.int64)}, where="set.npz")
    with pytest.raises(ValueError, match="set.npz"):
        GMMBatch.from_numpy({**arrays, "scales": np.ones((3, 2, 3))}, where="set.npz")


def test_eval_set_refuses_pickle_and_reports_bad_files(tmp_path):
    b = sample_gmm(2, d=2, K=2, n_min=3, n_max=4, generator=make_generator(0))
    arrays = b.to_numpy()
    arrays["x"] = np.array([object()] * 2, dtype=object)  # needs pickle to load
    evil = tmp_path / "evil.npz"
    np.savez(evil, meta=np.frombuffer(b"{}", dtype=np.uint8), **arrays)
    with pytest.raises(DataError, match="evil.npz"):
        load_arrays(evil, GMMBatch.REQUIRED)
    with pytest.raises(TypeError, match="pickle"):  # and it cannot be written in the first place
        save_arrays(tmp_path / "evil2.npz", arrays, {})
    assert not (tmp_path / "evil2.npz").exists()
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file at all")
    with pytest.raises(DataError, match="junk.npz"):
        load_arrays(junk)
    with pytest.raises(MissingDataError, match="missing.npz"):
        load_arrays(tmp_path / "missing.npz")
    no_meta = tmp_path / "no_meta.npz"
    np.savez(no_meta, **b.to_numpy())
    with pytest.raises(DataError, match="no_meta.npz.*meta"):
        load_arrays(no_meta)
    partial = save_arrays(tmp_path / "partial.npz", {k: v for k, v in b.to_numpy().items() if k != "labels"}, {})
    with pytest.raises(DataError, match="partial.npz.*labels"):
        load_arrays(partial, GMMBatch.REQUIRED)


# ----------------------------------------------------------------------------- scoring solvers

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


def test_family_metrics_are_the_metric_functions():
    b = sample_gmm(6, d=3, K=3, n_min=10, n_max=20, generator=make_generator(2), anisotropic=True)
    g = make_generator(3)
    est = GMMEstimate(weights=torch.softmax(torch.randn(6, 3, generator=g), -1),
                      means=b.means + torch.randn(b.means.shape, generator=g), scales=b.scales)
    assert set(FAMILY.metrics) == {"l2", "accuracy", "loglik"}
    np.testing.assert_array_equal(np.asarray(FAMILY.metrics["l2"].fn(b, est)),
                                  l2_error(est.weights, est.means, b.weights, b.means)[0])
    np.testing.assert_array_equal(np.asarray(FAMILY.metrics["accuracy"].fn(b, est)),
                                  clustering_accuracy(b.x, b.mask, b.labels, est.weights, est.means, est.scales))
    np.testing.assert_array_equal(np.asarray(FAMILY.metrics["loglik"].fn(b, est)),
                                  log_likelihood(b.x, b.mask, est.weights, est.means, est.scales))
    assert FAMILY.metrics["l2"].better == "lower" and FAMILY.metrics["accuracy"].better == "higher"


def test_score_oracle_and_chunks():
    b = sample_gmm(20, d=8, K=3, n_min=32, n_max=64, generator=make_generator(5))
    oracle = Oracle()
    values, seconds, applicable, reason = score(oracle, b, FAMILY.metrics, None)
    assert applicable and reason == "" and seconds >= 0 and oracle.calls == 1
    assert set(values) == set(FAMILY.metrics) and all(v.shape == (20,) for v in values.values())
    assert (values["l2"] == 0.0).all()
    assert values["accuracy"].mean() > 0.9
    ref = mean_log_likelihood(b.x.double(), b.mask, b.weights.double(), b.means.double())
    assert np.allclose(values["loglik"], ref.numpy())
    chunked = Oracle()
    values2, _, ok, _ = score(chunked, b, FAMILY.metrics, 7)
    assert ok and chunked.calls == 3  # 7 + 7 + 6 tasks
    for m in FAMILY.metrics:
        np.testing.assert_allclose(values2[m], values[m], rtol=1e-12, atol=0)
    s = summarize(values["l2"])
    assert s["mean"] == 0.0 and s["n"] == 20


def test_score_not_applicable_gives_nan_rows():
    b = sample_gmm(4, d=2, K=3, n_min=8, n_max=8, generator=make_generator(6))
    values, _, applicable, reason = score(NeverApplicable(), b, FAMILY.metrics, 3)
    assert applicable is False and reason == "K > d" and values == {}
    method = SimpleNamespace(name="spectral")
    rows = rows_for("main", {"d": 2, "K": 3}, method, None, FAMILY.metrics, values, 0.0, applicable, reason)
    assert [r["metric"] for r in rows] == list(FAMILY.metrics)
    for r in rows:
        assert r["applicable"] is False and r["reason"] == "K > d" and r["method"] == "spectral"
        assert r["n"] == 0 and math.isnan(r["mean"]) and math.isnan(r["ci95"])


def test_result_rows_are_strict_json(tmp_path):
    rows = []
    for d in (2, 3):
        for K in (2, 3):
            b = sample_gmm(4, d=d, K=K, n_min=8, n_max=16, generator=make_generator(d, K))
            for solver in (Oracle(), NeverApplicable()):
                values, sec, ok, why = score(solver, b, FAMILY.metrics, 3)
                rows += rows_for("main", {"d": d, "K": K}, solver, None, FAMILY.metrics, values, sec, ok, why)
    assert len(rows) == 2 * 2 * 2 * 3
    assert all(set(r) == set(ROW_KEYS) for r in rows)
    assert [(r["point"], r["method"]) for r in rows[:4]] == [({"d": 2, "K": 2}, "oracle")] * 3 + [
        ({"d": 2, "K": 2}, "spectral")]
    results = {"study": "test", "family": "gmm", "title": "t", "rows": rows, "meta": {}}
    path = write_results(tmp_path / "results.json", results)
    text = path.read_text()
    assert "NaN" not in text and not list(tmp_path.glob("*.tmp"))
    back = load_results(path)
    assert back["rows"][0]["mean"] == 0.0 and back["rows"][0]["n"] == 4
    na = [r for r in back["rows"] if r["method"] == "spectral"]
    assert len(na) == 12 and all(r["mean"] is None and r["n"] == 0 for r in na)  # NaN written as null
    assert json.loads(text) == back
