"""In-context logistic regression vs Newton's method (Giannou et al. 2024, "How well can
transformers emulate in-context Newton's method?"). docs/studies/logreg.md

Networks: the theory's architecture (linear attention + ReLU MLP) and the one the anchor code
actually trains (softmax attention; GELU MLP here), both reading a prompt of labelled examples and
outputting the regularised logistic solution w_mu. Grid: the condition number of Cov(x) of the
evaluation prompts. Methods: both networks, damped Newton and line-search GD at several step
counts. Probes: every layer's linear read-out vs damped-Newton and GD steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.core import rng
from pipeline.core.config import ConfigError, _f
from pipeline.core.probe import Probe
from pipeline.core.study import (Figure, Grid, Method, Study, StudySection, Table, Unit, check_conditions,
                                  check_step_counts)
from pipeline.families.logreg import FAMILY
from pipeline.families.logreg.data import sample_logreg

ARCHITECTURES = {
    "linear_relu": ({"attention": "linear", "mlp": "relu"}, "linear attention + ReLU MLP (the theory's construction)"),
    "softmax": ({"attention": "softmax", "mlp": "gelu"}, "softmax attention + GELU MLP (what the anchor code trains)"),
}


@dataclass
class LogRegSection(StudySection):
    n_tasks: int = _f(1280, "evaluation prompts per condition number", min=1)
    conditions: list[float] = _f([1.0, 10.0], "condition numbers of Cov(x) of the evaluation prompts (paper: 1, 10, 50)")
    networks: list[str] = _f(list(ARCHITECTURES), "architectures trained (on the task's condition number)",
                             choices=tuple(ARCHITECTURES))
    newton_steps: list[int] = _f([1, 2, 3, 5, 10], "damped-Newton step counts shown as methods")
    gd_steps: list[int] = _f([1, 10, 100], "line-search GD step counts shown as methods")
    probe_newton: list[int] = _f(list(range(0, 11)), "probing: damped-Newton steps compared with every layer")
    probe_gd: list[int] = _f([0, 1, 2, 4, 8, 16, 32, 64], "probing: GD steps compared with every layer")
    probe_tasks: int = _f(2048, "probing: probe-training prompts (fresh draws)", min=16)


class LogRegStudy(Study):
    name = "logreg"
    family = "logreg"
    title = "In-context logistic regression: linear-attention and softmax transformers vs damped Newton and GD"
    Config = LogRegSection
    doc = "docs/studies/logreg.md"

    def check(self, cfg):
        s = self.section(cfg)
        for key in ("newton_steps", "gd_steps", "probe_newton", "probe_gd"):
            check_step_counts(f"{self.name}.{key}", getattr(s, key))
        check_conditions(f"{self.name}.conditions", s.conditions)
        if not s.networks or len(set(s.networks)) != len(s.networks):
            raise ConfigError(f"{self.name}.networks: distinct names from {', '.join(ARCHITECTURES)}, got {s.networks}")

    def units(self, cfg):
        return [Unit(n, {"model": dict(ARCHITECTURES[n][0])}, label=ARCHITECTURES[n][1])
                for n in self.section(cfg).networks]

    def point_task(self, cfg, grid, point):
        return self.task(cfg, condition=float(point["condition"]))

    def grids(self, cfg):
        s = self.section(cfg)

        def make_set(cfg, p):
            t = self.point_task(cfg, None, p)
            g = rng.make_generator(cfg.seed, rng.EVAL, t.d, t.n_points, int(round(100 * p["condition"])))
            return sample_logreg(s.n_tasks, t.d, t.n_points, g, condition=t.condition, mu=t.mu,
                                 target_steps=t.target_steps, test_points=t.test_points)

        def methods(cfg, p):
            return [*[Method(u, unit=u) for u in s.networks],
                    *[Method(f"newton_{k}", solver="newton", params={"newton_steps": k}) for k in s.newton_steps],
                    *[Method(f"gd_{k}", solver="gd", params={"gd_steps": k}) for k in s.gd_steps]]

        return [Grid("main", ["condition"], [{"condition": float(c)} for c in s.conditions], make_set, methods,
                     n_tasks=s.n_tasks, title=FAMILY.describe(self.task(cfg)))]

    def probes(self, cfg):
        s = self.section(cfg)
        c = float(self.task(cfg).condition)
        point = {"condition": c} if c in [float(x) for x in s.conditions] else {"condition": float(s.conditions[0])}
        return [Probe(u, u, "main", point, {"newton": s.probe_newton, "gd": s.probe_gd}, n_fit=s.probe_tasks,
                      title=f"{u} ({ARCHITECTURES[u][1]}), condition {point['condition']:g}") for u in s.networks]

    def tables(self, cfg):
        return [Table("main", m, "condition", title=f"{FAMILY.metrics[m].label}, mean ± 95 % CI")
                for m in ("w_error", "excess_loss", "accuracy")]

    def figures(self, cfg):
        return [Figure(f"{m}_vs_condition", "main", m, "condition", title=FAMILY.metrics[m].label)
                for m in ("w_error", "accuracy")]

    def notes(self, cfg, results):
        """Which Newton step count each network matches in error, and the per-layer probe."""
        rows = {(r["method"], r["point"].get("condition")): r["mean"] for r in results["rows"]
                if r["grid"] == "main" and r["metric"] == "w_error"}
        s = self.section(cfg)
        out = []
        for c in s.conditions:
            for u in s.networks:
                e = rows.get((u, float(c)))
                if e is None:
                    continue
                beaten = [k for k in s.newton_steps if (rows.get((f"newton_{k}", float(c))) or math.inf) > e]
                gd = [k for k in s.gd_steps if (rows.get((f"gd_{k}", float(c))) or math.inf) > e]
                out.append(f"condition {c:g}: {u} ||w - w_mu||^2/d = {e:.3g}; better than damped Newton at "
                           f"{beaten or 'no'} steps and line-search GD at {gd or 'no'} steps of those shown")
        for name, p in (results["meta"].get("probes") or {}).items():
            out.append(f"{p['title']}: best-matching damped-Newton step per layer "
                       f"{p['algorithms']['newton']['best_steps']}, GD step {p['algorithms']['gd']['best_steps']}")
        return out


STUDY = LogRegStudy()
