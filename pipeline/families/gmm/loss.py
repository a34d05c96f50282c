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
    perms[p, k] = index of the prediction matched to true component k. Returns the loss (mean over
    tasks of the minimal cost) and, for monitoring, the paper's l2 metric at the matching that
    minimises it.
    """
    B, K, d = means.shape
    P = _perms(K).to(means.device)  # (P, K)
    means, logits = means.float(), logits.float()
    pm = means[:, P]  # (B, P, K, d)
    mse = (pm - batch.means[:, None]).pow(2).mean(dim=(-1, -2))  # (B, P)
    logp = F.log_softmax(logits, -1)[:, P]  # (B, P, K)
    w = batch.weights[:, None]  # (B, 1, K)
    kl = (w * (torch.log(w) - logp)).sum(-1)  # (B, P)
    cost = mse + kl
    if scales is not None and batch.scales is not None:
        cost = cost + (torch.log(scales.float()[:, P]) - torch.log(batch.scales[:, None])).pow(2).mean(dim=(-1, -2))
    best = cost.argmin(1)  # (B,)
    loss = cost.gather(1, best[:, None]).mean()
    with torch.no_grad():  # the paper's metric: (1/K) sum_k [ |dmu|^2/d + dpi^2 ], minimised over sigma
        pw = torch.softmax(logits, -1)[:, P]
        l2 = (mse + (pw - batch.weights[:, None]).pow(2).mean(-1)).min(1).values
    return {"loss": loss, "mse": mse.gather(1, best[:, None]).mean(), "kl": kl.gather(1, best[:, None]).mean(),
            "l2": l2.mean()}
