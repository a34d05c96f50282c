"""The mixture of linear regressions in context (Jin, Balasubramanian, Lai 2024): the network reads a
prompt of examples from the symmetric two-component mixture y = +-<beta, x> + noise and outputs
beta (up to its sign), or from a K-component mixture (task.components >= 3) and outputs K
regressors (in any order); classical estimators are EM (exact weighted-least-squares M step, or the
construction's gradient M step), the oracle that knows every example's component, and ordinary
least squares (pipeline/algorithms/mixture_regression.py).

    config.py   task and solver parameters (params.yaml task.mixreg, baselines.mixreg)
    data.py     the sampler, MixRegBatch / MixRegEstimate, the sign-aligned error
    net.py      read-in: a token per example [x_i, y_i, y_i x_i, 0] + a read-out token; the read-out
                (models/heads.py) is a Linear there
"""
from __future__ import annotations

import dataclasses

import torch

from pipeline.core import rng
from pipeline.core.family import Metric, SolverSpec, TaskFamily, solver_name
from pipeline.core.probe import ProbeTarget
from pipeline.families.mixreg import config as C
from pipeline.families.mixreg.data import (MixRegBatch, MixRegEstimate, estimate_error, pairwise_sq, sample_mixreg,
                                           sign_aligned_error)

_DEFAULTS = dataclasses.asdict(C.MixRegSolvers())


def _A():
    from pipeline.algorithms import mixture_regression

    return mixture_regression


def _beta_error(batch, est):
    """(B,) min_s ||s beta_hat - beta||^2 (K >= 3: the matched mean over components): the excess squared
    prediction error over the true regressor for a query x ~ N(0, I) whose component is known."""
    return estimate_error(est.beta.double().cpu(), batch.to("cpu", torch.float64))


def _oracle(b):
    """The least squares that knows every example's component: (B, d) symmetric, else (B, K, d)."""
    if b.symmetric:
        return _A().oracle_ls(b.xs, b.ys, b.signs)
    return _A().oracle_components(b.xs, b.ys, b.comps, b.K)


def _vs_oracle(batch, est):
    """(B,) the excess error relative to the oracle least squares' (knows every c_i) on the same prompt."""
    b = batch.to("cpu", torch.float64)
    return _beta_error(batch, est) / estimate_error(_oracle(b), b).clamp_min(1e-30)


def _start(batch, seed: int):
    """A unit start per task, task i's from (seed, SOLVER, 13, i): (B, d) symmetric, else (B, K, d)."""
    shape = (batch.d,) if batch.symmetric else (batch.K, batch.d)
    v = rng.per_task_draws(seed, batch.task_index(), lambda g: torch.randn(*shape, generator=g, device=g.device),
                           rng.SOLVER, 13, device=batch.device).double()
    return v / v.norm(dim=-1, keepdim=True)


class EM:
    """EM from a random unit start (start "random") or the spectral start (start "spectral")."""

    def __init__(self, name: str, iters: int, seed: int, m_step: str = "exact", gd_steps: int = 5, lr: float = 1.0,
                 start: str = "random"):
        self.name, self.iters, self.seed, self.m_step, self.gd_steps, self.lr = name, iters, seed, m_step, gd_steps, lr
        self.start = start

    def __call__(self, batch: MixRegBatch) -> MixRegEstimate:
        b = batch.to(batch.device, torch.float64)
        if not b.symmetric:
            if self.start == "spectral":
                return MixRegEstimate(torch.zeros(b.B, b.K, b.d), applicable=False,
                                      reason="the spectral start is for the symmetric two-component mixture")
            its = _A().em_components_iterates(b.xs, b.ys, b.sigma, _start(batch, self.seed), [self.iters],
                                              self.m_step, self.gd_steps, self.lr)
            return MixRegEstimate(its[0].float())
        b0 = _A().spectral_start(b.xs, b.ys) if self.start == "spectral" else _start(batch, self.seed)
        beta = _A().em_iterates(b.xs, b.ys, b.sigma, b0, [self.iters], self.m_step, self.gd_steps, self.lr)[0]
        return MixRegEstimate(beta.float())


class Oracle:
    name = "oracle"

    def __call__(self, batch):
        return MixRegEstimate(_oracle(batch.to(batch.device, torch.float64)).float())


class OLS:
    name = "ols"

    def __call__(self, batch):
        b = batch.to(batch.device, torch.float64)
        return MixRegEstimate(_A().ols(b.xs, b.ys).float())


def _em(p, seed, task):
    return EM(solver_name("em", p, _DEFAULTS, ("em_iters",)), p["em_iters"], seed)


def _em_spectral(p, seed, task):
    return EM(solver_name("em_spectral", p, _DEFAULTS, ("em_iters",)), p["em_iters"], seed, start="spectral")


def _em_gd(p, seed, task):
    return EM(solver_name("em_gd", p, _DEFAULTS, ("em_iters", "gd_steps", "gd_lr")), p["em_iters"], seed, "gd",
              p["gd_steps"], p["gd_lr"])


