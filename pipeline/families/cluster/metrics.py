"""Clustering metrics, batched on tensors: adjusted Rand index and normalised mutual information
with sklearn's definitions (including its degenerate cases), and the misclustering rate under the
best matching of labels (scipy's Hungarian algorithm).

All three read a per-task contingency table n_ab = #{i : true_i = a, pred_i = b} (B, K, K').
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def contingency(true: Tensor, pred: Tensor, K_true: int, K_pred: int, mask: Tensor | None = None) -> Tensor:
    """(B, N) labels in 0..K-1 -> (B, K_true, K_pred) float64 counts (padded points, mask False, left out)."""
    a = torch.nn.functional.one_hot(true.clamp_min(0).long(), K_true).double()
    b = torch.nn.functional.one_hot(pred.clamp_min(0).long(), K_pred).double()
    if mask is not None:
        a = a * mask[..., None].double()
    return a.transpose(1, 2) @ b


def adjusted_rand_index(C: Tensor) -> Tensor:
    """(B, K, K') contingency -> (B,) ARI, sklearn's pair-confusion form: 1.0 when the labelings
    agree on every pair (fn = fp = 0, e.g. both a single cluster)."""
    n = C.sum((1, 2))
    ss = C.pow(2).sum((1, 2))
    rows, cols = C.sum(2), C.sum(1)  # (B, K) true sizes, (B, K') predicted sizes
    tp = ss - n
    fp = cols.pow(2).sum(1) - ss
    fn = rows.pow(2).sum(1) - ss
    tn = n.pow(2) - fp - fn - ss
    den = (tp + fn) * (fn + tn) + (tp + fp) * (fp + tn)
    ari = 2.0 * (tp * tn - fn * fp) / torch.where(den == 0, torch.ones_like(den), den)
    return torch.where((fn == 0) & (fp == 0), torch.ones_like(ari), ari)


def _entropy(counts: Tensor, n: Tensor) -> Tensor:
    p = counts / n[:, None]
    return -(torch.where(p > 0, p * torch.log(p.clamp_min(1e-300)), torch.zeros_like(p))).sum(1)


def normalized_mutual_info(C: Tensor) -> Tensor:
    """(B, K, K') -> (B,) NMI with the arithmetic-mean normaliser (sklearn's default): 1.0 when both
    labelings have one cluster, 0.0 when the mutual information is 0 otherwise."""
    n = C.sum((1, 2))
    rows, cols = C.sum(2), C.sum(1)
    outer = rows[:, :, None] * cols[:, None, :]
    nz = C > 0
    mi = torch.where(nz, C / n[:, None, None] * (torch.log(C.clamp_min(1e-300) * n[:, None, None])
                                                 - torch.log(outer.clamp_min(1e-300))), torch.zeros_like(C)).sum((1, 2))
    mi = mi.clamp_min(0)
    h = (_entropy(rows, n) + _entropy(cols, n)) / 2
    nmi = mi / torch.where(h > 0, h, torch.ones_like(h))
    one_each = ((rows > 0).sum(1) == 1) & ((cols > 0).sum(1) == 1)
    nmi = torch.where(mi <= 1e-15, torch.zeros_like(nmi), nmi)
    return torch.where(one_each, torch.ones_like(nmi), nmi)


def best_matching(C: Tensor) -> np.ndarray:
    """(B, K, K) contingency -> (B, K) the predicted label matched to each true label (max agreement)."""
    from scipy.optimize import linear_sum_assignment

    Cn = C.detach().cpu().numpy()
    return np.stack([linear_sum_assignment(-c)[1] for c in Cn])


def misclustering_rate(C: Tensor) -> Tensor:
    """(B, K, K) -> (B,) share of points whose label disagrees with the truth under the best matching."""
    perm = torch.from_numpy(best_matching(C))  # (B, K)
    agree = torch.gather(C.cpu(), 2, perm[..., None])[..., 0].sum(1)
    return 1 - agree / C.sum((1, 2)).cpu()
