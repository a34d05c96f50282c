"""PCA learned from examples: transformers vs the power method, on synthetic and real images
(He et al. 2025, "Learning spectral methods by transformers"). docs/studies/pca.md

Networks: two transformers of the same size (and so the same parameter count) that differ only in
the attention, softmax and ReLU (He et al.: ReLU is better), trained on synthetic sample matrices
with gaps drawn from [task.gap_min, task.gap_max]. Grids: `synthetic` (the spectral gap of the
evaluation tasks) and `real` (sklearn digits, MNIST-5k, Fashion-MNIST images, projected to d
coordinates; a dataset whose source is not installed is skipped with the reason). Methods: both
networks, the power method with deflation at several iteration counts, block power iteration,
exact eigh. Probes: every layer's read-out vs power-method iterations.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config import ConfigError, _f
from pipeline.core.probe import Probe
from pipeline.core.study import Figure, Grid, Method, SkipPoint, Study, StudySection, Table, Unit, check_step_counts
from pipeline.families.pca import FAMILY

ATTENTIONS = {"softmax": "softmax attention", "relu": "ReLU attention (He et al.'s construction)"}
DATASETS = ("digits", "mnist5k", "fashion_mnist")


@dataclass
class PCASection(StudySection):
    n_tasks: int = _f(512, "evaluation sample matrices per grid point", min=1)
    gaps: list[float] = _f([1.5, 2.0, 4.0], "spectral gaps lambda_j / lambda_(j+1) of the synthetic evaluation tasks")
    datasets: list[str] = _f(list(DATASETS), "real image datasets (python -m pipeline datasets materialises them)",
                             choices=DATASETS)
    datasets_root: str = _f("data/datasets", "where the datasets stage wrote them")
    networks: list[str] = _f(list(ATTENTIONS), "attentions trained (same architecture otherwise)",
                             choices=tuple(ATTENTIONS))
    power_steps: list[int] = _f([1, 2, 4, 8, 16], "power-method iterations per component shown as methods")
    block_steps: list[int] = _f([4], "block power iterations shown as methods")
    probe_power: list[int] = _f([0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32], "probing: power iterations compared with every layer")
    probe_tasks: int = _f(512, "probing: probe-training tasks (fresh draws)", min=16)
    probe_fit_steps: int = _f(150, "probing: Adam steps of each layer's fresh read-out head", min=1)


class PCAStudy(Study):
    name = "pca"
    family = "pca"
    title = "PCA in context: softmax and ReLU transformers vs the power method, synthetic and real images"
    Config = PCASection
    doc = "docs/studies/pca.md"
    inputs = ("datasets",)

    def check(self, cfg):
        s = self.section(cfg)
        for key in ("power_steps", "block_steps", "probe_power"):
            check_step_counts(f"{self.name}.{key}", getattr(s, key))
        if not s.gaps or any(isinstance(g, bool) or not isinstance(g, (int, float)) or g <= 1 for g in s.gaps):
            raise ConfigError(f"{self.name}.gaps: spectral gaps > 1, got {s.gaps}")
        for key in ("networks", "datasets"):
            v = getattr(s, key)
            if len(set(v)) != len(v) or (key == "networks" and not v):
                raise ConfigError(f"{self.name}.{key}: distinct names, got {v}")
        t = self.task(cfg)
        if t.n_points > 1797 and "digits" in s.datasets:
            raise ConfigError(f"{self.name}.datasets: digits has 1797 images, fewer than task.pca.n_points = {t.n_points}")
        if t.d > 64 and "digits" in s.datasets:
            raise ConfigError(f"task.pca.d: digits images have 64 pixels, fewer than d = {t.d} coordinates")

    def units(self, cfg):
        return [Unit(a, {"model": {"attention": a}}, label=ATTENTIONS[a]) for a in self.section(cfg).networks]

    def point_task(self, cfg, grid, point):
        if "gap" in point:
            return self.task(cfg, gap_min=float(point["gap"]), gap_max=float(point["gap"]))
        return self.task(cfg)

    def grids(self, cfg):
        from pipeline.core import rng
        from pipeline.families.pca.data import sample_pca

        s = self.section(cfg)

        def synthetic(cfg, p):
            t = self.point_task(cfg, None, p)
            g = rng.make_generator(cfg.seed, rng.EVAL, t.d, t.n_points, int(round(100 * p["gap"])))
            return sample_pca(s.n_tasks, t.d, t.n_points, t.k, g, gap_min=t.gap_min, gap_max=t.gap_max)

        def real(cfg, p):
            from pipeline.datasets import DatasetMissing, load_dataset
            from pipeline.families.pca.data import projection, real_tasks

            t = self.task(cfg)
            try:
                images, _ = load_dataset(p["dataset"], Path(s.datasets_root))
            except DatasetMissing as e:
                raise SkipPoint(str(e)) from None
            word = zlib.crc32(p["dataset"].encode())
            proj = projection(images.shape[1], t.d, cfg.seed + word)
            return real_tasks(images, s.n_tasks, t.n_points, t.k, proj, cfg.seed + word + 1,
                              where=f"{s.datasets_root}/{p['dataset']}")

        def methods(cfg, p):
            return [*[Method(u, unit=u) for u in s.networks],
                    *[Method(f"power_{k}", solver="power", params={"power_steps": k}) for k in s.power_steps],
                    *[Method(f"block_{k}", solver="block_power", params={"block_steps": k}) for k in s.block_steps],
                    Method("eigh", solver="eigh")]

        t = self.task(cfg)
        grids = [Grid("synthetic", ["gap"], [{"gap": float(g)} for g in s.gaps], synthetic, methods,
                      n_tasks=s.n_tasks, title=f"synthetic, d={t.d}, n={t.n_points}, k={t.k}")]
        if s.datasets:
            grids.append(Grid("real", ["dataset"], [{"dataset": n} for n in s.datasets], real, methods,
                              n_tasks=s.n_tasks, title=f"real images, {t.n_points} per task, random projection "
                                                       f"to d={t.d}"))
        return grids

    def probes(self, cfg):
        s = self.section(cfg)
        gap = 2.0 if 2.0 in [float(g) for g in s.gaps] else float(s.gaps[0])
        return [Probe(u, u, "synthetic", {"gap": gap}, {"power": s.probe_power}, n_fit=s.probe_tasks, fit="trained",
                      fit_steps=s.probe_fit_steps, title=f"{u} ({ATTENTIONS[u]}), gap {gap:g}") for u in s.networks]

    def tables(self, cfg):
        s = self.section(cfg)
        out = []
        for grid, axis in (("synthetic", "gap"), ("real", "dataset")):
            if grid == "real" and not s.datasets:
                continue
            out += [Table(grid, "cos", "component", title=f"{grid}: |cos| per component, mean ± 95 % CI"),
                    Table(grid, "eig_error", "component", title=f"{grid}: relative eigenvalue error per component"),
                    Table(grid, "subspace", axis, title=f"{grid}: top-k subspace distance ||P_hat - P||_F")]
        return out

    def figures(self, cfg):
        s = self.section(cfg)
        out = [Figure("cos_synthetic", "synthetic", "cos", "component", panels="gap", title="|cos| per component"),
               Figure("subspace_vs_gap", "synthetic", "subspace", "gap", title="top-k subspace distance")]
        if s.datasets:
            out.append(Figure("cos_real", "real", "cos", "component", panels="dataset", title="|cos| per component"))
        return out

    def notes(self, cfg, results):
        """The ReLU-vs-softmax comparison and the power-method step count each network matches."""
        s = self.section(cfg)
        mean = {(r["grid"], r["method"], tuple(sorted(r["point"].items()))): r["mean"] for r in results["rows"]
                if r["metric"] == "cos" and r["applicable"]}
        out = []
        for grid, axis, values in (("synthetic", "gap", [float(g) for g in s.gaps]), ("real", "dataset", s.datasets)):
            for v in values:
                top = {u: mean.get((grid, u, tuple(sorted({axis: v, "component": 1}.items())))) for u in s.networks}
                if None in top.values():
                    continue
                power = [k for k in s.power_steps
                         if (mean.get((grid, f"power_{k}", tuple(sorted({axis: v, "component": 1}.items())))) or 0)
                         <= max(top.values())]
                out.append(f"{grid} {axis} {v}: top-component |cos| " + ", ".join(f"{u} {c:.3f}" for u, c in top.items())
                           + f"; the better network matches or beats the power method at {power or 'none'} of "
                           f"{s.power_steps} iterations")
        skipped = sorted({r["point"].get("dataset"): r["reason"] for r in results["rows"]
                          if not r["applicable"] and r["reason"].startswith("skipped")}.items())
        out += [f"{d}: {reason}" for d, reason in skipped]
        for name, p in (results["meta"].get("probes") or {}).items():
            a = p["algorithms"]["power"]
            out.append(f"{p['title']}: power iterations of equal error per layer {a.get('error_matched_steps')} "
                       f"(residual-cosine best match {a['best_steps']}: uninformative for a random-start method)")
        return out


STUDY = PCAStudy()
