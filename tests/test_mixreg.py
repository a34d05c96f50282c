"""The mixture-of-regressions family: EM (both M steps) against numpy plain loops from the same
start, the oracle against numpy lstsq, sign invariance, and EM's convergence at high SNR."""
from __future__ import annotations

import numpy as np
import torch

from pipeline.algorithms.mixture_regression import em_iterates, ols, oracle_ls
from pipeline.families.mixreg import FAMILY
from pipeline.families.mixreg.data import MixRegEstimate, sample_mixreg


def _em_loop(X, y, sigma, b0, iters, m_step="exact", gd_steps=5, lr=1.0):
    b, out = b0.copy(), []
    step = lr / np.linalg.eigvalsh(X.T @ X / len(y)).max()
    for _ in range(iters):
        w = np.tanh(y * (X @ b) / sigma ** 2)
        if m_step == "exact":
            b = np.linalg.lstsq(X, w * y, rcond=None)[0]
        else:
            for _ in range(gd_steps):
                b = b - step * X.T @ (X @ b - w * y) / len(y)
        out.append(b.copy())
    return out


def test_em_equals_a_numpy_loop_at_every_iteration_for_both_m_steps():
    b = sample_mixreg(5, 4, 30, torch.Generator().manual_seed(0), snr=2.0)
    X, y, s = b.xs.double(), b.ys.double(), b.sigma.double()
    b0 = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for m in ("exact", "gd"):
        its = em_iterates(X, y, s, b0, [1, 2, 5], m_step=m)
        for i in range(5):
            ref = _em_loop(X[i].numpy(), y[i].numpy(), float(s[i]), b0[i].numpy(), 5, m)
            for got, k in zip(its, [1, 2, 5]):
                np.testing.assert_allclose(got[i].numpy(), ref[k - 1], rtol=1e-9, atol=1e-12)
    assert torch.equal(em_iterates(X, y, s, b0, [0])[0], b0)


def test_oracle_and_ols_equal_numpy_lstsq():
    b = sample_mixreg(4, 3, 20, torch.Generator().manual_seed(2), snr=1.0)
    X, y, c = b.xs.double(), b.ys.double(), b.signs.double()
    for i in range(4):
        np.testing.assert_allclose(oracle_ls(X, y, c)[i].numpy(), np.linalg.lstsq(X[i].numpy(), (c * y)[i].numpy(),
                                                                                  rcond=None)[0], rtol=1e-9)
        np.testing.assert_allclose(ols(X, y)[i].numpy(), np.linalg.lstsq(X[i].numpy(), y[i].numpy(), rcond=None)[0],
                                   rtol=1e-9)


def test_em_reaches_the_oracle_at_high_snr_and_ols_does_not():
    b = sample_mixreg(64, 5, 200, torch.Generator().manual_seed(3), snr=10.0)
    em = FAMILY.solvers["em"].factory({"em_iters": 30}, 0, None)(b)
    err = FAMILY.metrics["beta_error"].fn(b, em)
    assert err.median() < 1e-3
    assert FAMILY.metrics["vs_oracle"].fn(b, em).median() < 1.5
    assert FAMILY.metrics["beta_error"].fn(b, FAMILY.solvers["ols"].factory({}, 0, None)(b)).median() > 0.5


def test_metric_and_loss_take_the_better_sign():
    b = sample_mixreg(8, 4, 10, torch.Generator().manual_seed(4))
    est = MixRegEstimate(torch.randn(8, 4, generator=torch.Generator().manual_seed(5)))
    flipped = MixRegEstimate(-est.beta)
    torch.testing.assert_close(FAMILY.metrics["beta_error"].fn(b, est), FAMILY.metrics["beta_error"].fn(b, flipped))
    torch.testing.assert_close(FAMILY.loss(est.beta, b, None)["loss"], FAMILY.loss(-est.beta, b, None)["loss"])
    assert FAMILY.loss(-b.beta, b, None)["loss"] < 1e-12
    r = FAMILY.residual(MixRegEstimate(-b.beta), b)
    assert r.abs().max() < 1e-6


