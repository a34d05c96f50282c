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
