"""In-context linear regression (Garg et al. 2022): a causal transformer reads a prompt
x_1, y_1, ..., x_n, y_n and predicts every y_i from the examples before it; classical solvers
answer for every prefix length at once (pipeline/algorithms/regression.py).

    config.py   task and solver parameters (params.yaml task.linreg, baselines.linreg), the curriculum
    data.py     the sampler, LinRegBatch / RegEstimate, the interleaved tokens
    net.py      read-in Linear(d -> width), read-out Linear(width -> 1) at the x positions
"""
from __future__ import annotations

import dataclasses

import torch

from pipeline.core.family import Metric, SolverSpec, TaskFamily, solver_name
from pipeline.families.linreg import config as C
from pipeline.families.linreg.data import LinRegBatch, RegEstimate, sample_linreg

_DEFAULTS = dataclasses.asdict(C.LinRegSolvers())


def _sq_error(batch, est):
    """(B, n) squared error of the prediction at every prefix length, divided by d."""
    return (est.preds.double().cpu() - batch.ys.double().cpu()).pow(2) / batch.d


class PrefixSolver:
    """A function (xs, ys) -> preds (B, n) answering through the Solver interface."""

    def __init__(self, name: str, fn):
        self.name, self.fn = name, fn

    def __call__(self, batch: LinRegBatch) -> RegEstimate:
        return RegEstimate(preds=self.fn(batch.xs, batch.ys))


def _solver(base: str, uses: tuple[str, ...], make):
    def factory(p: dict, seed: int, task) -> PrefixSolver:
        return PrefixSolver(solver_name(base, p, _DEFAULTS, uses), make(p))

    return SolverSpec(factory, uses=uses)


def _R():
    from pipeline.algorithms import regression

    return regression


class LinRegFamily(TaskFamily):
    name = "linreg"
    TaskConfig = C.LinRegTask
    SolverConfig = C.LinRegSolvers
    batch_type = LinRegBatch
    monitor = "val/mse"
    metrics = {
        "sq_error": Metric("sq_error", "lower", "squared error / d",
                           "(y_hat_k - y_k)^2 / d for the query after k in-context examples (Garg et al.'s "
                           "normalised error: 1 for the zero predictor on isotropic tasks)",
                           _sq_error, axis="k"),
    }
    solvers = {
        "least_squares": _solver("least_squares", (), lambda p: _R().least_squares),
        "ridge": _solver("ridge", ("ridge_lambda",), lambda p: lambda x, y: _R().ridge(x, y, p["ridge_lambda"])),
        "averaging": _solver("averaging", (), lambda p: _R().averaging),
        "knn": _solver("knn", ("knn",), lambda p: lambda x, y: _R().nearest_neighbours(x, y, p["knn"])),
        "gd": _solver("gd", ("gd_steps", "gd_lr"),
                      lambda p: lambda x, y: _R().gradient_descent(x, y, p["gd_steps"], p["gd_lr"])),
        "newton": _solver("newton", ("newton_steps", "newton_alpha"),
                          lambda p: lambda x, y: _R().iterative_newton(x, y, p["newton_steps"], p["newton_alpha"])),
    }

    def validate(self, task, model, where):
        C.validate(task, model, where)

    def describe(self, task) -> str:
        return f"d={task.d}, {task.n_points} points" + (f", condition {task.condition:g}" if task.condition != 1 else "")

    def sample(self, task, group, batch_size, generator, device, step=None):
        dims, n = C.curriculum(task, step)
        return sample_linreg(batch_size, task.d, n, generator, device, active_dims=dims, noise_std=task.noise_std,
                             condition=task.condition)

    def read_in(self, task, model):
        from pipeline.families.linreg.net import ReadIn

        return ReadIn(task.d, model.n_embd)

    def read_out(self, task, model, group):
        from pipeline.families.linreg.net import ReadOut

        return ReadOut(model.n_embd)

    def loss(self, preds, batch, task):
        mse = (preds.float() - batch.ys.float()).pow(2).mean()  # over every prefix, as in Garg et al.
        return {"loss": mse, "mse": mse.detach()}

    def decode(self, preds, batch) -> RegEstimate:
        return RegEstimate(preds=preds.float())


FAMILY = LinRegFamily()
