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
from pipeline.core.probe import ProbeTarget
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


def _iterates(kind: str):
    """Probe target: the predictions after each of `steps` iterations, one RegEstimate per step."""

    def fn(batch: LinRegBatch, steps: list[int], p: dict) -> list[RegEstimate]:
        R = _R()
        if kind == "online_gd":
            W = R.online_gd_iterates(batch.xs, batch.ys, steps, p["online_lr"])
        else:
            S, b, _ = R.prefix_stats(batch.xs, batch.ys)
            W = R.gd_iterates(S, b, steps, p["gd_lr"]) if kind == "gd" else R.newton_iterates(S, b, steps,
                                                                                               p["newton_alpha"])
        preds = (W * batch.xs.to(W.dtype)).sum(-1)  # (S, B, n)
        return [RegEstimate(preds=pk) for pk in preds]

    return fn


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
        "online_gd": _solver("online_gd", ("online_passes", "online_lr"),
                             lambda p: lambda x, y: _R().online_gd(x, y, p["online_passes"], p["online_lr"])),
    }
    # What probing compares layers with (core/probe.py): the iterates of each algorithm on a steps axis.
    probe_targets = {
        "newton": ProbeTarget(_iterates("newton"), "iterative Newton steps"),
        "gd": ProbeTarget(_iterates("gd"), "gradient-descent steps", log_steps=True),
        "online_gd": ProbeTarget(_iterates("online_gd"), "online-GD passes"),
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

    # ------------------------------------------------------------------ probing (core/probe.py)
    def residual(self, est: RegEstimate, batch: LinRegBatch):
        """(B, n - 1): prediction - y at every prefix k >= 1 (at k = 0 every method predicts 0, which
        would add the same term to every similarity)."""
        return (est.preds.to(batch.ys.device).double() - batch.ys.double())[:, 1:]

    def probe_features(self, states, mask, batch):
        """The read-out is linear at the x_i positions: features (B, n, C), targets y (B, n)."""
        return states[:, 0::2], batch.ys

    def probe_decode(self, preds, batch) -> RegEstimate:
        return RegEstimate(preds=preds)


FAMILY = LinRegFamily()