def test_spectral_start_points_along_beta_at_high_snr():
    from pipeline.algorithms.mixture_regression import spectral_start

    b = sample_mixreg(32, 5, 2000, torch.Generator().manual_seed(6), snr=10.0)
    v = spectral_start(b.xs.double(), b.ys.double())
    cos = (v * b.beta.double()).sum(-1).abs() / v.norm(dim=-1)
    assert cos.min() > 0.95 and (v.norm(dim=-1) - 1).abs().max() < 0.2
    em = FAMILY.solvers["em_spectral"].factory({"em_iters": 20}, 0, None)(b)
    r = FAMILY.metrics["vs_oracle"].fn(b, em)  # near the oracle (EM also errs on a few signs: ratios of ~1e-5 errors)
    assert r.median() < 1.3 and r.max() < 3


# ----------------------------------------------------------------------------- K >= 3 regressors

def _em_k_loop(X, y, sigma, B0, iters, m_step="exact", gd_steps=5, lr=1.0):
    """Plain numpy EM for K regressors, one task: responsibilities by a loop over components, then a
    weighted least squares (or gradient steps) per component."""
    B, out, n = B0.copy(), [], len(y)
    K = B.shape[0]
    for _ in range(iters):
        logp = np.stack([-(y - X @ B[k]) ** 2 / (2 * sigma ** 2) for k in range(K)])  # (K, n)
        R = np.exp(logp - logp.max(0))
        R = R / R.sum(0)
        for k in range(K):
            W = R[k]
            if m_step == "exact":
                B[k] = np.linalg.solve((X * W[:, None]).T @ X, (X * W[:, None]).T @ y)
            else:
                H = (X * W[:, None]).T @ X / n
                step = lr / np.linalg.eigvalsh(H).max()
                for _ in range(gd_steps):
                    B[k] = B[k] - step * (X * W[:, None]).T @ (X @ B[k] - y) / n
        out.append(B.copy())
    return out


def test_k_component_sampler_draws_each_example_from_one_unit_regressor():
    b = sample_mixreg(6, 4, 50, torch.Generator().manual_seed(7), snr=1e6, components=3)
    assert b.betas.shape == (6, 3, 4) and b.K == 3 and not b.symmetric
    torch.testing.assert_close(b.betas.norm(dim=-1), torch.ones(6, 3))
    fit = torch.gather(b.betas, 1, b.comps[..., None].expand(6, 50, 4))
    torch.testing.assert_close(b.ys, (b.xs * fit).sum(-1), atol=1e-4, rtol=0)  # noise 1e-6
    assert set(b.comps.unique().tolist()) == {0, 1, 2}
    s = sample_mixreg(6, 4, 50, torch.Generator().manual_seed(7))
    assert s.symmetric and torch.equal(s.betas[:, 1], -s.betas[:, 0])


def test_k_component_em_equals_a_numpy_loop_at_every_iteration_for_both_m_steps():
    from pipeline.algorithms.mixture_regression import em_components_iterates

    b = sample_mixreg(4, 3, 40, torch.Generator().manual_seed(8), snr=3.0, components=3)
    X, y, s = b.xs.double(), b.ys.double(), b.sigma.double()
    B0 = torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    for m in ("exact", "gd"):
        its = em_components_iterates(X, y, s, B0, [1, 3, 6], m_step=m)
        for i in range(4):
            ref = _em_k_loop(X[i].numpy(), y[i].numpy(), float(s[i]), B0[i].numpy(), 6, m)
            for got, k in zip(its, [1, 3, 6]):
                np.testing.assert_allclose(got[i].numpy(), ref[k - 1], rtol=1e-7, atol=1e-9)


def test_k_component_oracle_is_least_squares_on_each_components_examples():
    from pipeline.algorithms.mixture_regression import oracle_components

    b = sample_mixreg(3, 3, 60, torch.Generator().manual_seed(10), snr=2.0, components=4)
    X, y = b.xs.double(), b.ys.double()
    got = oracle_components(X, y, b.comps, 4)
    for i in range(3):
        for k in range(4):
            sel = (b.comps[i] == k).numpy()
            ref = np.linalg.lstsq(X[i].numpy()[sel], y[i].numpy()[sel], rcond=None)[0]
            np.testing.assert_allclose(got[i, k].numpy(), ref, rtol=1e-7, atol=1e-9)


