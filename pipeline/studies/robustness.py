"""TGMM robustness (Chen, Wu, Fang 2025): sample-size shift and distribution shift. docs/studies/robustness.md

Networks: one per training N0 in `robustness.train_n0` at d = `robustness.d` (the one at N0 = the
base task.gmm.n0 is the tgmm study's network when tgmm trains that d: same run, one copy).

Evaluation sets. Per K, one base set of `n_tasks` tasks with N_max = max(eval_n, n) points each
(seeded by (seed, STUDY, 0, d, K)).
  * sample_size grid (N x K): the set at N keeps the first N points of every base task, so all N
    share the same mixtures and the samples are nested (a paired comparison across N).
  * shift grid (sigma_p x K): the first `n` points, every mean moved by sigma_p * eps with
    eps ~ N(0, I_d) drawn once per (task, component) (stream (seed, STUDY, 1, d, K)); the data are
    moved with their means (same labels and noise), weights kept. sigma_p = 0 is the unshifted set
    and every sigma_p uses the same eps (paired). Evaluated: the network trained at N0 = fixed_n0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.core import rng
from pipeline.core.config import ConfigError, _f
from pipeline.core.study import StudySection, Figure, Grid, Method, Study, Unit
from pipeline.families.gmm import FAMILY
from pipeline.families.gmm.config import check_sample_size
from pipeline.families.gmm.data import GMMBatch
from pipeline.studies.tgmm import GMM_METHODS, gmm_tables


@dataclass
class RobustnessSection(StudySection):
    d: int = _f(2, "dimension of the robustness studies", min=1)
    train_n0: list[int] = _f([32, 64, 128], "sample-size shift: one network per training N0", min=2, nonempty=True)
    eval_n: list[int] = _f([16, 32, 64, 128, 256], "sample sizes N at evaluation", min=2, nonempty=True)
    sigma_p: list[float] = _f([0.0, 1.0, 2.0, 5.0, 10.0], "distribution shift: means + N(0, sigma_p^2 I)",
                              min=0, nonempty=True)
    n: int = _f(128, "sample size of the shift study's tasks", min=2)
    n_tasks: int = _f(128, "evaluation tasks per cell", min=1)
    methods: list[str] = _f(list(GMM_METHODS), "classical solvers compared", choices=GMM_METHODS)


def first_points(batch: GMMBatch, N: int) -> GMMBatch:
    """The same tasks keeping only their first N points: (B, N_max, d) -> (B, N, d)."""
    if N > batch.N:
        raise ValueError(f"cannot keep {N} points of tasks with {batch.N}")
    return GMMBatch(x=batch.x[:, :N].clone(), mask=batch.mask[:, :N].clone(), weights=batch.weights.clone(),
                    means=batch.means.clone(), labels=batch.labels[:, :N].clone(),
                    scales=None if batch.scales is None else batch.scales.clone())


def shift_means(batch: GMMBatch, eps: torch.Tensor, sigma_p: float) -> GMMBatch:
    """Means mu + sigma_p * eps and the data moved with them: x_i = mu'_{y_i} + z_i, same y_i and z_i."""
    B, N, d = batch.x.shape
    delta = float(sigma_p) * eps  # (B, K, d)
    moved = torch.gather(delta, 1, batch.labels.clamp_min(0)[..., None].expand(B, N, d))  # (B, N, d)
    x = (batch.x + moved) * batch.mask[..., None]
    return GMMBatch(x=x, mask=batch.mask.clone(), weights=batch.weights.clone(), means=batch.means + delta,
                    labels=batch.labels.clone(), scales=None if batch.scales is None else batch.scales.clone())


def series_name(n0: int) -> str:
    return f"tgmm (N0={n0})"


class RobustnessStudy(Study):
    name = "robustness"
    family = "gmm"
    title = "TGMM robustness: sample-size shift and distribution shift"
    Config = RobustnessSection
    doc = "docs/studies/robustness.md"

    def fixed_n0(self, cfg) -> int:
        """The training N0 of the network evaluated under distribution shift."""
        r, n0 = self.section(cfg), self.task(cfg).n0
        return n0 if n0 in r.train_n0 else max(r.train_n0)

    def check(self, cfg):
        r = self.section(cfg)
        ks = self.task(cfg).ks
        for key, values in (("train_n0", r.train_n0), ("eval_n", r.eval_n)):
            for i, v in enumerate(values):
                check_sample_size(v, ks, f"robustness.{key}[{i}]")
        check_sample_size(r.n, ks, "robustness.n")
        m = self.base_run(cfg)["model"]
        if m.get("position") == "gpt2" and max(*r.eval_n, r.n) > m.get("max_len", 0):
            raise ConfigError(f"model.max_len: {m.get('max_len')} is shorter than the longest robustness sample "
                              f"{max(*r.eval_n, r.n)} (raise it to at least that)")

    def units(self, cfg):
        d = self.section(cfg).d
        return [Unit(f"n0_{n0}", {"task": {"d": d, "n0": n0}}) for n0 in self.section(cfg).train_n0]

    def _base(self, cfg, K: int) -> GMMBatch:
        r = self.section(cfg)
        g = rng.make_generator(cfg.seed, rng.STUDY, 0, r.d, K)
        return FAMILY.sample(self.task(cfg, d=r.d), K, r.n_tasks, g, "cpu", None, n=max(*r.eval_n, r.n))

    def _eps(self, cfg, K: int, base: GMMBatch) -> torch.Tensor:
        g = rng.make_generator(cfg.seed, rng.STUDY, 1, self.section(cfg).d, K)
        return torch.randn(base.means.shape, generator=g, dtype=base.means.dtype)

    def grids(self, cfg):
        r = self.section(cfg)
        ks = self.task(cfg).ks
        baselines = [Method(m, solver=m) for m in r.methods]
        fixed = self.fixed_n0(cfg)

        def size_set(cfg, p):
            return first_points(self._base(cfg, p["K"]), p["N"])

        def shift_set(cfg, p):
            base = self._base(cfg, p["K"])
            return shift_means(first_points(base, r.n), self._eps(cfg, p["K"], base), p["sigma_p"])

        nets = [Method(series_name(n0), unit=f"n0_{n0}") for n0 in r.train_n0]
        return [
            Grid("sample_size", ["N", "K"], [{"N": N, "K": K} for N in r.eval_n for K in ks], size_set,
                 lambda cfg, p: [*nets, *baselines], title="test N x K", n_tasks=r.n_tasks),
            Grid("shift", ["sigma_p", "K"], [{"sigma_p": float(s), "K": K} for s in r.sigma_p for K in ks], shift_set,
                 lambda cfg, p: [Method(series_name(fixed), unit=f"n0_{fixed}"), *baselines],
                 title="sigma_p x K", n_tasks=r.n_tasks),
        ]

    def tables(self, cfg):
        return [*gmm_tables("sample_size", "N")[:2], gmm_tables("shift", "sigma_p")[0]]

    def figures(self, cfg):
        return [Figure("sample_size_l2", "sample_size", "l2", "N", panels="K", xscale="log2",
                       title="l2 vs test N, one line per training N0 and baseline"),
                Figure("shift_l2", "shift", "l2", "sigma_p", panels="K", xscale="symlog",
                       title="l2 vs mean perturbation sigma_p")]


STUDY = RobustnessStudy()