def _em_probe(batch, steps, p):
    b = batch.to(batch.device, torch.float64)
    run = _A().em_iterates if b.symmetric else _A().em_components_iterates
    its = run(b.xs, b.ys, b.sigma, _start(batch, int(p["seed"])), list(steps))
    return [MixRegEstimate(beta.float()) for beta in its]


class MixRegFamily(TaskFamily):
    name = "mixreg"
    TaskConfig = C.MixRegTask
    SolverConfig = C.MixRegSolvers
    batch_type = MixRegBatch
    monitor = "val/beta_error"
    metrics = {
        "beta_error": Metric("beta_error", "lower", "min_s ||s beta_hat - beta||^2",
                             "squared distance to the true beta, the better sign: the excess squared prediction error "
                             "over the true-beta predictor for a query of known component", _beta_error, log_scale=True),
        "vs_oracle": Metric("vs_oracle", "lower", "excess error / the oracle's",
                            "beta_error divided by that of least squares knowing every example's component (1 = as "
                            "good as the oracle)", _vs_oracle, log_scale=True),
    }
    solvers = {
        "em": SolverSpec(_em, uses=("em_iters",)),
        "em_spectral": SolverSpec(_em_spectral, uses=("em_iters",), help="EM from the spectral start"),
        "em_gd": SolverSpec(_em_gd, uses=("em_iters", "gd_steps", "gd_lr")),
        "oracle": SolverSpec(lambda p, seed, task: Oracle(), help="knows every c_i"),
        "ols": SolverSpec(lambda p, seed, task: OLS(), help="ignores the mixture"),
    }
    probe_targets = {"em": ProbeTarget(_em_probe, "EM iterations (exact M step)", log_steps=True)}

    def validate(self, task, model, where):
        C.validate(task, model, where)

    def describe(self, task) -> str:
        snr = f"{task.snr:g}" if task.snr == task.snr_max else f"{task.snr:g}-{task.snr_max:g}"
        k = "" if task.components == 2 else f", K = {task.components} regressors"
        return f"d={task.d}, {task.n_points} examples, SNR {snr}{k}"

    def sample(self, task, group, batch_size, generator, device, step=None):
        return sample_mixreg(batch_size, task.d, task.n_points, generator, device, snr=task.snr, snr_max=task.snr_max,
                             components=task.components)

    @staticmethod
    def _answers(task) -> int:
        """Read-out tokens: one beta for the symmetric mixture, K regressors otherwise."""
        return 1 if task.components == 2 else task.components

    def read_in(self, task, model):
        from pipeline.families.mixreg.net import ReadIn

        return ReadIn(task.d, model.n_embd, self._answers(task))

    def read_out(self, task, model, group):
        from pipeline.models.heads import LastTokensHead

        return LastTokensHead(model.n_embd, task.d, self._answers(task))  # (B, d) | (B, K, d)

    def loss(self, out, batch, task):
        """Symmetric mixture: ||beta_hat beta_hat' - beta beta'||_F^2 = |beta_hat|^4 - 2 (beta_hat . beta)^2 + 1,
        sign-invariant and smooth (the min over signs of ||beta_hat -+ beta||^2 is not); the minimiser is
        beta_hat = +-beta. K regressors: the mean over components of ||beta_hat_pi(k) - beta_k||^2 under the
        best matching pi (core/matching.py; the gradient flows through the matched pairs)."""
        if not batch.symmetric:
            from pipeline.core.matching import matched_costs

            err = matched_costs(pairwise_sq(out.float(), batch.betas.float())).mean(1)  # (B,)
            return {"loss": err.mean(), "beta_error": err.mean().detach()}
        bh, b = out.float(), batch.beta.float()
        loss = bh.pow(2).sum(-1).pow(2) - 2 * (bh * b).sum(-1).pow(2) + b.pow(2).sum(-1).pow(2)
        return {"loss": loss.mean(), "beta_error": sign_aligned_error(bh, b).mean().detach()}

    def decode(self, out, batch) -> MixRegEstimate:
        return MixRegEstimate(out.float())

    def residual(self, est: MixRegEstimate, batch: MixRegBatch):
        """(B, d) s beta_hat - beta with the better sign s; K regressors: (B, K d), the matched differences."""
        if not batch.symmetric:
            from pipeline.core.matching import matched_assignment

            bh, b = est.beta.to(batch.device).double(), batch.betas.double()
            pi = matched_assignment(pairwise_sq(bh, b))  # (B, K)
            picked = torch.gather(bh, 1, pi[..., None].expand_as(b))
            return (picked - b).flatten(1)
        bh, b = est.beta.to(batch.beta.device).double(), batch.beta.double()
        s = torch.where((bh - b).pow(2).sum(-1, keepdim=True) <= (bh + b).pow(2).sum(-1, keepdim=True), 1.0, -1.0)
        return s * bh - b


FAMILY = MixRegFamily()
