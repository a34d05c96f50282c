"""In-context logistic regression: the solvers (pipeline.algorithms.logistic) against plain numpy
loops and scipy's optimiser, and the family's sampler, tokens, metrics and batch round trip."""
import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.special import expit

from pipeline.algorithms import logistic as L
from pipeline.families.logreg import FAMILY
from pipeline.families.logreg.config import LogRegTask
from pipeline.families.logreg.data import LogRegBatch, sample_logreg
from pipeline.families.logreg.net import tokens

MU = 0.01


def _tasks(B=6, n=20, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, n, d, generator=g, dtype=torch.float64)
    w = torch.randn(B, d, generator=g, dtype=torch.float64)
    y = torch.where(X @ w[..., None] >= 0, 1.0, -1.0)[..., 0].double()
    y[:, :2] *= -1  # some label noise: the unregularised problem would still be separable otherwise
    return X, y


def _np_loss(w, X, y, mu):
    return np.mean(np.logaddexp(0, -y * (X @ w))) + 0.5 * mu * w @ w


def _np_grad_hess(w, X, y, mu):
    n, d = X.shape
    s = expit(-y * (X @ w))
    g = -(X.T @ (y * s)) / n + mu * w
    H = (X.T * (s * (1 - s))) @ X / n + mu * np.eye(d)
    return g, H


