"""Batched Lloyd's algorithm (k-means) with k-means++ starts and restarts, on the input's device.

lloyd(x, centers0, iters): every task and restart at once ((B, R) flattened); each iteration assigns
every point to its nearest centre and moves each centre to the mean of its points (a centre that
loses all its points stays where it was, as in sklearn's Lloyd). A task stops moving once its
assignment no longer changes (it then stays fixed). The restart with the lowest inertia (sum of
squared distances) wins. Starts: greedy k-means++ (algorithms/em.py), per-task seeded.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class LloydResult(NamedTuple):
    labels: Tensor  # (B, N) long
    centers: Tensor  # (B, K, d)
    inertia: Tensor  # (B,)
    n_iter: Tensor  # (B,) iterations until the assignment stopped changing


def _sqdist(x: Tensor, c: Tensor) -> Tensor:
    """(B, N, d), (B, K, d) -> (B, N, K) squared distances."""
    return (x.pow(2).sum(-1, keepdim=True) - 2 * x @ c.transpose(1, 2) + c.pow(2).sum(-1)[:, None, :]).clamp_min(0)


def lloyd(x: Tensor, centers0: Tensor, iters: int = 100) -> LloydResult:
    """x (B, N, d), starts (B, K, d) -> LloydResult after at most `iters` iterations."""
    c = centers0.to(x.dtype).clone()
    B, N, d = x.shape
    K = c.shape[1]
    labels = _sqdist(x, c).argmin(-1)
    n_iter = torch.zeros(B, dtype=torch.long, device=x.device)
    for _ in range(iters):
        onehot = torch.nn.functional.one_hot(labels, K).to(x.dtype)  # (B, N, K)
        count = onehot.sum(1)  # (B, K)
        mean = onehot.transpose(1, 2) @ x / count.clamp_min(1)[..., None]
        c = torch.where(count[..., None] > 0, mean, c)  # an empty cluster keeps its centre
        new = _sqdist(x, c).argmin(-1)
        moved = (new != labels).any(1)
        n_iter = n_iter + moved.long()
        labels = new
        if not moved.any():
            break
    inertia = _sqdist(x, c).gather(2, labels[..., None])[..., 0].sum(1)
    return LloydResult(labels, c, inertia, n_iter)


def lloyd_restarts(x: Tensor, centers0: Tensor, iters: int = 100) -> LloydResult:
    """x (B, N, d), starts (B, R, K, d): R runs per task in one batch, the lowest inertia wins."""
    B, R, K, d = centers0.shape
    xr = x[:, None].expand(B, R, *x.shape[1:]).reshape(B * R, *x.shape[1:])
    res = lloyd(xr, centers0.reshape(B * R, K, d), iters)
    best = res.inertia.view(B, R).argmin(1)  # (B,)
    pick = lambda t: t.view(B, R, *t.shape[1:])[torch.arange(B, device=x.device), best]  # noqa: E731
    return LloydResult(pick(res.labels), pick(res.centers), pick(res.inertia), pick(res.n_iter))
