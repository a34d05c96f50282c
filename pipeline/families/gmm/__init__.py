"""Gaussian-mixture estimation (TGMM; Chen, Wu, Fang 2025): the network reads a sample from a
K-component mixture and answers with the weights and means (and scales when anisotropic).

    config.py   task and solver parameters (params.yaml task.gmm, baselines.gmm)
    data.py     the sampler, GMMBatch / GMMEstimate, densities
    net.py      read-in [x_i ; embed(K)] and the attentive-pooling read-out per K
    loss.py     the permutation-matched loss
    metrics.py  permutation-invariant l2 (Hungarian), clustering accuracy, log-likelihood
The classical solvers (EM, spectral) live in pipeline/algorithms/.
"""
from __future__ import annotations

import dataclasses

import torch

from pipeline.core.family import Metric, SolverSpec, TaskFamily, solver_name
from pipeline.core.probe import ProbeTarget
from pipeline.families.gmm import config as C
from pipeline.families.gmm.data import GMMBatch, GMMEstimate, sample_gmm


def _l2(batch, est):
    from pipeline.families.gmm.metrics import l2_error

    return l2_error(est.weights, est.means, batch.weights, batch.means)[0]


def _accuracy(batch, est):
    from pipeline.families.gmm.metrics import clustering_accuracy

    return clustering_accuracy(batch.x, batch.mask, batch.labels, est.weights, est.means, est.scales)


def _loglik(batch, est):
    from pipeline.families.gmm.metrics import log_likelihood

    return log_likelihood(batch.x, batch.mask, est.weights, est.means, est.scales)


def _em_paper(p: dict, seed: int, task) -> object:
    from pipeline.algorithms import EMPaper

    name = solver_name("em_paper", p, _DEFAULTS, FAMILY.solvers["em_paper"].uses)
    return EMPaper(max_iter=p["em_max_iter"], tol=p["em_tol"], seed=seed, name=name,
                   covariance="diag" if task.anisotropic else "identity")


def _em_strong(p: dict, seed: int, task) -> object:
    from pipeline.algorithms import EMStrong

    name = solver_name("em_strong", p, _DEFAULTS, FAMILY.solvers["em_strong"].uses)
    return EMStrong(restarts=p["strong_restarts"], max_iter=p["em_max_iter"], tol=p["em_tol"], seed=seed, name=name,
                    covariance="diag" if task.anisotropic else "identity")


def _spectral(p: dict, seed: int, task) -> object:
    from pipeline.algorithms import Spectral

    name = solver_name("spectral", p, _DEFAULTS, FAMILY.solvers["spectral"].uses)
    return Spectral(n_restarts=p["spectral_restarts"], n_iter=p["spectral_iters"], seed=seed, name=name,
                    anisotropic=task.anisotropic)


_DEFAULTS = dataclasses.asdict(C.GMMSolvers())


def _em_iterates(batch, steps: list[int], p: dict) -> list[GMMEstimate]:
    """Probe target: EM (paper protocol, start seeded by p["seed"]) after each of `steps` iterations,
    one GMMEstimate per step. Step counts start at 1 (the iterates hold no start)."""
    from pipeline.algorithms import EMPaper

    if not steps or any(int(s) < 1 for s in steps):
        raise ValueError(f"steps must be EM iteration counts >= 1, got {list(steps)}")
    res = EMPaper(max_iter=max(steps), tol=0.0, seed=int(p.get("seed", 0)), return_iterates=True)(batch)
    its = res.extras["iterates"]
    return [GMMEstimate(weights=its[min(s, len(its)) - 1][0], means=its[min(s, len(its)) - 1][1]) for s in steps]


