"""The permutation-matched training loss of the GMM family."""
from __future__ import annotations

import itertools
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.families.gmm.data import GMMBatch


@lru_cache(maxsize=None)
def _perms(K: int) -> Tensor:
    return torch.tensor(list(itertools.permutations(range(K))), dtype=torch.long)  # (K!, K)


def matched_loss(logits: Tensor, means: Tensor, batch: GMMBatch, scales: Tensor | None = None) -> dict[str, Tensor]:
    """Loss with predictions matched to the truth by the best of the K! permutations, per task.

    cost(sigma) = mean_k,j (mu_hat_sigma(k),j - mu_k,j)^2  +  KL(pi || softmax(logits)_sigma)
                  [+ mean squared error of log-scales when the network predicts scales]
    Every term is a sum over true components k of a pairwise cost C[k, sigma(k)], so the costs of
    all permutations come from one (B, K, K) matrix gathered along perms (P, K) (perms[p, k] = the
    prediction matched to true component k): (B, K, K, d) work instead of (B, K!, K, d). Returns
    the loss (mean over tasks of the minimal cost) and, for monitoring, the paper's l2 metric at the
    matching that minimises it.
    """
    B, K, d = means.shape
    P = _perms(K).to(means.device)  # (P, K)
    ks = torch.arange(K, device=means.device)
    means, logits = means.float(), logits.float()

    def over_perms(C: Tensor) -> Tensor:  # pairwise (B, K true, K predicted) -> per permutation (B, P)
        return C[:, ks, P].sum(-1)

    # pairwise[b, k, j]: true component k matched with prediction j
    c_mse = (means[:, None, :, :] - batch.means[:, :, None, :]).pow(2).sum(-1) / (K * d)  # (B, K, K)
    w = batch.weights  # (B, K)
    c_kl = w[:, :, None] * (torch.log(w)[:, :, None] - F.log_softmax(logits, -1)[:, None, :])  # (B, K, K)
    pair = c_mse + c_kl
    if scales is not None and batch.scales is not None:
        ls, lt = torch.log(scales.float()), torch.log(batch.scales)
        pair = pair + (ls[:, None, :, :] - lt[:, :, None, :]).pow(2).sum(-1) / (K * d)
    cost = over_perms(pair)  # (B, P)
    best = cost.argmin(1)  # (B,)
    pick = lambda t: t.gather(1, best[:, None]).mean()  # noqa: E731
    mse = over_perms(c_mse)
    with torch.no_grad():  # the paper's metric: (1/K) sum_k [ |dmu|^2/d + dpi^2 ], minimised over sigma
        c_w = (torch.softmax(logits, -1)[:, None, :] - w[:, :, None]).pow(2) / K  # (B, K, K)
        l2 = over_perms(c_mse.detach() + c_w).min(1).values
    return {"loss": pick(cost), "mse": pick(mse), "kl": pick(over_perms(c_kl)), "l2": l2.mean()}
