"""In-context linear regression (Garg et al. 2022): does a causal transformer trained on prompts
x_1, y_1, ..., x_n, y_n track least squares? docs/studies/linreg.md

Network: one (`main`), trained with the family's curriculum. Grid: one point; the metric has the
axis k (number of in-context examples), so every method's error curve over k = 0 .. n-1 is one
evaluation. Classical solvers answer for every prefix length at once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.core import rng
from pipeline.core.config import _f
from pipeline.core.study import StudySection, Figure, Grid, Method, Study, Table, Unit
from pipeline.families.linreg import FAMILY
from pipeline.families.linreg.data import sample_linreg

METHODS = tuple(FAMILY.solvers)


@dataclass
class LinRegSection(StudySection):
    n_tasks: int = _f(1280, "evaluation prompts (Garg et al.: 1280)", min=1)
    methods: list[str] = _f(["least_squares", "averaging", "knn", "gd", "newton"], "classical solvers compared",
                            choices=METHODS)
    model: dict = _f({"position": "gpt2"}, "overrides of `model` (the transformer must be causal: position gpt2)")


class LinRegStudy(Study):
    name = "linreg"
    family = "linreg"
    title = "In-context linear regression: transformer vs least squares, averaging, 3-NN, GD and Newton"
    Config = LinRegSection
    doc = "docs/studies/linreg.md"

    def units(self, cfg):
        return [Unit("main")]

    def grids(self, cfg):
        s = self.section(cfg)

        def make_set(cfg, p):
            t = self.task(cfg)
            g = rng.make_generator(cfg.seed, rng.EVAL, t.d, t.n_points)
            return sample_linreg(s.n_tasks, t.d, t.n_points, g, noise_std=t.noise_std, condition=t.condition)

        def methods(cfg, p):
            return [Method("transformer", unit="main"), *[Method(m, solver=m) for m in s.methods]]

        return [Grid("main", [], [{}], make_set, methods, title=FAMILY.describe(self.task(cfg)),
                     n_tasks=s.n_tasks)]

    def table_ks(self, cfg) -> tuple[int, ...]:
        t = self.task(cfg)
        return tuple(sorted({k for k in (0, t.d // 2, t.d, 2 * t.d) if k < t.n_points}))

    def tables(self, cfg):
        return [Table("main", "sq_error", "k", values=self.table_ks(cfg),
                      title="Squared error / d after k in-context examples, mean ± 95 % CI")]

    def figures(self, cfg):
        return [Figure("error_vs_k", "main", "sq_error", "k", title="squared error / d vs in-context examples k")]

    def notes(self, cfg, results):
        """The study's questions answered from the results: does the transformer track least squares, and
        does it beat averaging and 3-NN at every k >= 1?"""
        t = self.task(cfg)
        rows = {(r["method"], r["point"]["k"]): r for r in results["rows"] if r["metric"] == "sq_error"}
        ks = sorted({k for _, k in rows})

        def mean(m, k):
            r = rows.get((m, k))
            return math.nan if r is None or r["mean"] is None else r["mean"]

        out = []
        if t.condition == 1 and t.noise_std == 0:
            gaps = [abs(mean("transformer", k) - max(0.0, 1 - k / t.d)) for k in ks]
            out.append(f"noiseless isotropic least squares has error 1 - k/d for k < d and 0 for k >= d; the "
                       f"transformer's largest gap to that curve is {max(gaps):.3g} (at k = {ks[gaps.index(max(gaps))]})")
        for other in ("averaging", "knn", "least_squares"):
            if any((other, k) in rows for k in ks):
                beats = [k for k in ks if k >= 1 and mean("transformer", k) < mean(other, k)]
                worse = [k for k in ks if k >= 1 and k not in beats]
                out.append(f"transformer vs {other}: lower mean error at {len(beats)} of {len(ks) - 1} prefix lengths "
                           "k >= 1" + (f" (not at k = {', '.join(map(str, worse))})" if worse else ""))
        return out


STUDY = LinRegStudy()
