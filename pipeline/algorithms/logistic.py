"""Regularised logistic regression, batched over tasks: the loss, damped Newton and gradient descent
with a grid line search (Giannou et al. 2024, "How well can transformers emulate in-context
Newton's method?").

Every task b has examples X (n, d), labels y in {-1, +1} (n,) and minimises

    L(w) = (1/n) sum_i log(1 + exp(-y_i x_i.w)) + (mu/2) ||w||^2

(strongly convex: the minimiser is unique). Shapes: X (B, n, d), y (B, n), w (B, d). Work is in
float64 (float32 on MPS) on the inputs' device; iterates come back stacked over the steps axis,
(S, B, d), for probing network layers against algorithm steps.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.algorithms.regression import _check_steps, _work_dtype

LINE_SEARCH = tuple(0.8 ** j for j in range(83))  # 1, 0.8, ..., > 1e-8: the anchor's grid


def _check(X: Tensor, y: Tensor, mu: float) -> None:
    if X.dim() != 3 or y.shape != X.shape[:2]:
        raise ValueError(f"expected X (B, n, d) and y (B, n), got {tuple(X.shape)} and {tuple(y.shape)}")
    if not (math.isfinite(mu) and mu > 0):
        raise ValueError(f"mu must be a finite number > 0, got {mu}")


def loss(w: Tensor, X: Tensor, y: Tensor, mu: float) -> Tensor:
    """(B,) regularised logistic loss L(w); w may carry extra leading axes: (..., B, d)."""
    margin = y * (X @ w[..., None])[..., 0]  # (..., B, n)
    return F.softplus(-margin).mean(-1) + 0.5 * mu * w.pow(2).sum(-1)


def grad_hess(w: Tensor, X: Tensor, y: Tensor, mu: float) -> tuple[Tensor, Tensor]:
    """Gradient (B, d) and Hessian (B, d, d) of L at w."""
    n, d = X.shape[1], X.shape[2]
    margin = y * (X @ w[..., None])[..., 0]  # (B, n)
    s = torch.sigmoid(-margin)  # (B, n): d/dm softplus(-m) = -s
    g = -(X * (y * s)[..., None]).sum(1) / n + mu * w
    c = s * (1 - s) / n  # (B, n)
    H = (X * c[..., None]).mT @ X + mu * torch.eye(d, dtype=X.dtype, device=X.device)
    return g, H


def damped_newton_iterates(X: Tensor, y: Tensor, mu: float, steps: Sequence[int], w0: Tensor | None = None) -> Tensor:
    """Damped Newton (Nesterov's step for self-concordant functions, as in Giannou et al.):
    w <- w - (2 sqrt(mu) / (2 sqrt(mu) + lambda(w))) H^{-1} g, lambda(w) = sqrt(g^T H^{-1} g) the
    Newton decrement. From w0 (default 0). Returns W (len(steps), B, d): the iterate after each
    requested step count (ascending; 0 = w0), in the work dtype."""
    _check(X, y, mu)
    steps = _check_steps(steps)
    dt = _work_dtype(X.device)
    X, y = X.to(dt), y.to(dt)
    w = torch.zeros(X.shape[0], X.shape[2], dtype=dt, device=X.device) if w0 is None else w0.to(dt).clone()
    damp = 2 * math.sqrt(mu)
    out = []
    for j in range(steps[-1] + 1):
        out += [w] * steps.count(j)
        if j == steps[-1]:
            break
        g, H = grad_hess(w, X, y, mu)
        step = torch.linalg.solve(H, g)  # H^{-1} g (B, d)
        lam = (g * step).sum(-1).clamp(min=0).sqrt()  # Newton decrement (B,)
        w = w - (damp / (damp + lam))[:, None] * step
    return torch.stack(out)


def gd_iterates(X: Tensor, y: Tensor, mu: float, steps: Sequence[int], grid: Sequence[float] = LINE_SEARCH,
                w0: Tensor | None = None) -> Tensor:
    """Gradient descent with an exact grid line search per task and step: w <- w - eta g with
    eta = argmin over `grid` of L(w - eta g) (the anchor's grid 0.8^j; it picks one eta for the
    whole batch, here every task picks its own). From w0 (default 0). Returns W (len(steps), B, d)."""
    _check(X, y, mu)
    steps = _check_steps(steps)
    dt = _work_dtype(X.device)
    X, y = X.to(dt), y.to(dt)
    etas = torch.tensor(list(grid), dtype=dt, device=X.device)  # (J,)
    w = torch.zeros(X.shape[0], X.shape[2], dtype=dt, device=X.device) if w0 is None else w0.to(dt).clone()
    out = []
    for j in range(steps[-1] + 1):
        out += [w] * steps.count(j)
        if j == steps[-1]:
            break
        g, _ = grad_hess(w, X, y, mu)
        cand = w[None] - etas[:, None, None] * g[None]  # (J, B, d)
        best = loss(cand, X, y, mu).argmin(0)  # (B,): the first (largest) eta on ties
        w = cand[best, torch.arange(X.shape[0], device=X.device)]
    return torch.stack(out)


def accuracy(w: Tensor, X: Tensor, y: Tensor) -> Tensor:
    """(B,) share of points with sign(x.w) = y (a margin of exactly 0 counts as wrong)."""
    return ((X.to(w.dtype) @ w[..., None])[..., 0] * y.to(w.dtype) > 0).to(torch.float64).mean(-1)
