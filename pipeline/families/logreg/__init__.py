"""In-context logistic regression (Giannou et al. 2024): the network reads n labelled examples
(x_i, y_i = sign(x_i.w*)) and outputs the regularised logistic solution w_mu that damped Newton
finds; classical solvers are damped Newton and gradient descent with a line search, k steps each
(pipeline/algorithms/logistic.py).

    config.py   task and solver parameters (params.yaml task.logreg, baselines.logreg)
    data.py     the sampler (the target computed on the device), LogRegBatch / LogRegEstimate
    net.py      read-in: a token per example + a read-out token; read-out Linear(width -> d) there
"""
from __future__ import annotations

import dataclasses

import torch

from pipeline.core.family import Metric, SolverSpec, TaskFamily, solver_name
from pipeline.core.probe import ProbeTarget
from pipeline.families.logreg import config as C
from pipeline.families.logreg.data import LogRegBatch, LogRegEstimate, sample_logreg

_DEFAULTS = dataclasses.asdict(C.LogRegSolvers())


def _L():
    from pipeline.algorithms import logistic

    return logistic


def _w_error(batch, est):
    """(B,) ||w_hat - w_mu||^2 / d."""
    return (est.w.double().cpu() - batch.w_target.double().cpu()).pow(2).mean(-1)


def _excess_loss(batch, est):
    """(B,) L(w_hat) - L(w_mu) on the prompt: >= 0 up to the target's own rounding."""
    L = _L()
    X, y, mu = batch.xs.double().cpu(), batch.ys.double().cpu(), batch.mu_value
    return L.loss(est.w.double().cpu(), X, y, mu) - L.loss(batch.w_target.double().cpu(), X, y, mu)


def _accuracy(batch, est):
    return _L().accuracy(est.w.double().cpu(), batch.xt.double().cpu(), batch.yt.double().cpu())


class IterSolver:
    """k steps of an iterative solver from w = 0, answering through the Solver interface."""

    def __init__(self, name: str, kind: str, steps: int):
        self.name, self.kind, self.steps = name, kind, steps

    def __call__(self, batch: LogRegBatch) -> LogRegEstimate:
        L = _L()
        fn = L.damped_newton_iterates if self.kind == "newton" else L.gd_iterates
        return LogRegEstimate(w=fn(batch.xs, batch.ys, batch.mu_value, [self.steps])[0].float())


def _solver(kind: str, key: str):
    def factory(p: dict, seed: int, task) -> IterSolver:
        return IterSolver(solver_name(kind, p, _DEFAULTS, (key,)), kind, p[key])

    return SolverSpec(factory, uses=(key,))


def _iterates(kind: str):
    def fn(batch: LogRegBatch, steps: list[int], p: dict) -> list[LogRegEstimate]:
        L = _L()
        it = L.damped_newton_iterates if kind == "newton" else L.gd_iterates
        return [LogRegEstimate(w=w) for w in it(batch.xs, batch.ys, batch.mu_value, steps)]

    return fn


class LogRegFamily(TaskFamily):
    name = "logreg"
    TaskConfig = C.LogRegTask
    SolverConfig = C.LogRegSolvers
    batch_type = LogRegBatch
    monitor = "val/w_error"
    metrics = {
        "w_error": Metric("w_error", "lower", "||w - w_mu||^2 / d",
                          "squared distance to the regularised logistic solution w_mu (damped Newton, mu = 0.01), "
                          "divided by d (Giannou et al.'s metric)", _w_error, log_scale=True),
        "excess_loss": Metric("excess_loss", "lower", "excess regularised logistic loss",
                              "L(w) - L(w_mu) on the prompt, L = mean log(1 + exp(-y x.w)) + mu/2 ||w||^2",
                              _excess_loss, log_scale=True),
        "accuracy": Metric("accuracy", "higher", "test accuracy",
                           "share of fresh points of the task classified correctly by sign(x.w)", _accuracy),
    }
    solvers = {
        "newton": _solver("newton", "newton_steps"),
        "gd": _solver("gd", "gd_steps"),
    }
    probe_targets = {
        "newton": ProbeTarget(_iterates("newton"), "damped-Newton steps"),
        "gd": ProbeTarget(_iterates("gd"), "line-search GD steps", log_steps=True),
    }

    def validate(self, task, model, where):
        C.validate(task, model, where)

    def describe(self, task) -> str:
        return f"d={task.d}, {task.n_points} points" + (f", condition {task.condition:g}" if task.condition != 1 else "")

    def sample(self, task, group, batch_size, generator, device, step=None):
        return sample_logreg(batch_size, task.d, task.n_points, generator, device, condition=task.condition,
                             mu=task.mu, target_steps=task.target_steps, test_points=task.test_points)

    def read_in(self, task, model):
        from pipeline.families.logreg.net import ReadIn

        return ReadIn(task.d, model.n_embd)

    def read_out(self, task, model, group):
        from pipeline.families.logreg.net import ReadOut

        return ReadOut(model.n_embd, task.d)

    def loss(self, w, batch, task):
        err = (w.float() - batch.w_target.float()).pow(2).mean(-1)  # (B,) the anchor's MSE to w_mu
        return {"loss": err.mean(), "w_error": err.mean().detach()}

    def decode(self, w, batch) -> LogRegEstimate:
        return LogRegEstimate(w=w.float())

    # ------------------------------------------------------------------ probing (core/probe.py)
    def residual(self, est: LogRegEstimate, batch: LogRegBatch):
        """(B, d): w - w_mu."""
        return est.w.to(batch.w_target.device).double() - batch.w_target.double()

    def probe_features(self, states, mask, batch):
        """The read-out is linear at the read-out token: features (B, 1, C), targets w_mu (B, 1, d)."""
        return states[:, -1:], batch.w_target[:, None, :]

    def probe_decode(self, preds, batch) -> LogRegEstimate:
        return LogRegEstimate(w=preds[:, 0])


FAMILY = LogRegFamily()
