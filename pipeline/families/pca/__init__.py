"""PCA in context (He et al. 2025, "Learning spectral methods by transformers"): the network reads
a sample matrix X (n points in d dimensions) and outputs the top-k eigenvectors and eigenvalues of
its sample covariance; classical solvers are the power method with deflation, block power
iteration and exact eigh (pipeline/algorithms/power.py). Every metric is sign-invariant.

    config.py   task and solver parameters (params.yaml task.pca, baselines.pca)
    data.py     the synthetic sampler, real-image tasks (projected), PCABatch / PCAEstimate
    net.py      read-in: a token per (normalised) point + k read-out tokens; read-out Linear there
"""
from __future__ import annotations

import dataclasses

import torch

from pipeline.core import rng
from pipeline.core.family import Metric, SolverSpec, TaskFamily, solver_name
from pipeline.core.probe import ProbeTarget
from pipeline.families.pca import config as C
from pipeline.families.pca.data import PCABatch, PCAEstimate, covariance, sample_pca

_DEFAULTS = dataclasses.asdict(C.PCASolvers())


def _unit(v):
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def abs_cosine(batch, est):
    """(B, k) |cos| between each estimated direction and the true eigenvector (sign-invariant)."""
    return (_unit(est.vecs.double().cpu()) * batch.vecs.double().cpu()).sum(-1).abs()


def eig_error(batch, est):
    """(B, k) relative eigenvalue error |lambda_hat - lambda| / lambda."""
    lam = batch.vals.double().cpu()
    return (est.vals.double().cpu() - lam).abs() / lam.abs().clamp_min(1e-30)


def projector(vecs):
    """(B, k, d) directions (any, not necessarily orthogonal) -> (B, d, d) projector onto their span."""
    q = torch.linalg.qr(vecs.double().transpose(-1, -2))[0]  # (B, d, k) orthonormal basis
    return q @ q.transpose(-1, -2)


def subspace_distance(batch, est):
    """(B,) ||P_hat - P||_F of the top-k projectors (invariant to signs, order and rotations within the span)."""
    return (projector(est.vecs.cpu()) - projector(batch.vecs.cpu())).flatten(1).norm(dim=-1)


def _starts(batch, seed: int, k: int):
    """(B, k, d) standard-normal starts, task i's drawn from (seed, SOLVER, 11, i): chunking-independent."""
    return rng.per_task_draws(seed, batch.task_index(), lambda g: torch.randn(k, batch.d, generator=g, device=g.device),
                              rng.SOLVER, 11, device=batch.device).to(batch.xs.dtype)


def _iterates(kind: str, batch, steps, seed: int):
    from pipeline.algorithms import power

    S, v0 = covariance(batch.xs.double()), _starts(batch, seed, batch.k).double()
    fn = power.power_deflation_iterates if kind == "power" else power.block_power_iterates
    return [PCAEstimate(V.float(), L.float()) for V, L in fn(S, batch.k, list(steps), v0)]


class IterSolver:
    """tau iterations of the power method (kind power) or block power iteration (kind block)."""

    def __init__(self, name: str, kind: str, steps: int, seed: int):
        self.name, self.kind, self.steps, self.seed = name, kind, steps, seed

    def __call__(self, batch: PCABatch) -> PCAEstimate:
        return _iterates(self.kind, batch, [self.steps], self.seed)[0]


class Eigh:
    name = "eigh"

    def __call__(self, batch: PCABatch) -> PCAEstimate:
        from pipeline.algorithms.power import top_eigenpairs

        V, L = top_eigenpairs(covariance(batch.xs.double()), batch.k)
        return PCAEstimate(V.float(), L.float())


def _solver(name: str, kind: str, key: str):
    def factory(p: dict, seed: int, task) -> IterSolver:
        return IterSolver(solver_name(name, p, _DEFAULTS, (key,)), kind, p[key], seed)

    return SolverSpec(factory, uses=(key,))