def test_k_component_oracle_is_min_norm_where_a_component_has_fewer_examples_than_dimensions():
    from pipeline.algorithms.mixture_regression import oracle_components

    b = sample_mixreg(256, 5, 8, torch.Generator().manual_seed(15), snr=2.0, components=3)  # ~2.7 examples each
    X, y = b.xs.double(), b.ys.double()
    got = oracle_components(X, y, b.comps, 3)
    for i in range(256):
        for k in range(3):
            sel = (b.comps[i] == k).numpy()
            ref = np.linalg.lstsq(X[i].numpy()[sel], y[i].numpy()[sel], rcond=None)[0] if sel.any() else np.zeros(5)
            np.testing.assert_allclose(got[i, k].numpy(), ref, rtol=1e-6, atol=1e-8)


def test_k_component_loss_and_metric_are_the_best_matching_and_ignore_the_order():
    import itertools

    b = sample_mixreg(5, 3, 10, torch.Generator().manual_seed(11), components=3)
    guess = b.betas + 0.3 * torch.randn(5, 3, 3, generator=torch.Generator().manual_seed(12))
    loss = FAMILY.loss(guess, b, None)["loss"]
    err = FAMILY.metrics["beta_error"].fn(b, MixRegEstimate(guess))
    brute = torch.stack([torch.stack([(guess[:, list(p)] - b.betas).pow(2).sum(-1).mean(1)
                                      for p in itertools.permutations(range(3))]).min(0).values])[0]
    torch.testing.assert_close(err.float(), brute)
    torch.testing.assert_close(loss, brute.mean())
    shuffled = guess[:, [2, 0, 1]]
    torch.testing.assert_close(FAMILY.loss(shuffled, b, None)["loss"], loss)
    assert FAMILY.loss(b.betas[:, [1, 2, 0]], b, None)["loss"] < 1e-12
    r = FAMILY.residual(MixRegEstimate(b.betas[:, [2, 1, 0]]), b)
    assert r.shape == (5, 9) and r.abs().max() < 1e-6


def test_k_component_em_finds_the_regressors_at_high_snr_and_the_spectral_start_is_not_applicable():
    b = sample_mixreg(64, 5, 120, torch.Generator().manual_seed(13), snr=20.0, components=3)
    em = FAMILY.solvers["em"].factory({"em_iters": 30}, 0, None)(b)
    assert em.beta.shape == (64, 3, 5)
    err = FAMILY.metrics["beta_error"].fn(b, em)
    assert err.median() < 1e-2  # EM from a random start can still land in a local optimum on a few tasks
    assert FAMILY.metrics["beta_error"].fn(b, FAMILY.solvers["ols"].factory({}, 0, None)(b)).median() > 0.3
    oracle = FAMILY.solvers["oracle"].factory({}, 0, None)(b)
    torch.testing.assert_close(FAMILY.metrics["vs_oracle"].fn(b, oracle), torch.ones(64, dtype=torch.float64),
                               atol=1e-3, rtol=0)  # the oracle is its own reference (float32 answers)
    spec = FAMILY.solvers["em_spectral"].factory({"em_iters": 5}, 0, None)(b)
    assert not spec.applicable and "symmetric" in spec.reason


def test_k_component_network_outputs_k_regressors():
    import copy

    from pipeline.core import plan as P
    from pipeline.core.config import from_dict
    from pipeline.core.network import Network
    from tests.conftest import TINY_PARAMS

    p = copy.deepcopy(TINY_PARAMS)
    p["studies"] = ["mixreg"]
    cfg = from_dict(p)
    plan = P.resolve(cfg)
    k_runs = [r for r in plan.runs.values() if r.task.components == 3]
    assert len(k_runs) == 1, plan.runs
    net = Network(k_runs[0])
    b = sample_mixreg(4, k_runs[0].task.d, 8, torch.Generator().manual_seed(14), components=3)
    out = net(b)
    assert out.shape == (4, 3, k_runs[0].task.d)
    assert torch.isfinite(FAMILY.loss(out, b, k_runs[0].task)["loss"])
