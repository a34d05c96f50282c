"""Per-task metrics for GMM estimates.

All metrics return one value per task (shape (B,)), NaN where the estimate is not finite (a
not-applicable method, or a solver that diverged on that task), so `summarize` can drop them and
report how many tasks were scored (`n`) (core/results.summarize).

The l2 error is the TGMM paper's permutation-invariant error. The anchor code matches with
`linear_sum_assignment` and then reorders the estimates by the assignment's *column indices*
as if they were the inverse permutation; that is wrong whenever the matching is not its own
inverse (3-cycles). Here the error is read off the cost matrix at the assignment, so no
reordering is ever done.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from pipeline.families.gmm.data import mean_log_likelihood, posterior_labels

ArrayLike = Tensor | np.ndarray

# posterior/likelihood work in float64 on (B, N, K, d) tensors: chunk tasks to bound memory
_ELEMENT_BUDGET = 1 << 24


def _np(a: ArrayLike) -> np.ndarray:
    if isinstance(a, Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _t(a: ArrayLike | None, dtype: torch.dtype = torch.float64) -> Tensor | None:
    if a is None:
        return None
    t = a.detach().cpu() if isinstance(a, Tensor) else torch.from_numpy(np.asarray(a))
    return t.to(dtype)


def _finite_tasks(weights: Tensor, means: Tensor, scales: Tensor | None) -> Tensor:
    """(B,) bool: True where the whole estimate of the task is finite."""
    ok = torch.isfinite(weights).all(1) & torch.isfinite(means).flatten(1).all(1)
    if scales is not None:
        ok &= torch.isfinite(scales).flatten(1).all(1)
    return ok


def _task_chunks(B: int, per_task: int):
    step = max(1, _ELEMENT_BUDGET // max(1, per_task))
    for start in range(0, B, step):
        yield start, min(B, start + step)


def l2_cost_matrix(est_weights: ArrayLike, est_means: ArrayLike, true_weights: ArrayLike,
                   true_means: ArrayLike) -> np.ndarray:
    """C[b, k, j] = (1/d)||mu_hat_j - mu_k||^2 + (pi_hat_j - pi_k)^2; rows truth, columns estimate."""
    ew, em = _np(est_weights).astype(np.float64), _np(est_means).astype(np.float64)
    tw, tm = _np(true_weights).astype(np.float64), _np(true_means).astype(np.float64)
    d = tm.shape[-1]
    mean_term = ((tm[:, :, None, :] - em[:, None, :, :]) ** 2).sum(-1) / d  # (B, K, K)
    weight_term = (tw[:, :, None] - ew[:, None, :]) ** 2  # (B, K, K)
    return mean_term + weight_term


def l2_error(est_weights: ArrayLike, est_means: ArrayLike, true_weights: ArrayLike,
             true_means: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Permutation-invariant l2 error per task and the matching.

    error_b = (1/K) sum_k C[b, k, sigma(k)] with sigma the Hungarian matching of C (see
    `l2_cost_matrix`). Returns (errors (B,) float64, perms (B, K) int64) with perms[b, k] = index of
    the estimated component matched to true component k. Tasks whose estimate is not finite get
    error NaN and perms -1.
    """
    C = l2_cost_matrix(est_weights, est_means, true_weights, true_means)
    B, K, _ = C.shape
    errors = np.full(B, np.nan)
    perms = np.full((B, K), -1, dtype=np.int64)
    for b in range(B):
        if not np.isfinite(C[b]).all():
            continue
        rows, cols = linear_sum_assignment(C[b])  # rows == arange(K) for a square matrix
        perms[b, rows] = cols
        errors[b] = C[b, rows, cols].mean()
    return errors, perms


def clustering_accuracy(x: ArrayLike, mask: ArrayLike, labels: ArrayLike, est_weights: ArrayLike,
                        est_means: ArrayLike, est_scales: ArrayLike | None = None) -> np.ndarray:
    """Fraction of real points labelled correctly by the estimate's MAP assignment, under the best
    one-to-one relabelling (Hungarian on the confusion matrix): (B,). NaN for non-finite estimates."""
    x_, w, m, s = _t(x), _t(est_weights), _t(est_means), _t(est_scales)
    mask_ = _t(mask, torch.bool)
    y = _t(labels, torch.long)
    B, N, d = x_.shape
    Ke = m.shape[1]
    pred = torch.empty(B, N, dtype=torch.long)
    for a, b in _task_chunks(B, N * Ke * d):
        pred[a:b] = posterior_labels(x_[a:b], w[a:b], m[a:b], None if s is None else s[a:b])
    L = max(Ke, int(y[mask_].max()) + 1 if mask_.any() else 1)  # square confusion matrix
    # confusion[b, true, pred] over real points only (padding has label -1 and mask False)
    task = torch.arange(B)[:, None].expand(B, N)
    flat = (task * L * L + y.clamp_min(0) * L + pred)[mask_]
    conf = torch.bincount(flat, minlength=B * L * L).reshape(B, L, L).numpy()
    n = mask_.sum(1).numpy()
    acc = np.full(B, np.nan)
    finite = _finite_tasks(w, m, s).numpy()
    for b in range(B):
        if not finite[b] or n[b] == 0:
            continue
        rows, cols = linear_sum_assignment(conf[b], maximize=True)
        acc[b] = conf[b, rows, cols].sum() / n[b]
    return acc


def log_likelihood(x: ArrayLike, mask: ArrayLike, est_weights: ArrayLike, est_means: ArrayLike,
                   est_scales: ArrayLike | None = None) -> np.ndarray:
    """Average log-likelihood per real point under the estimate, in float64: (B,)."""
    x_, w, m, s = _t(x), _t(est_weights), _t(est_means), _t(est_scales)
    mask_ = _t(mask, torch.bool)
    B, N, d = x_.shape
    out = torch.empty(B, dtype=torch.float64)
    for a, b in _task_chunks(B, N * m.shape[1] * d):
        out[a:b] = mean_log_likelihood(x_[a:b], mask_[a:b], w[a:b], m[a:b], None if s is None else s[a:b])
    out[~_finite_tasks(w, m, s)] = float("nan")
    return out.numpy()
