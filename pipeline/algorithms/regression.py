"""Classical in-context linear-regression solvers, batched over tasks and over prefix lengths.

Every solver takes xs (B, n, d) and ys (B, n) and returns preds (B, n), where preds[:, k] predicts
ys[:, k] for the query xs[:, k] from the first k examples only (xs[:, :k], ys[:, :k]): the
curve "error against number of in-context examples" that the transformer is compared with comes
out of one call. At k = 0 there are no examples and every method predicts 0.

The fitted methods share per-prefix sufficient statistics (exclusive cumulative sums, so prefix k
uses examples 0..k-1):  S_k = sum_{i<k} x_i x_i^T (B, n, d, d),  b_k = sum_{i<k} y_i x_i (B, n, d).
Each method turns them into a weight w_k (B, n, d) and predicts <w_k, x_k>. The only loops are over
iteration steps. Work is in float64 (float32 on MPS, which lacks it) on the inputs' device; preds
come back in the inputs' dtype.

gd_iterates / newton_iterates / online_gd_iterates give the weights after several step counts in one
pass, for probing studies that match network layers with algorithm steps (Fu et al. 2024,
"Transformers learn to achieve second-order convergence rates for in-context linear regression").
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

ALPHAS = ("spectral", "frobenius")


def _work_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _check_inputs(xs: Tensor, ys: Tensor) -> None:
    if xs.dim() != 3 or ys.dim() != 2 or xs.shape[:2] != ys.shape:
        raise ValueError(f"expected xs (B, n, d) and ys (B, n), got {tuple(xs.shape)} and {tuple(ys.shape)}")
    if not (xs.is_floating_point() and ys.is_floating_point()):
        raise ValueError(f"xs and ys must be floating point, got {xs.dtype} and {ys.dtype}")


def _int_arg(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _check_steps(steps: Sequence[int]) -> list[int]:
    if not isinstance(steps, Sequence) or len(steps) == 0:
        raise ValueError(f"steps must be a non-empty list of step counts, got {steps!r}")
    steps = [_int_arg(s, "every step count", 0) for s in steps]
    if steps != sorted(steps):
        raise ValueError(f"steps must be sorted ascending, got {steps}")
    return steps


def _check_lr(lr: float) -> None:
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite number >= 0, got {lr}")


def _check_stats(S: Tensor, b: Tensor) -> None:
    if S.dim() < 2 or S.shape[-1] != S.shape[-2] or S.shape[:-1] != b.shape:
        raise ValueError(f"expected S (..., d, d) and b (..., d), got {tuple(S.shape)} and {tuple(b.shape)}")


def _predict(w: Tensor, xs: Tensor, ys: Tensor) -> Tensor:
    """<w_k, x_k> for every prefix k, in the inputs' (promoted) dtype."""
    out = torch.promote_types(xs.dtype, ys.dtype)
    return (w * xs.to(w.dtype)).sum(-1).to(out)  # (B, n)


