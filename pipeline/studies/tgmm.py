"""TGMM (Chen, Wu, Fang 2025): a transformer estimates Gaussian-mixture weights and means, against
EM (the paper's protocol and a strong k-means++ version) and the spectral method. docs/studies/tgmm.md

Networks: one per d in `tgmm.dims` (one backbone, one read-out per K). Grid: d x K, the same fixed
tasks for every method (seeded by (seed, EVAL, d, K); eval sets of `n_tasks` tasks, N = `n`).
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.core import rng
from pipeline.core.config import _f
from pipeline.core.study import StudySection, Figure, Grid, Method, Study, Table, Unit
from pipeline.families.gmm import FAMILY
from pipeline.families.gmm.config import check_sample_size

GMM_METHODS = tuple(FAMILY.solvers)


@dataclass
class TGMMSection(StudySection):
    dims: list[int] = _f([2, 8], "data dimensions d; one network per d (paper: 2, 8, 32, 128)", min=1, nonempty=True)
    n_tasks: int = _f(256, "evaluation tasks per (d, K) (paper: 1280)", min=1)
    n: int = _f(128, "sample size of every evaluation task (paper: 128)", min=2)
    methods: list[str] = _f(list(GMM_METHODS), "classical solvers compared", choices=GMM_METHODS)


def eval_set(cfg, task, K: int, n_tasks: int, n: int, device="cpu"):
    """The fixed evaluation tasks of (d, K): seeded by (seed, EVAL, d, K), N = n points each.
    Shared by every GMM study, so the same (d, K) means the same tasks everywhere."""
    g = rng.make_generator(cfg.seed, rng.EVAL, task.d, K, device=device)
    return FAMILY.sample(task, K, n_tasks, g, device, None, n=n)


def gmm_tables(grid: str, cols: str = "K") -> list[Table]:
    return [Table(grid, "l2", cols), Table(grid, "l2", cols, stat="median"), Table(grid, "accuracy", cols),
            Table(grid, "loglik", cols), Table(grid, "l2", cols, stat="seconds", title="Solver time (s)")]


class TGMMStudy(Study):
    name = "tgmm"
    family = "gmm"
    title = "TGMM: Gaussian-mixture estimation, transformer vs EM and the spectral method"
    Config = TGMMSection
    doc = "docs/studies/tgmm.md"

    def check(self, cfg):
        s = self.section(cfg)
        check_sample_size(s.n, self.task(cfg).ks, "tgmm.n")

    def units(self, cfg):
        return [Unit(f"d{d}", {"task": {"d": d}}) for d in self.section(cfg).dims]

    def grids(self, cfg):
        s = self.section(cfg)
        ks = self.task(cfg).ks

        def make_set(cfg, p):
            return eval_set(cfg, self.task(cfg, d=p["d"]), p["K"], s.n_tasks, s.n)

        def methods(cfg, p):
            return [Method("tgmm", unit=f"d{p['d']}"), *[Method(m, solver=m) for m in s.methods]]

        return [Grid("main", ["d", "K"], [{"d": d, "K": K} for d in s.dims for K in ks], make_set, methods,
                     title="d x K", n_tasks=s.n_tasks)]

    def tables(self, cfg):
        return gmm_tables("main")

    def figures(self, cfg):
        return [Figure(f"{m}_vs_K", "main", m, "K", panels="d", title=FAMILY.metrics[m].label)
                for m in ("l2", "accuracy", "loglik")]


STUDY = TGMMStudy()
