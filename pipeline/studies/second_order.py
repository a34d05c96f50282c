"""Second-order in-context regression (Fu, Chen, Jia, Sharan, NeurIPS 2024): does a transformer
trained on in-context linear regression run Newton's method (about 3 more Newton steps per middle
layer) rather than gradient descent (exponentially many steps), on ill-conditioned data too, and
does an LSTM match only a few Newton steps / online GD? docs/studies/second_order.md

Networks: the causal transformer trained on isotropic prompts (the linreg study's network when
the settings agree: one trained network serves both), the same trained on condition-number-100
prompts, and an LSTM of the same width on isotropic prompts. Grid: the condition number of the
evaluation prompts (1 and 100); every method's error over the prefix length k. Probes: every
layer's linear read-out against the iterates of iterative Newton, gradient descent (2^0 .. 2^12
steps) and online GD.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.core import rng
from pipeline.core.config import ConfigError, _f
from pipeline.core.probe import Probe
from pipeline.core.study import (Figure, Grid, Method, Study, StudySection, Table, Unit, check_conditions,
                                  check_step_counts)
from pipeline.families.linreg import FAMILY
from pipeline.families.linreg.data import sample_linreg

NETWORKS = ("transformer", "transformer_k100", "lstm")


@dataclass
class SecondOrderSection(StudySection):
    model: dict = _f({"position": "gpt2"}, "overrides of `model` (the transformer must be causal: position gpt2)")
    n_tasks: int = _f(1280, "evaluation prompts per condition number (Fu et al.: 1280, Garg's protocol)", min=1)
    conditions: list[float] = _f([1.0, 100.0], "condition numbers of Cov(x) of the evaluation prompts (Fu: 1, 100)")
    ill_condition: float = _f(100.0, "condition number the transformer_k100 network trains on (Fu: 100)", min=1)
    networks: list[str] = _f(list(NETWORKS), "the networks trained and compared", choices=NETWORKS)
    newton_steps: list[int] = _f([1, 2, 3, 5], "iterative Newton step counts shown as methods (error vs k)")
    gd_steps: list[int] = _f([10, 100, 1000], "gradient-descent step counts shown as methods (error vs k)")
    probe_newton: list[int] = _f(list(range(0, 13)), "probing: Newton steps compared with every layer")
    probe_gd: list[int] = _f([2 ** i for i in range(13)], "probing: GD steps compared with every layer (Fu: 2^0..2^12)")
    probe_online: list[int] = _f([0, 1, 2, 4, 8, 16, 32], "probing: online-GD passes compared with every layer")
    probe_fit: str = _f("ridge", "probing read-out: ridge (closed form) | trained (the family head, Adam)",
                        choices=("ridge", "trained"))
    probe_tasks: int = _f(2048, "probing: probe-training prompts (fresh draws of the held-out distribution)", min=16)
    other_train: dict = _f({"steps": 2000}, "overrides of `train` for transformer_k100 and lstm (the time budget; "
                                             "transformer keeps the section's train, so it is the linreg network)")
    lstm: dict = _f({"backbone": "lstm", "position": "set"}, "overrides of `model` for the LSTM network (same width "
                                                              "and depth; position is a transformer key)")


class SecondOrderStudy(Study):
    name = "second_order"
    family = "linreg"
    title = "Second-order in-context regression: transformer and LSTM layers vs Newton, GD and online GD"
    Config = SecondOrderSection
    doc = "docs/studies/second_order.md"

    def check(self, cfg):
        s = self.section(cfg)
        for key in ("newton_steps", "gd_steps", "probe_newton", "probe_gd", "probe_online"):
            check_step_counts(f"{self.name}.{key}", getattr(s, key))
        check_conditions(f"{self.name}.conditions", s.conditions)
        if len(set(s.networks)) != len(s.networks) or not s.networks:
            raise ConfigError(f"{self.name}.networks: distinct names from {', '.join(NETWORKS)}, got {s.networks}")

    def units(self, cfg):
        s = self.section(cfg)
        other = dict(s.other_train)
        made = {"transformer": Unit("transformer", label="transformer, isotropic prompts"),
                "transformer_k100": Unit("transformer_k100", {"task": {"condition": float(s.ill_condition)},
                                                              "train": other},
                                         label=f"transformer, condition {s.ill_condition:g}"),
                "lstm": Unit("lstm", {"model": dict(s.lstm), "train": other}, label="LSTM, isotropic prompts")}
        return [made[n] for n in s.networks]

    def point_task(self, cfg, grid, point):
        return self.task(cfg, condition=float(point["condition"]))

    def grids(self, cfg):
        s = self.section(cfg)

        def make_set(cfg, p):
            t = self.point_task(cfg, None, p)
            g = rng.make_generator(cfg.seed, rng.EVAL, t.d, t.n_points, int(round(100 * p["condition"])))
            return sample_linreg(s.n_tasks, t.d, t.n_points, g, noise_std=t.noise_std, condition=t.condition)

        def methods(cfg, p):
            return [*[Method(u, unit=u) for u in s.networks], Method("least_squares", solver="least_squares"),
                    *[Method(f"newton_{k}", solver="newton", params={"newton_steps": k}) for k in s.newton_steps],
                    *[Method(f"gd_{k}", solver="gd", params={"gd_steps": k}) for k in s.gd_steps],
                    Method("online_gd", solver="online_gd")]

        points = [{"condition": float(c)} for c in s.conditions]
        t = self.task(cfg)
        return [Grid("main", ["condition"], points, make_set, methods, n_tasks=s.n_tasks,
                     title=f"d={t.d}, {t.n_points} points")]

    def probes(self, cfg):
        s = self.section(cfg)
        algs = {"newton": s.probe_newton, "gd": s.probe_gd, "online_gd": s.probe_online}
        conds = [float(c) for c in s.conditions]
        out = []
        for unit in s.networks:
            for c in conds:
                if unit == "lstm" and c != 1.0:
                    continue  # the LSTM is probed on the prompts it was trained on
                out.append(Probe(f"{unit}_c{c:g}", unit, "main", {"condition": c}, algs, n_fit=s.probe_tasks,
                                 fit=s.probe_fit, title=f"{unit} on condition-{c:g} prompts"))
        return out

    def table_ks(self, cfg):
        t = self.task(cfg)
        return tuple(sorted({k for k in (1, t.d // 2, t.d, t.n_points - 1) if 0 < k < t.n_points}))

    def tables(self, cfg):
        return [Table("main", "sq_error", "k", values=self.table_ks(cfg),
                      title="Squared error / d after k in-context examples, mean ± 95 % CI")]

    def figures(self, cfg):
        return [Figure("error_vs_k", "main", "sq_error", "k", panels="condition",
                       title="squared error / d vs in-context examples k, per condition number of Cov(x)")]

    def notes(self, cfg, results):
        """The paper's questions, answered from the probes and the error curves."""
        s = self.section(cfg)
        probes = results["meta"].get("probes", {})
        out = []
        for name, p in probes.items():
            best = {a: v["best_steps"] for a, v in p["algorithms"].items()}
            parts = []
            if "newton" in best:
                nt = best["newton"]
                slope = np.polyfit(np.arange(len(nt)), nt, 1)[0] if len(nt) > 1 else math.nan
                parts.append(f"Newton steps per layer {nt} (slope {slope:.2f} steps per layer)")
            if "gd" in best:
                gd = best["gd"]
                ratio = (np.exp(np.polyfit(np.arange(len(gd)), np.log2(np.maximum(gd, 1)), 1)[0] * np.log(2))
                         if len(gd) > 1 else math.nan)
                parts.append(f"GD steps per layer {gd} (x{ratio:.2f} per layer)")
            if "online_gd" in best:
                parts.append(f"online-GD passes per layer {best['online_gd']}")
            out.append(f"{p['title'] or name}: " + "; ".join(parts))
        rows = {(r["method"], r["point"].get("condition"), r["point"].get("k")): r["mean"] for r in results["rows"]
                if r["grid"] == "main" and r["metric"] == "sq_error"}
        t = self.task(cfg)
        k = t.n_points - 1
        for c in s.conditions:
            def m(name):
                v = rows.get((name, float(c), k))
                return math.nan if v is None else v
            shown = [n for n in (*s.networks, "least_squares", f"newton_{s.newton_steps[-1]}",
                                 f"gd_{s.gd_steps[-1]}", "online_gd") if not math.isnan(m(n))]
            out.append(f"condition {c:g}, k = {k}: " + ", ".join(f"{n} {m(n):.3g}" for n in shown))
        return out


STUDY = SecondOrderStudy()