def prefix_stats(xs: Tensor, ys: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-prefix sufficient statistics S_k = X_k^T X_k (B, n, d, d) and b_k = X_k^T y_k (B, n, d),
    and counts (n,) with counts[k] = k, all in the work dtype (float64). Exclusive sums: prefix k
    holds examples 0..k-1, so S_0 = 0 and b_0 = 0."""
    _check_inputs(xs, ys)
    dt = _work_dtype(xs.device)
    x, y = xs.to(dt), ys.to(dt)
    S = torch.zeros(*x.shape, x.shape[-1], dtype=dt, device=x.device)  # (B, n, d, d)
    b = torch.zeros_like(x)  # (B, n, d)
    # Shifted cumsum (not cumsum minus the last term): prefix sums stay exact copies of each other.
    S[:, 1:] = (x[..., :, None] * x[..., None, :]).cumsum(1)[:, :-1]
    b[:, 1:] = (y[..., None] * x).cumsum(1)[:, :-1]
    counts = torch.arange(x.shape[1], dtype=dt, device=x.device)  # (n,)
    return S, b, counts


def least_squares(xs: Tensor, ys: Tensor, rtol: float | None = None) -> Tensor:
    """Minimum-norm least squares: w_k = pinv(S_k) b_k = pinv(X_k) y_k. For k < d this is the
    min-norm interpolant, for k >= d (full rank) the exact solution. Eigenvalues of S_k below
    rtol * lambda_max count as zero; the default 1000 d eps (float64) sits well above the rounding
    noise of the null space of S_k (at most ~d k eps lambda_max) and well below a genuine eigenvalue
    (a condition number of X_k beyond ~1e6 would be needed to hit it). Forming S_k squares the
    condition number: relative error ~ eps cond(X_k)^2, largest at k = d (~1e-7 for d = 20)."""
    S, b, _ = prefix_stats(xs, ys)
    if rtol is None:
        rtol = 1000 * xs.shape[-1] * torch.finfo(S.dtype).eps
    w = (torch.linalg.pinv(S, rtol=rtol, hermitian=True) @ b[..., None])[..., 0]  # (B, n, d)
    return _predict(w, xs, ys)


def ridge(xs: Tensor, ys: Tensor, lam: float) -> Tensor:
    """Ridge regression w_k = (S_k + lam I)^{-1} b_k (sklearn Ridge(alpha=lam, fit_intercept=False)).
    lam = 0 is the limit lam -> 0+, i.e. min-norm least squares (S_k is singular for k < d)."""
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam}")
    if lam == 0:
        return least_squares(xs, ys)
    S, b, _ = prefix_stats(xs, ys)
    eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
    w = torch.linalg.solve(S + lam * eye, b)  # (B, n, d)
    return _predict(w, xs, ys)


def averaging(xs: Tensor, ys: Tensor) -> Tensor:
    """The averaging estimator w_k = (1/k) sum_{i<k} y_i x_i (Garg et al. 2022's baseline; unbiased
    for w when x ~ N(0, I)); 0 at k = 0."""
    _, b, counts = prefix_stats(xs, ys)
    w = b / counts.clamp(min=1)[:, None]  # (B, n, d)
    return _predict(w, xs, ys)


def nearest_neighbours(xs: Tensor, ys: Tensor, k_neighbours: int = 3) -> Tensor:
    """Mean label of the min(k_neighbours, k) earlier examples nearest (Euclidean) to x_k, uniform
    weights (Garg et al. 2022's 3-NN baseline); 0 at k = 0. Ties go to the lower index (stable
    sort on exactly computed distances)."""
    _check_inputs(xs, ys)
    k_neighbours = _int_arg(k_neighbours, "k_neighbours", 1)
    B, n, _ = xs.shape
    x = xs.to(_work_dtype(xs.device))
    dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")  # (B, n query, n example)
    later = torch.ones(n, n, dtype=torch.bool, device=xs.device).triu()  # example i >= query k
    dist = dist.masked_fill(later, math.inf)
    K = min(k_neighbours, n)
    idx = torch.sort(dist, dim=-1, stable=True).indices[..., :K]  # (B, n, K)
    labels = ys.to(x.dtype)[:, None, :].expand(B, n, n).gather(-1, idx)  # (B, n, K)
    m = torch.arange(n, device=xs.device).clamp(max=K)  # neighbours used at prefix k: (n,)
    used = torch.arange(K, device=xs.device) < m[:, None]  # (n, K)
    preds = (labels * used).sum(-1) / m.clamp(min=1)  # (B, n)
    return preds.to(torch.promote_types(xs.dtype, ys.dtype))


def gd_iterates(S: Tensor, b: Tensor, steps: Sequence[int], lr: float) -> Tensor:
    """Full-batch gradient descent on 0.5 ||X w - y||^2 from w_0 = 0, un-normalised as in Fu et al.'s
    code: w <- w - lr (S w - b). Returns W (len(steps), ..., d): the weights after each requested
    step count (ascending), in one pass. Diverges once lr * lambda_max(S) > 2."""
    _check_stats(S, b)
    steps = _check_steps(steps)
    _check_lr(lr)
    dt = _work_dtype(S.device)
    S64, b64 = S.to(dt), b.to(dt)
    w = torch.zeros_like(b64)  # (..., d)
    out = []
    for j in range(steps[-1] + 1):
        out += [w] * steps.count(j)
        if j < steps[-1]:
            w = w - lr * ((S64 @ w[..., None])[..., 0] - b64)
    return torch.stack(out).to(S.dtype)


def newton_iterates(S: Tensor, b: Tensor, steps: Sequence[int], alpha: str = "spectral") -> Tensor:
    """Iterative Newton (Newton–Schulz) for pinv(S), S symmetric PSD: M_0 = a S,
    M_{j+1} = 2 M_j - M_j S M_j, w_j = M_j b. Returns W (len(steps), ..., d) after each requested
    step count (ascending), in one pass.

    alpha="frobenius": a = 1 / ||S S^T||_F, the choice of Fu et al.'s code.
    alpha="spectral":  a = 1 / ||S S^T||_2 = 1 / lambda_max(S)^2, the midpoint of the convergence
    interval 0 < a < 2 / ||S S^T||_2 (Soderstrom & Stewart 1974). Fu et al.'s text takes its end,
    2 / ||S S^T||_2, but there M_0 S has eigenvalue exactly 2 on the top eigenvector, so M_1 S has
    eigenvalue 0 there and rounding decides whether that direction comes back (after ~50 steps) or
    blows up; the midpoint converges at the same quadratic rate on every other direction.
    Where S = 0 (e.g. k = 0) a = 0 and w = 0. For singular S (k < d) rounding in the null space
    doubles every step (no cut-off, unlike pinv): in float64 keep steps below ~60 there."""
    _check_stats(S, b)
    steps = _check_steps(steps)
    if alpha not in ALPHAS:
        raise ValueError(f"alpha must be one of {ALPHAS}, got {alpha!r}")
    dt = _work_dtype(S.device)
    S64, b64 = S.to(dt), b.to(dt)
    if alpha == "spectral":
        norm = torch.linalg.matrix_norm(S64, ord=2) ** 2  # ||S S^T||_2 = sigma_max(S)^2
    else:
        norm = torch.linalg.matrix_norm(S64 @ S64.mT)  # Frobenius
    a = torch.where(norm > 0, 1 / norm.clamp(min=torch.finfo(dt).tiny), torch.zeros_like(norm))
    M = a[..., None, None] * S64  # (..., d, d)
    out = []
    for j in range(steps[-1] + 1):
        out += [(M @ b64[..., None])[..., 0]] * steps.count(j)
        if j < steps[-1]:
            M = 2 * M - M @ S64 @ M
    return torch.stack(out).to(S.dtype)


def online_gd_iterates(xs: Tensor, ys: Tensor, passes: Sequence[int], lr: float) -> Tensor:
    """Online (stochastic, one example at a time) gradient descent, per prefix: from w = 0, each pass
    visits the prefix's examples i = 0 .. k-1 in prompt order, w <- w - lr (<w, x_i> - y_i) x_i.
    Returns W (len(passes), B, n, d) in the work dtype: the weights of every prefix k after each
    requested number of passes (ascending); one pass is the classical online learner that sees each
    example once (what an LSTM reading the prompt could run). All prefixes advance together:
    prefix k skips examples i >= k. Diverges once lr ||x_i||^2 > 2."""
    _check_inputs(xs, ys)
    passes = _check_steps(passes)
    _check_lr(lr)
    dt = _work_dtype(xs.device)
    x, y = xs.to(dt), ys.to(dt)
    B, n, d = x.shape
    w = torch.zeros(B, n, d, dtype=dt, device=x.device)  # (B, prefix k, d)
    k = torch.arange(n, device=x.device)
    out = []
    for p in range(passes[-1] + 1):
        out += [w] * passes.count(p)
        if p == passes[-1]:
            break
        for i in range(n - 1):  # example n-1 belongs to no prefix (prefix k holds 0 .. k-1)
            active = (k > i).to(dt)  # (n,): the prefixes that hold example i
            resid = (w * x[:, i, None, :]).sum(-1) - y[:, i, None]  # (B, n)
            w = w - lr * (active * resid)[..., None] * x[:, i, None, :]
    return torch.stack(out)


def gradient_descent(xs: Tensor, ys: Tensor, steps: int, lr: float) -> Tensor:
    """Predictions of `steps` full-batch GD steps (gd_iterates) from w_0 = 0, per prefix."""
    steps = _int_arg(steps, "steps", 0)
    S, b, _ = prefix_stats(xs, ys)
    return _predict(gd_iterates(S, b, [steps], lr)[0], xs, ys)


def online_gd(xs: Tensor, ys: Tensor, passes: int, lr: float) -> Tensor:
    """Predictions of online GD after `passes` passes over each prefix (online_gd_iterates)."""
    passes = _int_arg(passes, "passes", 0)
    return _predict(online_gd_iterates(xs, ys, [passes], lr)[0], xs, ys)


def iterative_newton(xs: Tensor, ys: Tensor, steps: int, alpha: str = "spectral") -> Tensor:
    """Predictions of `steps` iterative-Newton steps (newton_iterates), per prefix; steps = 0 uses
    w = M_0 b = a S b. Converges to least_squares (the min-norm answer for k < d)."""
    steps = _int_arg(steps, "steps", 0)
    S, b, _ = prefix_stats(xs, ys)
    return _predict(newton_iterates(S, b, [steps], alpha)[0], xs, ys)