def test_loss_gradient_and_hessian_match_numpy():
    X, y = _tasks()
    w = torch.randn(X.shape[0], X.shape[2], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g, H = L.grad_hess(w, X, y, MU)
    for b in range(X.shape[0]):
        Xb, yb, wb = X[b].numpy(), y[b].numpy(), w[b].numpy()
        assert abs(L.loss(w, X, y, MU)[b].item() - _np_loss(wb, Xb, yb, MU)) < 1e-12
        gr, Hr = _np_grad_hess(wb, Xb, yb, MU)
        np.testing.assert_allclose(g[b].numpy(), gr, atol=1e-12)
        np.testing.assert_allclose(H[b].numpy(), Hr, atol=1e-12)


def test_damped_newton_matches_a_plain_loop_per_step():
    X, y = _tasks(seed=2)
    steps = [0, 1, 2, 5, 8]
    W = L.damped_newton_iterates(X, y, MU, steps)
    assert W.shape == (5, X.shape[0], X.shape[2])
    for b in range(X.shape[0]):
        w = np.zeros(X.shape[2])
        for j in range(9):
            if j in steps:
                np.testing.assert_allclose(W[steps.index(j), b].numpy(), w, atol=1e-12)
            g, H = _np_grad_hess(w, X[b].numpy(), y[b].numpy(), MU)
            step = np.linalg.solve(H, g)
            lam = np.sqrt(g @ step)
            w = w - 2 * np.sqrt(MU) / (2 * np.sqrt(MU) + lam) * step


def test_damped_newton_converges_to_the_scipy_minimiser():
    X, y = _tasks(seed=3)
    w = L.damped_newton_iterates(X, y, MU, [40])[0]
    for b in range(X.shape[0]):
        Xb, yb = X[b].numpy(), y[b].numpy()
        ref = minimize(_np_loss, np.zeros(X.shape[2]), args=(Xb, yb, MU), method="BFGS",
                       jac=lambda v, *a: _np_grad_hess(v, *a)[0], options={"gtol": 1e-12}).x
        np.testing.assert_allclose(w[b].numpy(), ref, atol=1e-6)


def test_line_search_gd_matches_a_plain_loop_and_descends():
    X, y = _tasks(seed=4)
    steps = [0, 1, 3, 6]
    W = L.gd_iterates(X, y, MU, steps)
    grid = [0.8 ** j for j in range(83)]
    for b in range(X.shape[0]):
        Xb, yb = X[b].numpy(), y[b].numpy()
        w, prev = np.zeros(X.shape[2]), np.inf
        for j in range(7):
            if j in steps:
                np.testing.assert_allclose(W[steps.index(j), b].numpy(), w, atol=1e-12)
            cur = _np_loss(w, Xb, yb, MU)
            assert cur <= prev + 1e-15  # the grid contains tiny steps: the loss never goes up
            prev = cur
            g = _np_grad_hess(w, Xb, yb, MU)[0]
            losses = [_np_loss(w - eta * g, Xb, yb, MU) for eta in grid]
            w = w - grid[int(np.argmin(losses))] * g


def test_bad_arguments():
    X, y = _tasks()
    with pytest.raises(ValueError, match="mu"):
        L.damped_newton_iterates(X, y, 0.0, [1])
    with pytest.raises(ValueError, match="expected X"):
        L.gd_iterates(X, y[:, :3], MU, [1])
    with pytest.raises(ValueError, match="sorted"):
        L.damped_newton_iterates(X, y, MU, [3, 1])


@pytest.mark.parametrize("condition", [1.0, 10.0])
def test_sampler_target_is_the_regularised_solution(condition):
    b = sample_logreg(16, 5, 26, torch.Generator().manual_seed(5), condition=condition)
    assert b.xs.shape == (16, 26, 5) and b.xt.shape == (16, 64, 5) and set(b.ys.unique().tolist()) <= {-1.0, 1.0}
    g, _ = L.grad_hess(b.w_target.double(), b.xs.double(), b.ys.double(), 0.01)
    assert g.abs().max() < 1e-5  # float32 storage of the float64 solution
    again = sample_logreg(16, 5, 26, torch.Generator().manual_seed(5), condition=condition)
    torch.testing.assert_close(b.xs, again.xs)
    est = FAMILY.decode(b.w_target, b)
    assert FAMILY.metrics["w_error"].fn(b, est).max() == 0
    assert FAMILY.metrics["excess_loss"].fn(b, est).abs().max() < 1e-6
    assert FAMILY.metrics["accuracy"].fn(b, est).mean() > 0.8
    zero = FAMILY.decode(torch.zeros_like(b.w_target), b)
    assert (FAMILY.metrics["excess_loss"].fn(b, zero) > 0).all()


def test_condition_number_of_the_covariance():
    from pipeline.families.logreg.data import covariance_factor

    T = covariance_factor(8, 5, 10.0, torch.Generator().manual_seed(6), "cpu").double()
    ev = torch.linalg.eigvalsh(T.mT @ T)
    torch.testing.assert_close(ev[:, -1] / ev[:, 0], torch.full((8,), 10.0, dtype=torch.float64), rtol=1e-5, atol=0)  # float32 factor
    assert ((ev[:, -1] >= 1 - 1e-4) & (ev[:, -1] <= 100 + 1e-3)).all()


def test_tokens_and_batch_round_trip():
    b = sample_logreg(4, 3, 6, torch.Generator().manual_seed(7), test_points=5)
    tok = tokens(b.xs, b.ys)
    assert tok.shape == (4, 7, 5)
    torch.testing.assert_close(tok[:, :6, :3], b.xs)
    torch.testing.assert_close(tok[:, :6, 3], b.ys)
    assert (tok[:, -1] == torch.tensor([0, 0, 0, 0, 1.0])).all() and (tok[:, :6, -1] == 0).all()
    back = LogRegBatch.from_numpy(b.to_numpy())
    for k in LogRegBatch.REQUIRED:
        torch.testing.assert_close(getattr(back, k), getattr(b, k))
    assert b.slice(1, 3).task_index().tolist() == [1, 2]
    bad = b.to_numpy()
    bad["w_target"] = bad["w_target"][:, :2]
    with pytest.raises(ValueError, match="inconsistent"):
        LogRegBatch.from_numpy(bad)


def test_solvers_answer_and_name_their_settings():
    b = sample_logreg(8, 5, 26, torch.Generator().manual_seed(8))
    p = {"newton_steps": 3, "gd_steps": 10}
    s = FAMILY.solvers["newton"].factory({**p, "newton_steps": 30}, 0, LogRegTask())
    assert s.name == "newton[newton_steps=30]"
    est = s(b)
    assert FAMILY.metrics["w_error"].fn(b, est).max() < 1e-8
    assert FAMILY.solvers["gd"].factory(p, 0, LogRegTask()).name == "gd"
