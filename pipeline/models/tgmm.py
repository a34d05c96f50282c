"""TGMM network: read-in [x_i ; embed(K)] -> shared backbone -> one attentive-pooling read-out per K.

The backbone comes from the registry (models/backbone.py), so the read-in and read-out here are the
same whichever sequence model sits in the middle.

Also the permutation-matched loss and the adaptor that makes a trained network a Solver.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import ModelConfig
from pipeline.models.backbone import build_backbone
from pipeline.tasks.gmm import GMMBatch, GMMEstimate


class PoolingHead(nn.Module):
    """K learned queries attend over the sample; each query becomes one component's
    (weight logit, mean[, log-scale]). Extra parameters per K: O(K*D + D*d)."""

    def __init__(self, K: int, n_embd: int, n_head: int, d: int, scales: bool):
        super().__init__()
        self.K, self.d, self.n_head, self.scales = K, d, n_head, scales
        self.query = nn.Parameter(torch.randn(K, n_embd) * 0.02)
        self.kv = nn.Linear(n_embd, 2 * n_embd)
        self.out = nn.Sequential(nn.LayerNorm(n_embd), nn.Linear(n_embd, n_embd), nn.GELU(),
                                 nn.Linear(n_embd, 1 + d + (d if scales else 0)))

    def forward(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        B, N, C = h.shape
        hd = C // self.n_head
        k, v = self.kv(h).split(C, dim=2)
        k, v = (t.view(B, N, self.n_head, hd).transpose(1, 2) for t in (k, v))  # (B, h, N, hd)
        q = self.query.view(1, self.K, self.n_head, hd).transpose(1, 2).expand(B, -1, -1, -1)  # (B, h, K, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # (B, h, K, hd)
        y = y.transpose(1, 2).reshape(B, self.K, C) + self.query
        o = self.out(y)  # (B, K, 1 + d [+ d])
        logits, means = o[..., 0], o[..., 1:1 + self.d]
        scales = F.softplus(o[..., 1 + self.d:]) + 1e-3 if self.scales else None
        return logits, means, scales


class TGMMNet(nn.Module):
    def __init__(self, d: int, ks: list[int], cfg: ModelConfig, scales: bool = False):
        super().__init__()
        self.d, self.ks, self.cfg, self.predict_scales = d, list(ks), cfg, scales
        self.k_embed = nn.Embedding(max(ks) + 1, cfg.k_embd)
        self.read_in = nn.Linear(d + cfg.k_embd, cfg.n_embd)
        self.backbone = build_backbone(cfg)  # transformer | mamba2 | lstm, all (h, mask) -> (states, hidden)
        self.heads = nn.ModuleDict({str(K): PoolingHead(K, cfg.n_embd, cfg.n_head, d, scales) for K in ks})

    def encode(self, x: Tensor, mask: Tensor, k: Tensor, return_hidden: bool = False):
        """x (B, N, d), mask (B, N), k (B,) component counts -> states (B, N, D) [, per-layer states]."""
        B, N, _ = x.shape
        tok = torch.cat([x, self.k_embed(k)[:, None, :].expand(B, N, -1)], dim=-1)
        return self.backbone(self.read_in(tok), mask, return_hidden)

    def forward(self, x: Tensor, mask: Tensor, K: int) -> tuple[Tensor, Tensor, Tensor | None]:
        if str(K) not in self.heads:
            raise ValueError(f"this network was trained for K in {self.ks}, not K={K}")
        k = torch.full((x.shape[0],), K, dtype=torch.long, device=x.device)
        h, _ = self.encode(x, mask, k)
        return self.heads[str(K)](h, mask)

    def forward_many(self, batches: dict[int, GMMBatch]) -> dict[int, tuple[Tensor, Tensor, Tensor | None]]:
        """One backbone pass for several K at once (batches share N and d), then each K's head."""
        ks = list(batches)
        x = torch.cat([batches[K].x for K in ks])
        mask = torch.cat([batches[K].mask for K in ks])
        k = torch.cat([torch.full((batches[K].B,), K, dtype=torch.long, device=x.device) for K in ks])
        h, _ = self.encode(x, mask, k)
        out, start = {}, 0
        for K in ks:
            stop = start + batches[K].B
            out[K] = self.heads[str(K)](h[start:stop], mask[start:stop])
            start = stop
        return out


def count_parameters(d: int, ks: list[int], cfg: ModelConfig, scales: bool = False) -> int:
    """Trainable parameters of TGMMNet(d, ks, cfg): built on the meta device, so nothing is allocated."""
    with torch.device("meta"):
        net = TGMMNet(d, ks, cfg, scales)
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


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


class NetworkSolver:
    """A trained TGMMNet answering through the Solver interface."""

    def __init__(self, net: TGMMNet, name: str = "tgmm"):
        self.net, self.name = net, name

    @torch.no_grad()
    def __call__(self, batch: GMMBatch) -> GMMEstimate:
        self.net.eval()
        p = next(self.net.parameters())
        b = batch.to(p.device, p.dtype)
        logits, means, scales = self.net(b.x, b.mask, batch.K)
        return GMMEstimate(weights=torch.softmax(logits.float(), -1), means=means.float(),
                           scales=None if scales is None else scales.float())


def save_network(net: TGMMNet, path: str | Path, meta: dict | None = None) -> None:
    """Weights as safetensors + the architecture as JSON next to it (no pickle anywhere)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(path))
    spec = {"d": net.d, "ks": net.ks, "scales": net.predict_scales, "model": asdict(net.cfg), **(meta or {})}
    path.with_suffix(".json").write_text(json.dumps(spec, indent=2))


def load_network(path: str | Path, device: torch.device | str = "cpu") -> TGMMNet:
    from safetensors.torch import load_file

    path = Path(path)
    spec_path = path.with_suffix(".json")
    for p in (path, spec_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: trained network file not found (run the train stage first)")
    spec = json.loads(spec_path.read_text())
    net = TGMMNet(spec["d"], spec["ks"], ModelConfig(**spec["model"]), scales=spec["scales"])
    net.load_state_dict(load_file(str(path), device="cpu"))
    return net.to(device).eval()
