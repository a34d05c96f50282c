"""Clustering in context (He, Chen, Cao, Fan, Liu 2025, "Transformers versus the EM algorithm in
multi-class clustering"; the two-class spectral case of He et al., "Learning spectral methods by
transformers"): the network reads a sample from a K-class Gaussian mixture and outputs a label
distribution for every point. Classical solvers: Lloyd's algorithm (k-means++ restarts), EM (the
TGMM paper's protocol and the strong, k-means++-started one) with posterior labels, and for K = 2
the spectral algorithm (the sign of the centred sample's top principal direction).

    config.py   task and solver parameters (params.yaml task.cluster, baselines.cluster)
    data.py     the sampler (the GMM family's, one sample size), ClusterEstimate
    loss.py     the label-permutation-invariant cross-entropy (K! enumeration or Hungarian)
    metrics.py  ARI, NMI (sklearn's definitions, batched), misclustering rate (Hungarian)
    net.py      read-in [x_i ; embed(K)]; read-out a per-point Linear(width -> K) per K
"""
from __future__ import annotations

import dataclasses

import torch

from pipeline.core import rng
from pipeline.core.family import Metric, SolverSpec, TaskFamily, solver_name
from pipeline.core.probe import ProbeTarget
from pipeline.families.cluster import config as C
from pipeline.families.cluster.data import ClusterBatch, ClusterEstimate, sample_clusters
from pipeline.families.cluster.metrics import (adjusted_rand_index, contingency, misclustering_rate,
                                               normalized_mutual_info)

_DEFAULTS = dataclasses.asdict(C.ClusterSolvers())


def _table(batch, est):
    return contingency(batch.labels.cpu(), est.labels.cpu(), batch.K, batch.K, batch.mask.cpu())


def _ari(batch, est):
    return adjusted_rand_index(_table(batch, est))


def _nmi(batch, est):
    return normalized_mutual_info(_table(batch, est))


def _error(batch, est):
    return misclustering_rate(_table(batch, est))


def em_labels(est, batch) -> ClusterEstimate:
    """A GMM estimate (weights, means; identity covariance) -> posterior label distribution per point."""
    from pipeline.families.gmm.data import log_joint

    lj = log_joint(batch.x.to(est.means.dtype), est.weights, est.means)
    probs = torch.softmax(lj, -1)
    return ClusterEstimate(probs.argmax(-1), probs.float())


class EMLabels:
    """EM (paper protocol or strong) answering with posterior labels."""

    def __init__(self, em, name: str):
        self.em, self.name = em, name

    def __call__(self, batch: ClusterBatch) -> ClusterEstimate:
        return em_labels(self.em(batch), batch)


class Lloyd:
    """Lloyd's algorithm from `restarts` greedy k-means++ starts (task i's seeded by (seed, SOLVER, 5, i))."""

    def __init__(self, restarts: int, iters: int, seed: int, name: str = "lloyd"):
        self.restarts, self.iters, self.seed, self.name = restarts, iters, seed, name

    def __call__(self, batch: ClusterBatch) -> ClusterEstimate:
        from pipeline.algorithms.em import kmeans_plusplus, kmeans_uniforms
        from pipeline.algorithms.lloyd import lloyd_restarts

        B, K, R, dev = batch.B, batch.K, self.restarts, batch.device
        x = batch.x.double()
        u = rng.per_task_draws(self.seed, batch.task_index(), lambda g: torch.rand(R, kmeans_uniforms(K), generator=g,
                                                                                   device=dev), rng.SOLVER, 5, device=dev)
        xr = x.repeat_interleave(R, 0)  # row b*R + r: restart r of task b
        centers, _ = kmeans_plusplus(xr, batch.mask.repeat_interleave(R, 0), K, uniforms=u.reshape(B * R, -1))
        res = lloyd_restarts(x, centers.view(B, R, K, -1), self.iters)
        return ClusterEstimate(res.labels)


class Spectral2:
    """K = 2: the sign of each centred point's projection on the top principal direction (equivalently
    the top eigenvector of the centred Gram matrix). Not applicable for K > 2."""

    name = "spectral"

    def __call__(self, batch: ClusterBatch) -> ClusterEstimate:
        if batch.K != 2:
            return ClusterEstimate(torch.zeros(batch.B, batch.x.shape[1], dtype=torch.long), applicable=False,
                                   reason="the two-class spectral algorithm needs K = 2")
        x = batch.x.double()
        xc = x - x.mean(1, keepdim=True)
        v = torch.linalg.eigh(xc.transpose(1, 2) @ xc)[1][..., -1]  # (B, d) top direction
        return ClusterEstimate(((xc @ v[..., None])[..., 0] > 0).long())


def _lloyd(p, seed, task):
    return Lloyd(p["lloyd_restarts"], p["lloyd_iters"], seed,
                 solver_name("lloyd", p, _DEFAULTS, ("lloyd_restarts", "lloyd_iters")))


