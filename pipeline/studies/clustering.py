"""Clustering in context: a transformer vs Lloyd's algorithm and EM, by K and separation, and the
two-class spectral algorithm (He, Chen, Cao, Fan, Liu 2025, "Transformers versus the EM algorithm
in multi-class clustering"; He et al. 2025, "Learning spectral methods by transformers").
docs/studies/clustering.md

Network: one set transformer (the paper's 3 layers x 2 heads x width 64) with a read-out head per
K, trained on mixtures whose separation is drawn per task. Grid: K x separation of the evaluation
mixtures. Methods: the network, Lloyd (k-means++ restarts), EM (paper protocol, strong), and the
spectral algorithm where K = 2. Probe: every layer's label read-out vs EM iterations.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.config import ConfigError, _f
from pipeline.core.probe import Probe
from pipeline.core.study import Figure, Grid, Method, Study, StudySection, Table, Unit, check_step_counts
from pipeline.families.cluster import FAMILY

METHODS = ("lloyd", "em_paper", "em_strong", "spectral")


@dataclass
class ClusteringSection(StudySection):
    n_tasks: int = _f(256, "evaluation tasks per (K, separation)", min=1)
    separations: list[float] = _f([2.0, 4.0, 6.0], "separations of the evaluation mixtures (mean coordinates ~ U(-s, s))")
    methods: list[str] = _f(list(METHODS), "classical solvers (spectral: K = 2 only)", choices=METHODS)
    probe_k: int = _f(3, "probing: the K whose read-out is probed (0 = no probing)", min=0)
    probe_separation: float = _f(4.0, "probing: the separation of the held-out tasks (one of separations)")
    probe_em_steps: list[int] = _f([1, 2, 3, 4, 6, 8, 12, 16, 32, 64, 100], "probing: EM iterations compared")
    probe_tasks: int = _f(512, "probing: probe-training tasks (fresh draws)", min=16)
    probe_fit_steps: int = _f(150, "probing: Adam steps of each layer's fresh read-out head", min=1)


class ClusteringStudy(Study):
    name = "clustering"
    family = "cluster"
    title = "Clustering in context: a transformer vs Lloyd's algorithm, EM and the two-class spectral method"
    Config = ClusteringSection
    doc = "docs/studies/clustering.md"

    def check(self, cfg):
        s = self.section(cfg)
        if not s.separations or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0
                                    for v in s.separations):
            raise ConfigError(f"{self.name}.separations: positive numbers, got {s.separations}")
        check_step_counts(f"{self.name}.probe_em_steps", s.probe_em_steps)
        if s.probe_em_steps[0] < 1:
            raise ConfigError(f"{self.name}.probe_em_steps: EM iteration counts start at 1, got {s.probe_em_steps}")
        if s.probe_k:
            if s.probe_k not in self.task(cfg).ks:
                raise ConfigError(f"{self.name}.probe_k: {s.probe_k} is not a trained K {self.task(cfg).ks}")
            if float(s.probe_separation) not in [float(v) for v in s.separations]:
                raise ConfigError(f"{self.name}.probe_separation: {s.probe_separation} is not one of separations "
                                  f"{s.separations}")

    def units(self, cfg):
        return [Unit("transformer")]

    def point_task(self, cfg, grid, point):
        s = float(point["separation"])
        return self.task(cfg, separation=s, separation_max=s)

    def grids(self, cfg):
        from pipeline.core import rng
        from pipeline.families.cluster.data import sample_clusters

        s = self.section(cfg)
        ks = self.task(cfg).ks

        def make_set(cfg, p):
            t = self.point_task(cfg, None, p)
            g = rng.make_generator(cfg.seed, rng.EVAL, t.d, p["K"], int(round(100 * p["separation"])))
            return sample_clusters(s.n_tasks, t.d, p["K"], t.n_points, g, separation=t.separation,
                                   separation_max=t.separation_max, max_cosine=t.max_cosine)

        def methods(cfg, p):
            return [Method("transformer", unit="transformer"),
                    *[Method(m, solver=m) for m in s.methods if m != "spectral" or p["K"] == 2]]

        points = [{"K": int(k), "separation": float(v)} for k in ks for v in s.separations]
        return [Grid("main", ["K", "separation"], points, make_set, methods, n_tasks=s.n_tasks,
                     title=FAMILY.describe(self.task(cfg)))]

    def probes(self, cfg):
        s = self.section(cfg)
        if not s.probe_k:
            return []
        point = {"K": s.probe_k, "separation": float(s.probe_separation)}
        return [Probe(f"K{s.probe_k}", "transformer", "main", point, {"em_paper": list(s.probe_em_steps)},
                      n_fit=s.probe_tasks, fit="trained", fit_steps=s.probe_fit_steps,
                      title=f"K = {s.probe_k}, separation {s.probe_separation:g}")]

    def tables(self, cfg):
        return [Table("main", m, "K", title=f"{FAMILY.metrics[m].label} by K (rows: one table per separation)")
                for m in ("ari", "nmi")] + [
            Table("main", "error", "separation", where={"K": 2}, title="K = 2: misclustering rate by separation")]

    def figures(self, cfg):
        return [Figure("ari_vs_separation", "main", "ari", "separation", panels="K", title="adjusted Rand index"),
                Figure("nmi_vs_separation", "main", "nmi", "separation", panels="K", title="normalised mutual information"),
                Figure("error_k2", "main", "error", "separation", where={"K": 2}, title="K = 2: misclustering rate")]

    def notes(self, cfg, results):
        """Whether the network rivals Lloyd / EM at each (K, separation), by ARI."""
        rows = {(r["method"], r["point"]["K"], r["point"]["separation"]): r for r in results["rows"]
                if r["grid"] == "main" and r["metric"] == "ari" and r["applicable"]}
        out = []
        for (m, K, sep), r in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][2])):
            if m != "transformer":
                continue
            others = {o: rows[(o, K, sep)] for o in ("lloyd", "em_paper", "em_strong") if (o, K, sep) in rows}
            best = max(others.items(), key=lambda kv: kv[1]["mean"]) if others else None
            if best is None:
                continue
            gap = r["mean"] - best[1]["mean"]
            ci = (r["ci95"] or 0) + (best[1]["ci95"] or 0)
            verdict = "beats" if gap > ci else ("ties with" if abs(gap) <= ci else "trails")
            out.append(f"K = {K}, separation {sep:g}: transformer ARI {r['mean']:.3f} {verdict} the best classical "
                       f"({best[0]} {best[1]['mean']:.3f})")
        for name, p in (results["meta"].get("probes") or {}).items():
            a = p["algorithms"]["em_paper"]
            out.append(f"probe {p['title']}: EM iterations of equal error per layer {a.get('error_matched_steps')}; "
                       f"residual-cosine best match {a['best_steps']}")
        return out


STUDY = ClusteringStudy()