def _probe_iterates(kind: str):
    def fn(batch: PCABatch, steps: list[int], p: dict) -> list[PCAEstimate]:
        return _iterates(kind, batch, steps, int(p["seed"]))

    return fn


class PCAFamily(TaskFamily):
    name = "pca"
    TaskConfig = C.PCATask
    SolverConfig = C.PCASolvers
    batch_type = PCABatch
    monitor = "val/loss"
    metrics = {
        "cos": Metric("cos", "higher", "|cos(v_hat, v)|", "absolute cosine between the estimated and the true "
                      "eigenvector of the sample covariance, per component (1 = exact; sign-invariant)",
                      abs_cosine, axis="component", axis_start=1),
        "eig_error": Metric("eig_error", "lower", "|lambda_hat - lambda| / lambda", "relative error of each "
                            "eigenvalue estimate, per component", eig_error, axis="component", axis_start=1,
                            log_scale=True),
        "subspace": Metric("subspace", "lower", "||P_hat - P||_F", "Frobenius distance between the projectors onto "
                           "the estimated and the true top-k subspaces (0 = same span; at most sqrt(2k))",
                           subspace_distance),
    }
    solvers = {
        "power": _solver("power", "power", "power_steps"),
        "block_power": _solver("block_power", "block", "block_steps"),
        "eigh": SolverSpec(lambda p, seed, task: Eigh(), help="exact: torch.linalg.eigh"),
    }
    probe_targets = {
        "power": ProbeTarget(_probe_iterates("power"), "power-method iterations (with deflation)", log_steps=True),
    }

    def validate(self, task, model, where):
        C.validate(task, model, where)

    def describe(self, task) -> str:
        gap = f"gap {task.gap_min:g}" if task.gap_min == task.gap_max else f"gap {task.gap_min:g}-{task.gap_max:g}"
        return f"d={task.d}, n={task.n_points}, k={task.k}, {gap}"

    def sample(self, task, group, batch_size, generator, device, step=None):
        return sample_pca(batch_size, task.d, task.n_points, task.k, generator, device,
                          gap_min=task.gap_min, gap_max=task.gap_max)

    def read_in(self, task, model):
        from pipeline.families.pca.net import ReadIn

        return ReadIn(task.d, task.k, model.n_embd)

    def read_out(self, task, model, group):
        from pipeline.families.pca.net import ReadOut

        return ReadOut(model.n_embd, task.d, task.k)

    def loss(self, out, batch, task):
        """Per component: 1 - cos^2 (sign-invariant) + the squared relative eigenvalue error, averaged."""
        from pipeline.families.pca.net import scale2

        out = out.float()
        v, lam = out[..., :-1], out[..., -1]  # (B, k, d), (B, k) in units of s^2
        cos2 = (_unit(v) * batch.vecs.float()).sum(-1).pow(2)
        target = batch.vals.float() / scale2(batch.xs.float())[:, None]
        rel = ((lam - target) / target.clamp_min(1e-6)).pow(2)
        loss = (1 - cos2).mean() + rel.mean()
        return {"loss": loss, "cos": cos2.sqrt().mean().detach(), "eig_rel": rel.sqrt().mean().detach()}

    def decode(self, out, batch) -> PCAEstimate:
        from pipeline.families.pca.net import scale2

        out = out.float()
        return PCAEstimate(_unit(out[..., :-1]), out[..., -1] * scale2(batch.xs.float())[:, None])

    # ------------------------------------------------------------------ probing (core/probe.py)
    def residual(self, est: PCAEstimate, batch: PCABatch):
        """(B, k d): each unit direction, its sign aligned with the true eigenvector, minus that eigenvector."""
        v, t = _unit(est.vecs.to(batch.vecs.device).double()), batch.vecs.double()
        sign = torch.where((v * t).sum(-1, keepdim=True) < 0, -1.0, 1.0)
        return (sign * v - t).flatten(1)


FAMILY = PCAFamily()
