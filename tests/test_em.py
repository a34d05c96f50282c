"""EM: agreement with sklearn (diag, spherical) and a plain numpy/scipy loop (identity), masking,
k-means++ seeding, and the two solvers on TGMM tasks."""
import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from pipeline.algorithms import EMPaper, EMStrong, em_fit, kmeans_plusplus
from pipeline.algorithms.em import kmeans_uniforms
from pipeline.core.family import Solver
from pipeline.core.rng import SOLVER, make_generator
from pipeline.families.gmm.data import mean_log_likelihood, sample_gmm


def _start(B, K, d, seed, scale=1.0):
    """A random start (weights on the simplex, means, stds) per task, float64."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(B, K, generator=g, dtype=torch.float64) + 0.5
    w = w / w.sum(1, keepdim=True)
    mu = 3 * torch.randn(B, K, d, generator=g, dtype=torch.float64)
    s = scale * (0.5 + torch.rand(B, K, d, generator=g, dtype=torch.float64))
    return w, mu, s


def _matched_mean_error(est_means, true_means):
    """Per task: mean over components of (1/d)||mu_hat - mu||^2 after Hungarian matching."""
    errs = []
    for mh, m in zip(est_means.double().numpy(), true_means.double().numpy()):
        cost = ((mh[:, None] - m[None]) ** 2).mean(-1)
        r, c = linear_sum_assignment(cost)
        errs.append(cost[r, c].mean())
    return np.array(errs)


@pytest.mark.parametrize("covariance", ["diag", "spherical"])
def test_em_fit_matches_sklearn(covariance):
    B, K, d, n_iter, reg = 4, 3, 3, 15, 1e-6
    batch = sample_gmm(B, d, K, 60, 100, make_generator(11), anisotropic=True)
    x = batch.x.double()
    w0, mu0, s0 = _start(B, K, d, seed=3)
    if covariance == "spherical":
        s0 = s0[:, :, :1].expand(B, K, d)  # one std per component
    res = em_fit(x, batch.mask, w0, mu0, s0, covariance=covariance, max_iter=n_iter, tol=0.0, reg_covar=reg)
    assert torch.all(res.n_iter == n_iter)
    for b in range(B):
        X = x[b][batch.mask[b]].numpy()
        prec = 1.0 / s0[b].numpy() ** 2
        gm = GaussianMixture(K, covariance_type=covariance, weights_init=w0[b].numpy(), means_init=mu0[b].numpy(),
                             precisions_init=prec[:, 0] if covariance == "spherical" else prec,
                             max_iter=n_iter, tol=0.0, reg_covar=reg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            gm.fit(X)
        assert gm.n_iter_ == n_iter
        assert abs(gm.score(X) - res.log_likelihood[b].item()) < 1e-4
        np.testing.assert_allclose(res.means[b].numpy(), gm.means_, atol=1e-6)
        np.testing.assert_allclose(res.weights[b].numpy(), gm.weights_, atol=1e-8)
        var = res.scales[b].numpy() ** 2
        np.testing.assert_allclose(var[:, 0] if covariance == "spherical" else var, gm.covariances_, rtol=1e-6)


def _numpy_em_identity(X, w, mu, n_iter):
    """Textbook EM with unit covariance for one task, via scipy densities."""
    K = len(w)
    for _ in range(n_iter):
        logp = np.stack([np.log(w[k]) + multivariate_normal(mu[k], np.eye(X.shape[1])).logpdf(X) for k in range(K)], 1)
        resp = np.exp(logp - logsumexp(logp, axis=1, keepdims=True))
        nk = resp.sum(0)
        w, mu = nk / len(X), resp.T @ X / nk[:, None]
    logp = np.stack([np.log(w[k]) + multivariate_normal(mu[k], np.eye(X.shape[1])).logpdf(X) for k in range(K)], 1)
    return w, mu, logsumexp(logp, axis=1).mean()


def test_em_fit_identity_matches_numpy_reference():
    B, K, d, n_iter = 3, 4, 2, 12
    batch = sample_gmm(B, d, K, 40, 90, make_generator(5))
    w0, mu0, _ = _start(B, K, d, seed=7)
    res = em_fit(batch.x.double(), batch.mask, w0, mu0, covariance="identity", max_iter=n_iter, tol=0.0)
    assert res.scales is None
    for b in range(B):
        X = batch.x[b][batch.mask[b]].double().numpy()
        w, mu, ll = _numpy_em_identity(X, w0[b].numpy(), mu0[b].numpy(), n_iter)
        np.testing.assert_allclose(res.weights[b].numpy(), w, atol=1e-10)
        np.testing.assert_allclose(res.means[b].numpy(), mu, atol=1e-9)
        assert abs(res.log_likelihood[b].item() - ll) < 1e-10


def test_em_fit_iterates_and_per_task_convergence():
    batch = sample_gmm(8, 2, 3, 50, 80, make_generator(9))
    w0, mu0, _ = _start(8, 3, 2, seed=1)
    res = em_fit(batch.x.double(), batch.mask, w0, mu0, max_iter=100, tol=1e-7, return_iterates=True)
    assert len(res.iterates) == int(res.n_iter.max())
    assert torch.all(res.n_iter >= 1) and torch.all(res.n_iter <= 100)
    # a task's iterates stop changing once it has converged; its last iterate is the answer
    for b in range(8):
        t = int(res.n_iter[b])
        for w, m in res.iterates[t - 1:]:
            assert torch.equal(w[b], res.weights[b]) and torch.equal(m[b], res.means[b])
    # running exactly n_iter[b] iterations without early stopping gives the same answer
    fixed = em_fit(batch.x.double(), batch.mask, w0, mu0, max_iter=int(res.n_iter[0]), tol=0.0)
    torch.testing.assert_close(fixed.means[0], res.means[0], rtol=0, atol=1e-12)
    # EM never decreases the likelihood (identity covariance)
    lls = [mean_log_likelihood(batch.x.double(), batch.mask, w, m) for w, m in res.iterates]
    assert all(torch.all(b >= a - 1e-10) for a, b in zip(lls, lls[1:]))


@pytest.mark.parametrize("covariance", ["identity", "spherical", "diag"])
def test_padding_is_ignored(covariance):
    K, d, n = 3, 2, 50
    batch = sample_gmm(1, d, K, n, n, make_generator(3))
    x, mask = batch.x.double(), batch.mask
    pad = 30
    g = torch.Generator().manual_seed(0)
    garbage = 1e3 * torch.randn(1, pad, d, generator=g, dtype=torch.float64)
    garbage[0, 0, 0] = float("nan")
    garbage[0, 1, 1] = float("inf")
    xp = torch.cat([x[:, :25], garbage, x[:, 25:]], 1)  # padding in the middle, not only at the end
    mp = torch.cat([mask[:, :25], torch.zeros(1, pad, dtype=torch.bool), mask[:, 25:]], 1)
    w0, mu0, s0 = _start(1, K, d, seed=2)
    a = em_fit(x, mask, w0, mu0, s0, covariance=covariance, max_iter=30, tol=0.0)
    b = em_fit(xp, mp, w0, mu0, s0, covariance=covariance, max_iter=30, tol=0.0)
    torch.testing.assert_close(a.means, b.means, rtol=0, atol=1e-10)
    torch.testing.assert_close(a.weights, b.weights, rtol=0, atol=1e-12)
    torch.testing.assert_close(a.log_likelihood, b.log_likelihood, rtol=0, atol=1e-10)
    if covariance != "identity":
        torch.testing.assert_close(a.scales, b.scales, rtol=0, atol=1e-10)


def test_empty_component_gives_no_nan():
    batch = sample_gmm(2, 2, 2, 40, 40, make_generator(4))
    w0 = torch.full((2, 3), 1 / 3, dtype=torch.float64)
    mu0 = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1e4, 1e4]], dtype=torch.float64).expand(2, 3, 2)
    for cov in ("identity", "spherical", "diag"):
        res = em_fit(batch.x.double(), batch.mask, w0, mu0, covariance=cov, max_iter=20)
        assert torch.isfinite(res.means).all() and torch.isfinite(res.weights).all()
        assert torch.isfinite(res.log_likelihood).all()
        assert torch.allclose(res.weights.sum(1), torch.ones(2, dtype=torch.float64))
        assert res.weights[:, 2].max() < 1e-10  # the far component is empty and keeps its mean
        assert torch.equal(res.means[:, 2], mu0[:, 2])


@pytest.mark.parametrize("n_local_trials", [1, None])
def test_kmeans_plusplus_never_picks_padding(n_local_trials):
    B, N, K, d = 64, 20, 5, 2
    batch = sample_gmm(B, d, 2, 5, N, make_generator(6))
    g = make_generator(0)
    x = batch.x.clone()
    x[~batch.mask] = 1e3  # far away: D^2 sampling would love these if they counted
    for _ in range(5):
        centers, idx = kmeans_plusplus(x, batch.mask, K, g, n_local_trials=n_local_trials)
        assert centers.shape == (B, K, d) and idx.shape == (B, K)
        assert batch.mask.gather(1, idx).all()
        torch.testing.assert_close(centers, torch.gather(x, 1, idx[..., None].expand(-1, -1, d)))
        # with at least K real points every center is a distinct point (D^2 = 0 at chosen ones)
        many = batch.n >= K
        assert all(len(set(row.tolist())) == K for row in idx[many])


def test_greedy_kmeans_plusplus_covers_clusters_in_high_dimension():
    """In d = 128 the noise part of D^2 (~2d) rivals the gaps between means: plain D^2 sampling
    often seeds two centers in one cluster, the greedy variant (sklearn's default) rarely does."""
    batch = sample_gmm(128, 128, 5, 64, 128, make_generator(3))

    def coverage(n_local_trials):
        _, idx = kmeans_plusplus(batch.x, batch.mask, 5, make_generator(0), n_local_trials=n_local_trials)
        labels = batch.labels.gather(1, idx)  # ground truth used by the test only
        return np.mean([len(set(row.tolist())) == 5 for row in labels])

    plain, greedy = coverage(1), coverage(None)
    assert greedy >= 0.8 and greedy > plain


def test_solvers_are_solvers_and_reproducible():
    batch = sample_gmm(16, 3, 3, 32, 64, make_generator(8))
    for solver in (EMPaper(seed=1, max_iter=30), EMStrong(seed=1, max_iter=30),
                   EMStrong(seed=1, max_iter=30, covariance="diag")):
        assert isinstance(solver, Solver)
        a, b = solver(batch), solver(batch)
        assert a.weights.dtype == torch.float32 and a.means.shape == (16, 3, 3)
        assert torch.equal(a.means, b.means) and torch.equal(a.weights, b.weights)
        assert a.extras["iterations"].shape == (16,)
        torch.testing.assert_close(a.weights.sum(1), torch.ones(16))
    assert EMPaper().name == "em_paper" and EMStrong().name == "em_strong"
    # the seed is the solver's: other seeds give other starts
    assert EMPaper(seed=0, max_iter=1)(batch).means.ne(EMPaper(seed=1, max_iter=1)(batch).means).any()
    ll0 = EMStrong(seed=0, max_iter=1)(batch).extras["restart_log_likelihood"]
    assert ll0.ne(EMStrong(seed=1, max_iter=1)(batch).extras["restart_log_likelihood"]).any()


def test_solvers_run_in_float32():
    batch = sample_gmm(16, 4, 3, 32, 64, make_generator(12))
    for solver in (EMPaper(dtype=torch.float32, max_iter=40), EMStrong(dtype=torch.float32, max_iter=40,
                                                                     covariance="spherical")):
        est = solver(batch)
        assert torch.isfinite(est.means).all() and torch.isfinite(est.weights).all()


def test_strong_em_recovers_separated_means():
    # d = 8, means in U(-10, 10)^8: components far apart relative to unit noise
    batch = sample_gmm(64, 8, 3, 100, 128, make_generator(21), mean_range=10.0)
    est = EMStrong()(batch)
    err = _matched_mean_error(est.means, batch.means)
    assert np.median(err) < 0.05 and err.mean() < 0.1
    assert est.scales is None


def test_strong_em_at_least_as_good_as_paper_em():
    batch = sample_gmm(48, 2, 5, 64, 128, make_generator(22))
    x, m = batch.x.double(), batch.mask
    paper, strong = EMPaper()(batch), EMStrong()(batch)
    ll_p = mean_log_likelihood(x, m, paper.weights.double(), paper.means.double())
    ll_s = mean_log_likelihood(x, m, strong.weights.double(), strong.means.double())
    assert ll_s.mean() >= ll_p.mean()
    assert _matched_mean_error(strong.means, batch.means).mean() <= _matched_mean_error(paper.means, batch.means).mean()
    # the chosen restart is the best one of those run
    torch.testing.assert_close(strong.extras["log_likelihood"], strong.extras["restart_log_likelihood"].max(1).values)


def test_strong_em_best_restart_matches_a_single_run():
    """Restart r of the batched solver equals em_fit run alone from the same k-means++ centers: task b's
    restart r seeds k-means++ with row r of the uniforms drawn from make_generator(seed, SOLVER, b)."""
    K, R, B, seed = 3, 3, 6, 4
    batch = sample_gmm(B, 2, K, 40, 60, make_generator(30))
    est = EMStrong(restarts=R, seed=seed)(batch)
    best = est.extras["best_restart"]
    assert best.shape == (B,) and est.extras["restart_log_likelihood"].shape == (B, R)
    for b in range(B):
        u = torch.rand(R, kmeans_uniforms(K), generator=make_generator(seed, SOLVER, b))
        x, mask = batch.x[b:b + 1].double(), batch.mask[b:b + 1]
        runs = []
        for r in range(R):
            centers, _ = kmeans_plusplus(x, mask, K, uniforms=u[r:r + 1])
            runs.append(em_fit(x, mask, torch.full((1, K), 1 / K, dtype=torch.float64), centers))
        lls = torch.stack([one.log_likelihood[0] for one in runs])
        torch.testing.assert_close(est.extras["restart_log_likelihood"][b], lls.float())
        assert int(best[b]) == int(lls.argmax())
        torch.testing.assert_close(est.means[b], runs[int(best[b])].means[0].float())
        torch.testing.assert_close(est.weights[b], runs[int(best[b])].weights[0].float())


def test_degenerate_tasks_stay_finite():
    """Tasks with fewer real points than components, or none at all, give finite answers."""
    batch = sample_gmm(8, 3, 5, 1, 6, make_generator(1))
    batch.mask[0] = False
    batch.x[0] = 0.0
    for solver in (EMPaper(), EMStrong(), EMStrong(covariance="spherical"), EMStrong(covariance="diag")):
        est = solver(batch)
        assert torch.isfinite(est.means).all() and torch.isfinite(est.weights).all()
        assert est.scales is None or torch.isfinite(est.scales).all()


def test_em_paper_diag_matches_sklearn_from_the_same_start():
    """The anisotropic paper-protocol EM (uniform weights, means ~ N(0, I) from its seed, unit scales,
    diagonal covariances) is sklearn's GaussianMixture(covariance_type='diag') from that start."""
    B, K, d, n_iter = 3, 3, 2, 12
    batch = sample_gmm(B, d, K, 80, 80, make_generator(21), anisotropic=True)
    solver = EMPaper(max_iter=n_iter, tol=0.0, seed=4, covariance="diag")
    est = solver(batch)
    assert est.scales is not None and est.scales.shape == (B, K, d)
    # EMPaper's start: task b's means ~ N(0, I) in float32 from make_generator(seed, SOLVER, b)
    means0 = torch.stack([torch.randn(K, d, generator=make_generator(4, SOLVER, b)) for b in range(B)]).double()
    for b in range(B):
        X = batch.x[b].double().numpy()
        gm = GaussianMixture(K, covariance_type="diag", weights_init=np.full(K, 1 / K), means_init=means0[b].numpy(),
                             precisions_init=np.ones((K, d)), max_iter=n_iter, tol=0.0, reg_covar=1e-6)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            gm.fit(X)
        np.testing.assert_allclose(est.means[b].numpy(), gm.means_, atol=1e-4)
        np.testing.assert_allclose(est.weights[b].numpy(), gm.weights_, atol=1e-5)
        np.testing.assert_allclose(est.scales[b].double().numpy() ** 2, gm.covariances_, rtol=1e-4)
        assert abs(gm.score(X) - float(est.extras["log_likelihood"][b])) < 1e-4


def test_family_probe_target_gives_the_iterates_after_each_step():
    from pipeline.families.gmm import FAMILY

    batch = sample_gmm(4, 2, 3, 30, 30, make_generator(40))
    its = FAMILY.probe_targets["em_paper"].fn(batch, [1, 3, 5], {"seed": 2})
    assert len(its) == 3
    for s, est in zip([1, 3, 5], its):
        ref = EMPaper(max_iter=s, tol=0.0, seed=2)(batch)
        torch.testing.assert_close(est.means, ref.means, rtol=0, atol=1e-6)
        torch.testing.assert_close(est.weights, ref.weights, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="steps"):
        FAMILY.probe_targets["em_paper"].fn(batch, [0, 2], {})