def _em_paper(p, seed, task):
    from pipeline.algorithms import EMPaper

    name = solver_name("em_paper", p, _DEFAULTS, ("em_max_iter", "em_tol"))
    return EMLabels(EMPaper(max_iter=p["em_max_iter"], tol=p["em_tol"], seed=seed), name)


def _em_strong(p, seed, task):
    from pipeline.algorithms import EMStrong

    name = solver_name("em_strong", p, _DEFAULTS, ("strong_restarts", "em_max_iter", "em_tol"))
    return EMLabels(EMStrong(restarts=p["strong_restarts"], max_iter=p["em_max_iter"], tol=p["em_tol"], seed=seed), name)


def _em_iterates(batch, steps, p):
    """Probe target: paper-protocol EM's posterior labels after each of `steps` iterations (>= 1)."""
    from pipeline.algorithms import EMPaper
    from pipeline.families.gmm.data import GMMEstimate

    res = EMPaper(max_iter=max(steps), tol=0.0, seed=int(p.get("seed", 0)), return_iterates=True)(batch)
    its = res.extras["iterates"]
    return [em_labels(GMMEstimate(*its[min(s, len(its)) - 1]), batch) for s in steps]


class ClusterFamily(TaskFamily):
    name = "cluster"
    TaskConfig = C.ClusterTask
    SolverConfig = C.ClusterSolvers
    batch_type = ClusterBatch
    monitor = "val/loss"
    uses = ("gmm",)  # the GMM sampler and batch (families/gmm/data.py)
    metrics = {
        "ari": Metric("ari", "higher", "adjusted Rand index", "agreement of the predicted and true partitions over "
                      "pairs of points, chance-corrected (sklearn's adjusted_rand_score; 1 = identical)", _ari),
        "nmi": Metric("nmi", "higher", "normalised mutual information", "mutual information of the two labelings over "
                      "the mean of their entropies (sklearn's normalized_mutual_info_score)", _nmi),
        "error": Metric("error", "lower", "misclustering rate", "share of points mislabelled under the best matching "
                        "of predicted to true labels (Hungarian)", _error),
    }
    solvers = {
        "lloyd": SolverSpec(_lloyd, uses=("lloyd_restarts", "lloyd_iters")),
        "em_paper": SolverSpec(_em_paper, uses=("em_max_iter", "em_tol")),
        "em_strong": SolverSpec(_em_strong, uses=("strong_restarts", "em_max_iter", "em_tol")),
        "spectral": SolverSpec(lambda p, seed, task: Spectral2(), help="K = 2 only"),
    }
    probe_targets = {"em_paper": ProbeTarget(_em_iterates, "EM iterations (paper protocol)", log_steps=True)}

    def validate(self, task, model, where):
        C.validate(task, model, where)

    def groups(self, task):
        return list(task.ks)

    def group_label(self, group) -> str:
        return f"K={group}"

    def val_words(self, task, group):
        return (int(group),)

    def group_of(self, batch):
        return batch.K

    def describe(self, task) -> str:
        sep = (f"{task.separation:g}" if task.separation == task.separation_max
               else f"{task.separation:g}-{task.separation_max:g}")
        return f"d={task.d}, n={task.n_points}, separation {sep}"

    def sample(self, task, group, batch_size, generator, device, step=None):
        return sample_clusters(batch_size, task.d, int(group), task.n_points, generator, device,
                               separation=task.separation, separation_max=task.separation_max,
                               max_cosine=task.max_cosine)

    def read_in(self, task, model):
        from pipeline.families.cluster.net import ReadIn

        return ReadIn(task.d, max(task.ks), task.k_embd, model.n_embd)

    def read_out(self, task, model, group):
        from pipeline.families.cluster.net import ReadOut

        return ReadOut(model.n_embd, int(group))

    def loss(self, logits, batch, task):
        from pipeline.families.cluster.loss import matched_cross_entropy

        ce = matched_cross_entropy(torch.log_softmax(logits.float(), -1), batch.labels, batch.mask)
        return {"loss": ce.mean(), "ce": ce.mean().detach()}

    def decode(self, logits, batch) -> ClusterEstimate:
        probs = torch.softmax(logits.float(), -1)
        return ClusterEstimate(probs.argmax(-1), probs)

    # ------------------------------------------------------------------ probing (core/probe.py)
    def residual(self, est: ClusterEstimate, batch: ClusterBatch):
        """(B, N K): the label distribution, its labels matched to the truth (Hungarian), minus the one-hot truth."""
        from pipeline.families.cluster.metrics import best_matching

        K = batch.K
        probs = est.probs if est.probs is not None else torch.nn.functional.one_hot(est.labels, K).float()
        probs = probs.to(batch.labels.device).double()
        perm = torch.from_numpy(best_matching(contingency(batch.labels, probs.argmax(-1), K, K, batch.mask)))
        matched = torch.gather(probs, 2, perm.to(probs.device)[:, None, :].expand(-1, probs.shape[1], -1))
        truth = torch.nn.functional.one_hot(batch.labels.clamp_min(0), K).double()
        return ((matched - truth) * batch.mask[..., None]).flatten(1)


FAMILY = ClusterFamily()
