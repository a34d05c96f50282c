"""TGMM flexibility (Chen, Wu, Fang 2025): backbones at a matched parameter count, and anisotropic
mixtures. docs/studies/ablation.md

Networks. Each `ablation.variants` entry is `model` with a few keys overridden, e.g. {backbone: mamba2}
or {attention: relu}; with `match_params` its width n_embd is chosen so that the whole network
(read-in, backbone, read-outs) has the parameter count closest to the base network's (depth and
heads stay; a variant that sets n_embd keeps it). The variant equal to the base network at
d = ablation.d is the tgmm study's network (same run, one copy). `anisotropic`: the base network
trained on anisotropic mixtures (it also predicts the scales).

Grids: `backbones` (K): the tgmm study's tasks at d (same seeds, so the same tasks), every variant
and the baselines; `anisotropic` (K): their anisotropic counterparts (EM fits diagonal
covariances; the spectral method is not applicable).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipeline.core.config import ConfigError, _f, check_model, model_with
from pipeline.core.study import StudySection, Figure, Grid, Method, Study, Unit
from pipeline.families.gmm import FAMILY
from pipeline.families.gmm.config import check_sample_size
from pipeline.studies.tgmm import GMM_METHODS, eval_set, gmm_tables

ANISO = "anisotropic"
_COUNTS: dict[str, int] = {}  # run identity -> parameter count (meta-device builds are not free)


@dataclass
class AblationSection(StudySection):
    d: int = _f(2, "dimension of the backbone ablation and the anisotropic study", min=1)
    n_tasks: int = _f(256, "evaluation tasks per K (as tgmm.n_tasks: the same tasks)", min=1)
    n: int = _f(128, "sample size of every evaluation task", min=2)
    variants: dict = _f({"transformer": {}, "relu_attention": {"attention": "relu"},
                         "linear_attention": {"attention": "linear"}, "mamba2": {"backbone": "mamba2"},
                         "lstm": {"backbone": "lstm"}},
                        "name -> overrides of `model`; {} is the base network. Switching backbone resets the keys "
                        "only the other backbone reads; attention/position imply the transformer", named=True)
    match_params: bool = _f(True, "choose each variant's n_embd so its parameter count is closest to the base "
                                  "network's (depth and heads unchanged)")
    methods: list[str] = _f(list(GMM_METHODS), "classical solvers compared", choices=GMM_METHODS)
    anisotropic: bool = _f(True, "also train and evaluate the network on anisotropic mixtures (the `anisotropic` "
                                 "network and grid)")


class AblationStudy(Study):
    name = "ablation"
    family = "gmm"
    title = "TGMM flexibility: backbones at matched parameter count, anisotropic mixtures"
    Config = AblationSection
    doc = "docs/studies/ablation.md"

    def check(self, cfg):
        a = self.section(cfg)
        if ANISO in a.variants:
            raise ConfigError("ablation.variants.anisotropic: the name is taken by the anisotropic network; rename it")
        check_sample_size(a.n, self.task(cfg).ks, "ablation.n")

    def _count(self, cfg, model: dict) -> int:
        import json

        from pipeline.core.network import count_parameters

        run = self.run(cfg, Unit("count", {"task": {"d": self.section(cfg).d}, "model": model}))
        key = json.dumps(run.identity(), sort_keys=True)
        if key not in _COUNTS:
            _COUNTS[key] = count_parameters(run)
        return _COUNTS[key]

    def matched_model(self, cfg, name: str) -> dict:
        """The variant's model (a full dict); with match_params, at the width whose parameter count is
        closest to the base network's (ties: the narrower). Widths tried: multiples of n_head up to
        4x the base width that pass the variant's own checks."""
        from pipeline.core.config import _build, ModelConfig

        a = self.section(cfg)
        base = _build(ModelConfig, self.base_run(cfg)["model"], f"{self.name}.model")
        where = f"ablation.variants.{name}"
        m = model_with(base, a.variants[name], where)
        if not a.match_params or "n_embd" in a.variants[name] or m == base:
            return dataclasses.asdict(m)
        target = self._count(cfg, dataclasses.asdict(base))
        widths = []
        for width in range(m.n_head, 4 * base.n_embd + 1, m.n_head):
            try:
                check_model(dataclasses.replace(m, n_embd=width), where)
                widths.append(width)
            except ConfigError:
                continue
        if not widths:
            raise ConfigError(f"{where}: no width up to {4 * base.n_embd} satisfies the variant's constraints "
                              "(check headdim / n_head)")

        def count(i: int) -> int:
            return self._count(cfg, dataclasses.asdict(dataclasses.replace(m, n_embd=widths[i])))

        lo, hi = 0, len(widths) - 1  # the count grows with the width: bisect for the first width >= target
        while lo < hi:
            mid = (lo + hi) // 2
            if count(mid) < target:
                lo = mid + 1
            else:
                hi = mid
        cands = [i for i in (lo - 1, lo) if 0 <= i < len(widths)]
        best = min(cands, key=lambda i: (abs(count(i) - target), widths[i]))  # ties: the narrower
        return dataclasses.asdict(dataclasses.replace(m, n_embd=widths[best]))

    def units(self, cfg):
        from pipeline.models.backbone import describe
        from pipeline.core.config import ModelConfig

        a = self.section(cfg)
        out = []
        for name in a.variants:
            m = self.matched_model(cfg, name)
            out.append(Unit(name, {"task": {"d": a.d}, "model": m}, label=describe(ModelConfig(**m))))
        if a.anisotropic:
            out.append(Unit(ANISO, {"task": {"d": a.d, "anisotropic": True}}, label="anisotropic"))
        return out

    def point_task(self, cfg, grid, point):
        return self.task(cfg, d=self.section(cfg).d, anisotropic=grid.name == ANISO)

    def grids(self, cfg):
        a = self.section(cfg)
        ks = self.task(cfg).ks
        baselines = [Method(m, solver=m) for m in a.methods]

        def iso(cfg, p):
            return eval_set(cfg, self.task(cfg, d=a.d, anisotropic=False), p["K"], a.n_tasks, a.n)

        def aniso(cfg, p):
            return eval_set(cfg, self.task(cfg, d=a.d, anisotropic=True), p["K"], a.n_tasks, a.n)

        variants = [Method(v, unit=v) for v in a.variants]
        grids = [Grid("backbones", ["K"], [{"K": K} for K in ks], iso, lambda cfg, p: [*variants, *baselines],
                      title=f"backbones at d = {a.d}", n_tasks=a.n_tasks)]
        if a.anisotropic:
            grids.append(Grid(ANISO, ["K"], [{"K": K} for K in ks], aniso,
                              lambda cfg, p: [Method("tgmm", unit=ANISO), *baselines],
                              title=f"anisotropic mixtures at d = {a.d}", n_tasks=a.n_tasks))
        return grids

    def tables(self, cfg):
        out = [*gmm_tables("backbones")[:2]]
        if self.section(cfg).anisotropic:
            out += [gmm_tables(ANISO)[0], gmm_tables(ANISO)[1]]
        return out

    def figures(self, cfg):
        out = [Figure("backbones_l2", "backbones", "l2", "K", title="l2 vs K per backbone (matched parameters)")]
        if self.section(cfg).anisotropic:
            out.append(Figure("anisotropic_l2", ANISO, "l2", "K", title="anisotropic mixtures: l2 vs K"))
        return out

    def notes(self, cfg, results):
        from pipeline.core.network import count_parameters
        from pipeline.core import plan as P

        plan = P.resolve_all(cfg, [self.name])
        lines = []
        for unit, rid in plan.studies[self.name].networks.items():
            run = plan.runs[rid]
            lines.append(f"{unit}: {plan.studies[self.name].labels[unit]}, {count_parameters(run):,} parameters "
                         f"(run `{rid}`)")
        return lines


STUDY = AblationStudy()
