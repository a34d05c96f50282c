"""TGMM (Chen, Wu, Fang 2025): a transformer estimates Gaussian-mixture weights and means, against
EM (the paper's protocol and a strong k-means++ version) and the spectral method. docs/studies/tgmm.md

Networks: one per d in `tgmm.dims` (one backbone, one read-out per K). Grid: d x K, the same fixed
tasks for every method (seeded by (seed, EVAL, d, K); eval sets of `n_tasks` tasks, N = `n`).
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.core import rng
from pipeline.core.config import ConfigError, _f
from pipeline.core.probe import Probe
from pipeline.core.study import StudySection, Figure, Grid, Method, Study, Table, Unit, check_step_counts
from pipeline.families.gmm import FAMILY
from pipeline.families.gmm.config import check_sample_size

GMM_METHODS = tuple(FAMILY.solvers)


@dataclass
class TGMMSection(StudySection):
    dims: list[int] = _f([2, 8], "data dimensions d; one network per d (paper: 2, 8, 32, 128)", min=1, nonempty=True)
    n_tasks: int = _f(256, "evaluation tasks per (d, K) (paper: 1280)", min=1)
    n: int = _f(128, "sample size of every evaluation task (paper: 128)", min=2)
    methods: list[str] = _f(list(GMM_METHODS), "classical solvers compared", choices=GMM_METHODS)
    probe_ks: list[int] = _f([3], "probing: the K values at which the first d's network is probed against EM "
                                  "iterations ([] = no probing)")
    probe_em_steps: list[int] = _f([1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 100],
                                   "probing: EM (paper start) iteration counts compared with every layer")
    probe_tasks: int = _f(512, "probing: probe-training tasks (fresh draws, N = task n0)", min=16)
    probe_fit_steps: int = _f(150, "probing: Adam steps of each layer's fresh read-out head", min=1)


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
        check_step_counts("tgmm.probe_em_steps", s.probe_em_steps)
        if s.probe_em_steps[0] < 1:
            raise ConfigError(f"tgmm.probe_em_steps: EM iteration counts start at 1, got {s.probe_em_steps}")
        bad = [K for K in s.probe_ks if K not in self.task(cfg).ks]
        if bad:
            raise ConfigError(f"tgmm.probe_ks: {bad} not among the trained K values {self.task(cfg).ks}")

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

    def point_task(self, cfg, grid, point):
        return self.task(cfg, d=point["d"])

    def probes(self, cfg):
        """The d = dims[0] network's layers vs EM iterations (paper start), with a fresh attentive-pooling
        read-out trained per layer on the frozen states (the head is not linear: no closed form)."""
        s = self.section(cfg)
        d = s.dims[0]
        return [Probe(f"d{d}_K{K}", f"d{d}", "main", {"d": d, "K": K}, {"em_paper": list(s.probe_em_steps)},
                      n_fit=s.probe_tasks, fit="trained", fit_steps=s.probe_fit_steps,
                      title=f"tgmm d = {d}, K = {K}") for K in s.probe_ks]

    def tables(self, cfg):
        return gmm_tables("main")

    def figures(self, cfg):
        return [Figure(f"{m}_vs_K", "main", m, "K", panels="d", title=FAMILY.metrics[m].label)
                for m in ("l2", "accuracy", "loglik")]


STUDY = TGMMStudy()