class GMMFamily(TaskFamily):
    name = "gmm"
    TaskConfig = C.GMMTask
    SolverConfig = C.GMMSolvers
    batch_type = GMMBatch
    monitor = "val/l2"
    metrics = {
        "l2": Metric("l2", "lower", "permutation-invariant l2 error",
                     "(1/K) sum_k [ |mu_hat_s(k) - mu_k|^2 / d + (pi_hat_s(k) - pi_k)^2 ] at the Hungarian matching s",
                     _l2, log_scale=True),
        "accuracy": Metric("accuracy", "higher", "clustering accuracy",
                           "share of points assigned (argmax posterior under the estimate) to their true component, "
                           "labels matched by the Hungarian method", _accuracy),
        "loglik": Metric("loglik", "higher", "average log-likelihood",
                         "mean over real points of log p(x_i) under the estimated mixture", _loglik),
    }
    solvers = {
        "em_paper": SolverSpec(_em_paper, "EM as in the TGMM paper: uniform weights, means ~ N(0, I), one run",
                               uses=("em_max_iter", "em_tol")),
        "em_strong": SolverSpec(_em_strong, "EM from greedy k-means++ starts, several restarts, best likelihood",
                                uses=("strong_restarts", "em_max_iter", "em_tol")),
        "spectral": SolverSpec(_spectral, "Hsu-Kakade moment method with tensor power iteration; needs K <= d",
                               uses=("spectral_restarts", "spectral_iters")),
    }
    probe_targets = {"em_paper": ProbeTarget(_em_iterates, "EM iterations (paper start)", log_steps=True)}

    def validate(self, task, model, where):
        C.validate(task, model, where)

    def groups(self, task):
        return list(task.ks)

    def group_label(self, group) -> str:
        return f"K={group}"

    def group_of(self, batch):
        return batch.K

    def val_words(self, task, group):
        return (task.d, group)

    def describe(self, task) -> str:
        return f"d={task.d}" + (", anisotropic" if task.anisotropic else "")

    def sample(self, task, group, batch_size, generator, device, step=None, n: int | None = None):
        """Training tasks (N ~ U[n0/2, n0], n0 that of the step: config.n0_at); step=None: fixed-size
        tasks with N = n (default n0)."""
        if step is None:
            n_min = n_max = n or task.n0
        else:
            n0 = C.n0_at(task, step)
            n_min, n_max = n0 // 2, n0
        return sample_gmm(batch_size, task.d, group, n_min, n_max, generator, device, mean_range=task.mean_range,
                          max_cosine=task.max_cosine, weight_low=task.weight_low, weight_high=task.weight_high,
                          anisotropic=task.anisotropic)

    def sample_step(self, task, groups, batch_size, generator, device, step):
        """n_per = "step": one N ~ U[n0/2, n0] for the whole step (every K), so no task is padded;
        each task's N keeps its U[n0/2, n0] law, only tasks of one step share it."""
        if task.n_per == "task":
            return super().sample_step(task, groups, batch_size, generator, device, step)
        n0 = C.n0_at(task, step)
        n = int(torch.randint(n0 // 2, n0 + 1, (1,), generator=generator, device=device))
        return {K: self.sample(task, K, batch_size, generator, device, None, n=n) for K in groups}

    def read_in(self, task, model):
        from pipeline.families.gmm.net import ReadIn

        return ReadIn(task.d, max(task.ks), task.k_embd, model.n_embd)

    def read_out(self, task, model, group):
        from pipeline.families.gmm.net import PoolingHead

        return PoolingHead(group, model.n_embd, model.n_head, task.d, task.anisotropic)

    def loss(self, out, batch, task):
        from pipeline.families.gmm.loss import matched_loss

        logits, means, scales = out
        return matched_loss(logits, means, batch, scales)

    def decode(self, out, batch) -> GMMEstimate:
        logits, means, scales = out
        return GMMEstimate(weights=torch.softmax(logits.float(), -1), means=means.float(),
                           scales=None if scales is None else scales.float())

    def residual(self, est: GMMEstimate, batch: GMMBatch):
        """(B, K (d + 1)): estimate - truth of the means and weights, components matched to the truth
        by the Hungarian l2 matching (core/probe.py compares these vectors by cosine similarity)."""
        from pipeline.families.gmm.metrics import l2_error

        _, perms = l2_error(est.weights, est.means, batch.weights, batch.means)
        idx = torch.as_tensor(perms, device=est.means.device).clamp(min=0)  # (B, K); -1 (non-finite) -> NaN below
        means = est.means.double().gather(1, idx[..., None].expand(-1, -1, est.means.shape[-1]))
        weights = est.weights.double().gather(1, idx)
        r = torch.cat([(means - batch.means.double().to(means.device)).flatten(1),
                       weights - batch.weights.double().to(weights.device)], 1)
        bad = torch.as_tensor(perms[:, 0] < 0, device=r.device)
        return torch.where(bad[:, None], torch.full_like(r, float("nan")), r)

    def no_decay(self, param_name: str) -> bool:
        return "query" in param_name  # the pooling heads' learned queries


FAMILY = GMMFamily()
