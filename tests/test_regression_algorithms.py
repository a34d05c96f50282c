"""In-context linear-regression solvers (pipeline.algorithms.regression) against independent
references: numpy lstsq, sklearn Ridge / KNeighborsRegressor, and plain per-task numpy loops.
Only local seeded generators are used, so the tests pass in any order."""
import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge
from sklearn.neighbors import KNeighborsRegressor

from pipeline.algorithms import regression as reg


def _tasks(B, n, d, seed, noise=0.0, dtype=torch.float64):
    """x ~ N(0, I), w ~ N(0, I), y = x.w + noise * N(0, 1), from a local torch.Generator."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(B, n, d, generator=g, dtype=torch.float64)
    w = torch.randn(B, d, generator=g, dtype=torch.float64)
    ys = (xs @ w[..., None])[..., 0] + noise * torch.randn(B, n, generator=g, dtype=torch.float64)
    return xs.to(dtype), ys.to(dtype)


def _per_prefix(xs, ys, fit_predict):
    """Reference preds (B, n): fit_predict(X_k, y_k, x_k) for every task and every k >= 1; 0 at k = 0."""
    X, Y = xs.double().numpy(), ys.double().numpy()
    out = np.zeros(Y.shape)
    for t in range(X.shape[0]):
        for k in range(1, X.shape[1]):
            out[t, k] = fit_predict(X[t, :k], Y[t, :k], X[t, k])
    return out


def _close(preds, ref, atol=1e-8):
    np.testing.assert_allclose(preds.double().numpy(), ref, rtol=0, atol=atol)


def test_prefix_stats_are_exclusive_cumsums():
    xs, ys = _tasks(3, 7, 4, seed=0, noise=0.5)
    S, b, counts = reg.prefix_stats(xs, ys)
    assert S.shape == (3, 7, 4, 4) and b.shape == (3, 7, 4) and S.dtype == torch.float64
    assert counts.tolist() == list(range(7))
    X, Y = xs.numpy(), ys.numpy()
    for t in range(3):
        for k in range(7):
            np.testing.assert_allclose(S[t, k].numpy(), X[t, :k].T @ X[t, :k], atol=1e-12)
            np.testing.assert_allclose(b[t, k].numpy(), X[t, :k].T @ Y[t, :k], atol=1e-12)


@pytest.mark.parametrize("n,d", [(12, 5), (6, 8)])  # k < d, k = d, k > d; and only k < d
def test_least_squares_matches_numpy_min_norm_lstsq(n, d):
    xs, ys = _tasks(6, n, d, seed=1, noise=0.3)
    ref = _per_prefix(xs, ys, lambda X, y, x: np.linalg.lstsq(X, y, rcond=None)[0] @ x)
    # pinv(S_k) squares cond(X_k), which peaks at k = d: ~1e-9 here, up to ~1e-7 for d = 20
    _close(reg.least_squares(xs, ys), ref, atol=1e-6)


def test_least_squares_noiseless_isotropic_error_curve():
    d, n = 5, 9
    xs, ys = _tasks(4000, n, d, seed=2)
    err = ((reg.least_squares(xs, ys) - ys) ** 2).mean(0) / d  # (n,)
    for k in range(n):
        if k < d:  # E||(I - P_k) w||^2 / d = 1 - k/d; std of the mean 0.03-0.05 (1 - k/d) here
            assert abs(err[k].item() - (1 - k / d)) < 0.15 * (1 - k / d), (k, err[k].item())
        else:
            assert err[k].item() < 1e-10, (k, err[k].item())


@pytest.mark.parametrize("lam", [0.1, 2.0])
def test_ridge_matches_sklearn(lam):
    xs, ys = _tasks(4, 10, 4, seed=3, noise=0.5)
    fit = lambda X, y, x: Ridge(alpha=lam, fit_intercept=False).fit(X, y).predict(x[None])[0]
    _close(reg.ridge(xs, ys, lam), _per_prefix(xs, ys, fit), atol=1e-8)


def test_ridge_zero_is_least_squares():
    xs, ys = _tasks(4, 10, 4, seed=4, noise=0.5)
    torch.testing.assert_close(reg.ridge(xs, ys, 0.0), reg.least_squares(xs, ys))


def test_averaging_matches_loop():
    xs, ys = _tasks(4, 10, 3, seed=5, noise=0.5)
    ref = _per_prefix(xs, ys, lambda X, y, x: np.mean(y[:, None] * X, axis=0) @ x)
    _close(reg.averaging(xs, ys), ref, atol=1e-12)


@pytest.mark.parametrize("kn", [1, 3])
def test_nearest_neighbours_matches_sklearn(kn):
    xs, ys = _tasks(5, 12, 3, seed=6, noise=0.5)  # continuous data: no distance ties
    fit = lambda X, y, x: KNeighborsRegressor(n_neighbors=min(kn, len(y))).fit(X, y).predict(x[None])[0]
    _close(reg.nearest_neighbours(xs, ys, kn), _per_prefix(xs, ys, fit), atol=1e-12)


def test_nearest_neighbours_ties_go_to_lower_index():
    xs = torch.zeros(1, 6, 2, dtype=torch.float64)
    xs[0, 4] = 1.0  # examples 0..3 and the query 5 coincide; example 4 is far away
    ys = torch.tensor([[1.0, 2.0, 4.0, 8.0, 16.0, 0.0]], dtype=torch.float64)
    preds = reg.nearest_neighbours(xs, ys, 3)
    assert preds[0].tolist() == [0.0, 1.0, 1.5, 7 / 3, 7 / 3, 7 / 3]


def _gd_ref(steps, lr):
    def fit(X, y, x):
        w = np.zeros(X.shape[1])
        for _ in range(steps):
            w = w - lr * X.T @ (X @ w - y)
        return w @ x
    return fit


@pytest.mark.parametrize("steps,lr", [(0, 0.01), (1, 0.01), (20, 0.01), (7, 0.05)])
def test_gradient_descent_matches_loop(steps, lr):
    xs, ys = _tasks(4, 10, 4, seed=7, noise=0.5)
    _close(reg.gradient_descent(xs, ys, steps, lr), _per_prefix(xs, ys, _gd_ref(steps, lr)), atol=1e-10)


def _newton_ref(steps, alpha):
    def fit(X, y, x):
        S = X.T @ X
        norm = np.linalg.norm(S @ S.T, 2 if alpha == "spectral" else "fro")
        M = S / norm
        for _ in range(steps):
            M = 2 * M - M @ S @ M
        return (M @ (X.T @ y)) @ x
    return fit


@pytest.mark.parametrize("alpha", ["spectral", "frobenius"])
@pytest.mark.parametrize("steps", [0, 1, 4])
def test_iterative_newton_matches_loop(steps, alpha):
    xs, ys = _tasks(4, 10, 4, seed=8, noise=0.5)
    ref = _per_prefix(xs, ys, _newton_ref(steps, alpha))
    _close(reg.iterative_newton(xs, ys, steps, alpha), ref, atol=1e-10)


@pytest.mark.parametrize("alpha", ["spectral", "frobenius"])
def test_iterative_newton_converges_to_min_norm_least_squares(alpha):
    xs, ys = _tasks(8, 12, 5, seed=9, noise=0.3)  # 0 < k < d: min-norm; k >= d: exact solution
    ref = _per_prefix(xs, ys, lambda X, y, x: np.linalg.lstsq(X, y, rcond=None)[0] @ x)
    _close(reg.iterative_newton(xs, ys, 60, alpha), ref, atol=1e-7)


def test_iterates_equal_the_step_loop():
    xs, ys = _tasks(3, 9, 4, seed=10, noise=0.5)
    S, b, _ = reg.prefix_stats(xs, ys)
    steps = [0, 2, 3, 3, 7]
    W_gd, W_nt = reg.gd_iterates(S, b, steps, 0.02), reg.newton_iterates(S, b, steps, "frobenius")
    assert W_gd.shape == W_nt.shape == (5, 3, 9, 4)
    w, M = torch.zeros_like(b), S / torch.linalg.matrix_norm(S @ S.mT).clamp(min=1e-300)[..., None, None]
    for j in range(8):
        for i in [i for i, s in enumerate(steps) if s == j]:
            torch.testing.assert_close(W_gd[i], w, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(W_nt[i], (M @ b[..., None])[..., 0], rtol=1e-12, atol=1e-12)
        w = w - 0.02 * ((S @ w[..., None])[..., 0] - b)
        M = 2 * M - M @ S @ M
    preds = (W_gd[-1] * xs).sum(-1)
    torch.testing.assert_close(reg.gradient_descent(xs, ys, 7, 0.02), preds)


def _online_ref(passes, lr):
    def fit(X, y, x):
        w = np.zeros(X.shape[1])
        for _ in range(passes):
            for xi, yi in zip(X, y):
                w = w - lr * (xi @ w - yi) * xi
        return w @ x
    return fit


@pytest.mark.parametrize("passes,lr", [(0, 0.05), (1, 0.05), (3, 0.1), (10, 0.02)])
def test_online_gd_matches_loop(passes, lr):
    xs, ys = _tasks(4, 9, 3, seed=13, noise=0.5)
    _close(reg.online_gd(xs, ys, passes, lr), _per_prefix(xs, ys, _online_ref(passes, lr)), atol=1e-10)


def test_online_gd_iterates_equal_single_calls_and_approach_least_squares():
    xs, ys = _tasks(3, 12, 3, seed=14)  # noiseless: many passes with a small step reach the LS fit
    W = reg.online_gd_iterates(xs, ys, [0, 1, 1, 4], 0.05)
    assert W.shape == (4, 3, 12, 3) and (W[0] == 0).all()
    torch.testing.assert_close((W[3] * xs).sum(-1), reg.online_gd(xs, ys, 4, 0.05))
    torch.testing.assert_close(W[1], W[2])
    far = reg.online_gd(xs, ys, 2000, 0.05)[:, 4:]  # prefixes with k > d examples
    torch.testing.assert_close(far, reg.least_squares(xs, ys)[:, 4:], rtol=0, atol=1e-6)


METHODS = {
    "least_squares": reg.least_squares,
    "ridge": lambda xs, ys: reg.ridge(xs, ys, 0.5),
    "averaging": reg.averaging,
    "3nn": reg.nearest_neighbours,
    "gd": lambda xs, ys: reg.gradient_descent(xs, ys, 10, 0.01),
    "newton_spectral": lambda xs, ys: reg.iterative_newton(xs, ys, 10, "spectral"),
    "newton_frobenius": lambda xs, ys: reg.iterative_newton(xs, ys, 10, "frobenius"),
    "online_gd": lambda xs, ys: reg.online_gd(xs, ys, 2, 0.05),
}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(METHODS))
def test_k0_zero_finite_dtype_device(name, dtype, device):
    xs, ys = _tasks(5, 8, 3, seed=11, noise=0.5, dtype=dtype)
    preds = METHODS[name](xs.to(device), ys.to(device))
    assert preds.shape == (5, 8) and preds.dtype == dtype and preds.device.type == device
    assert torch.isfinite(preds).all() and (preds[:, 0] == 0).all()
    ref = METHODS[name](xs.double(), ys.double())  # float32 inputs: same answer up to float32 rounding
    torch.testing.assert_close(preds.cpu().double(), ref, rtol=1e-5, atol=1e-5)
    zero = METHODS[name](torch.zeros_like(xs), ys)  # S_k = 0 for every k: no division by zero
    if name == "3nn":  # all points tie: the first min(3, k) examples are the neighbours
        first = torch.stack([ys[:, :min(3, k)].mean(1) if k else ys[:, 0] * 0 for k in range(8)], 1)
        torch.testing.assert_close(zero, first)
    else:
        assert (zero == 0).all()


def test_bad_arguments_raise_value_error():
    xs, ys = _tasks(2, 5, 3, seed=12)
    S, b, _ = reg.prefix_stats(xs, ys)
    bad = [
        lambda: reg.least_squares(xs, ys[:, :4]),
        lambda: reg.averaging(xs[0], ys[0]),
        lambda: reg.ridge(xs, ys, -1.0),
        lambda: reg.nearest_neighbours(xs, ys, 0),
        lambda: reg.gradient_descent(xs, ys, -1, 0.01),
        lambda: reg.gradient_descent(xs, ys, 2.5, 0.01),
        lambda: reg.gradient_descent(xs, ys, 3, -0.1),
        lambda: reg.iterative_newton(xs, ys, -2),
        lambda: reg.online_gd(xs, ys, -1, 0.05),
        lambda: reg.online_gd_iterates(xs, ys, [3, 1], 0.05),
        lambda: reg.iterative_newton(xs, ys, 3, alpha="optimal"),
        lambda: reg.gd_iterates(S, b, [3, 1], 0.01),
        lambda: reg.gd_iterates(S, b, [], 0.01),
        lambda: reg.newton_iterates(S, b[..., :2], [1]),
        lambda: reg.least_squares(xs.long(), ys),
    ]
    for i, call in enumerate(bad):
        with pytest.raises(ValueError):
            call()
