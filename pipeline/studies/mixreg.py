"""The mixture of linear regressions in context: a transformer vs EM and the oracle, across SNR and
prompt length (Jin, Balasubramanian, Lai 2024). docs/studies/mixreg.md

Networks: one set transformer trained on prompts of the symmetric two-component mixture with the
SNR drawn per prompt; one trained on the K-component mixture (`components`, K independent
regressors) at high SNR. Grids: `main` (symmetric), SNR x number of examples of the evaluation
prompts; `components` (K regressors), the same axes at high SNRs. Methods: the network, EM (exact
M step; random start, or the spectral start for the symmetric mixture), EM with the gradient M
step, the oracle least squares that knows every example's component, ordinary least squares.
Probe: every layer's beta read-out vs EM iterations (symmetric mixture).
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.config import ConfigError, _f
from pipeline.core.probe import Probe
from pipeline.core.study import Figure, Grid, Method, Study, StudySection, Table, Unit, check_step_counts
from pipeline.families.mixreg import FAMILY

METHODS = ("em", "em_spectral", "em_gd", "oracle", "ols")


@dataclass
class MixRegSection(StudySection):
    n_tasks: int = _f(512, "evaluation prompts per (SNR, n)", min=1)
    snrs: list[float] = _f([0.5, 1.0, 2.0, 4.0], "SNRs ||beta|| / sigma of the evaluation prompts")
    n_points: list[int] = _f([8, 16, 32], "examples per evaluation prompt (the network is trained at task n_points)")
    methods: list[str] = _f(list(METHODS), "classical estimators", choices=METHODS)
    probe_em: list[int] = _f([0, 1, 2, 3, 4, 6, 8, 12, 16, 20], "probing: EM iterations compared with every layer")
    probe_snr: float = _f(2.0, "probing: the SNR of the held-out prompts (one of snrs)")
    probe_tasks: int = _f(1024, "probing: probe-training prompts (fresh draws)", min=16)
    probe_fit_steps: int = _f(150, "probing: Adam steps of each layer's fresh read-out head", min=1)
    components: int = _f(3, "K of the K-component network and grid (K independent unit regressors); 0 = none",
                         min=0, max=8)
    components_snrs: list[float] = _f([2.0, 4.0, 8.0], "K-component grid: evaluation SNRs; its network trains "
                                                       "on SNR log-uniform over [min, max] of them")
    components_tasks: int = _f(256, "K-component grid: evaluation prompts per (SNR, n)", min=1)


class MixRegStudy(Study):
    name = "mixreg"
    family = "mixreg"
    title = "Mixture of linear regressions in context: a transformer vs EM and the oracle"
    Config = MixRegSection
    doc = "docs/studies/mixreg.md"

    def check(self, cfg):
        s = self.section(cfg)
        if not s.snrs or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 for v in s.snrs):
            raise ConfigError(f"{self.name}.snrs: positive numbers, got {s.snrs}")
        if not s.n_points or any(isinstance(v, bool) or not isinstance(v, int) or v < 2 for v in s.n_points):
            raise ConfigError(f"{self.name}.n_points: integers >= 2, got {s.n_points}")
        check_step_counts(f"{self.name}.probe_em", s.probe_em)
        if s.components == 1 or s.components == 2:
            raise ConfigError(f"{self.name}.components: 0 (none) or >= 3 (K = 2 is the symmetric main grid), "
                              f"got {s.components}")
        if s.components and (not s.components_snrs or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                                           or v <= 0 for v in s.components_snrs)):
            raise ConfigError(f"{self.name}.components_snrs: positive numbers, got {s.components_snrs}")
        if float(s.probe_snr) not in [float(v) for v in s.snrs]:
            raise ConfigError(f"{self.name}.probe_snr: {s.probe_snr} is not one of snrs {s.snrs}")

    def k_unit(self, cfg) -> str:
        return f"transformer_k{self.section(cfg).components}"

    def units(self, cfg):
        s = self.section(cfg)
        out = [Unit("transformer")]
        if s.components:
            lo, hi = float(min(s.components_snrs)), float(max(s.components_snrs))
            out.append(Unit(self.k_unit(cfg), {"task": {"components": s.components, "snr": lo, "snr_max": hi}},
                            label=f"transformer (K = {s.components})"))
        return out

    def point_task(self, cfg, grid, point):
        v = float(point["snr"])
        k = self.section(cfg).components if grid is not None and grid.name == "components" else 2
        return self.task(cfg, snr=v, snr_max=v, n_points=int(point["n"]), components=k)

    def grids(self, cfg):
        from pipeline.core import rng
        from pipeline.families.mixreg.data import sample_mixreg

        s = self.section(cfg)

        def set_maker(K: int, n_tasks: int):
            """The evaluation set of a point: (seed, EVAL, d, n, 100 SNR), plus K for K >= 3 regressors."""
            def make(cfg, p):
                v, n, d = float(p["snr"]), int(p["n"]), self.task(cfg).d
                words = (d, n, int(round(100 * v))) + (() if K == 2 else (K,))
                g = rng.make_generator(cfg.seed, rng.EVAL, *words)
                return sample_mixreg(n_tasks, d, n, g, snr=v, snr_max=v, components=K)
            return make

        def methods(cfg, p):
            return [Method("transformer", unit="transformer"), *[Method(m, solver=m) for m in s.methods]]

        points = [{"snr": float(v), "n": int(n)} for v in s.snrs for n in s.n_points]
        grids = [Grid("main", ["snr", "n"], points, set_maker(2, s.n_tasks), methods, n_tasks=s.n_tasks,
                      title=FAMILY.describe(self.task(cfg)))]
        if s.components:
            K = s.components

            def k_methods(cfg, p):  # the spectral start is for the symmetric mixture only
                return [Method("transformer", unit=self.k_unit(cfg)),
                        *[Method(m, solver=m) for m in s.methods if m != "em_spectral"]]

            k_points = [{"snr": float(v), "n": int(n)} for v in s.components_snrs for n in s.n_points]
            grids.append(Grid("components", ["snr", "n"], k_points, set_maker(K, s.components_tasks), k_methods,
                              n_tasks=s.components_tasks,
                              title=f"{K} regressors: " + FAMILY.describe(self.task(cfg, components=K))))
        return grids

    def probes(self, cfg):
        s = self.section(cfg)
        n = self.task(cfg).n_points
        point = {"snr": float(s.probe_snr), "n": n if n in s.n_points else int(s.n_points[-1])}
        return [Probe("transformer", "transformer", "main", point, {"em": list(s.probe_em)}, n_fit=s.probe_tasks,
                      fit="trained", fit_steps=s.probe_fit_steps, title=f"SNR {s.probe_snr:g}, n = {point['n']}")]

    def tables(self, cfg):
        out = [Table("main", "beta_error", "snr", title="min_s ||s beta_hat - beta||^2 by SNR (one table per n)"),
               Table("main", "vs_oracle", "snr", title="excess error relative to the oracle, by SNR")]
        if self.section(cfg).components:
            out += [Table("components", "beta_error", "snr",
                          title="K regressors: matched mean ||beta_hat_pi(k) - beta_k||^2 by SNR (one table per n)"),
                    Table("components", "vs_oracle", "snr", title="K regressors: excess error relative to the oracle")]
        return out

    def figures(self, cfg):
        out = [Figure("beta_error_vs_snr", "main", "beta_error", "snr", panels="n", title="error vs SNR",
                      xscale="log2"),
               Figure("beta_error_vs_n", "main", "beta_error", "n", panels="snr", title="error vs examples")]
        if self.section(cfg).components:
            out.append(Figure("components_error_vs_snr", "components", "beta_error", "snr", panels="n",
                              title=f"{self.section(cfg).components} regressors: error vs SNR", xscale="log2"))
        return out

    def notes(self, cfg, results):
        out = []
        for grid, label in (("main", ""), ("components", f"K = {self.section(cfg).components}, ")):
            rows = {(r["method"], r["point"]["snr"], r["point"]["n"]): r for r in results["rows"]
                    if r["grid"] == grid and r["metric"] == "beta_error" and r["applicable"]}
            for (m, snr, n), r in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][2])):
                ems = [rows[(e, snr, n)] for e in ("em", "em_spectral", "em_gd") if (e, snr, n) in rows]
                if m != "transformer" or not ems:
                    continue
                em = min(ems, key=lambda e: e["mean"])
                ci = (r["ci95"] or 0) + (em["ci95"] or 0)
                gap = em["mean"] - r["mean"]
                verdict = "beats" if gap > ci else ("ties with" if abs(gap) <= ci else "trails")
                oracle = rows.get(("oracle", snr, n), {}).get("mean")
                out.append(f"{label}SNR {snr:g}, n = {n}: transformer {r['mean']:.3g} {verdict} the best EM "
                           f"({em['method']} {em['mean']:.3g})" + (f"; oracle {oracle:.3g}" if oracle is not None else ""))
        for name, p in (results["meta"].get("probes") or {}).items():
            a = p["algorithms"]["em"]
            out.append(f"probe {p['title']}: EM iterations of equal error per layer {a.get('error_matched_steps')}; "
                       f"residual-cosine best match {a['best_steps']}")
        return [o for o in out if o]


STUDY = MixRegStudy()
