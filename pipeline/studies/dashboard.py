"""The W&B dashboard of the TGMM studies, defined in code with `wandb-workspaces`.

`python -m pipeline dashboard` builds one W&B report with a section per study:

  * TGMM main study      eval ℓ2 per K and method (runs: group <wandb.group or study>, job type evaluate)
  * Robustness           ℓ2 vs test N per training N0, ℓ2 vs σ_p per method, error vs N for the fixed
                         model (the run of `python -m pipeline robustness evaluate`: group and job type
                         "robustness", curves logged against robustness/curve/N and .../sigma_p)
  * Scaling sweeps       one grid per sweep group (sweep-depth, sweep-width, sweep-heads,
                         sweep-sample_size): val/l2 against the swept parameter

Online (W&B credentials configured and the resolved mode is online) the report is saved and its
URL printed. Otherwise the plan (title, sections, run filters, panels and their metrics) is
printed and nothing touches the network; exit status 0 either way.

Config keys are referenced in W&B's *flat* form (`config:model.n_layer.value`): the runs log
`tracking.run_config`, which flattens params to dotted keys such as "model.n_layer".
"""
from __future__ import annotations

import argparse
import sys

from pipeline.config import Config
from pipeline.studies.robustness import GROUP as ROBUSTNESS_GROUP
from pipeline.tuning.spec import sweep_group

TITLE = "TGMM: robustness and scaling"
# sweep name -> the parameter it varies (a dotted key of params.yaml, as the runs' config holds it)
SCALING_SWEEPS = {"depth": "model.n_layer", "width": "model.n_embd", "heads": "model.n_head",
                  "sample_size": "task.n0"}
SWEEP_METRIC = "val/l2"


def _flat_config_key(param: str) -> str:
    """The groupby path of a flat dotted config key: 'model.n_layer' -> 'config.model.n_layer.value'."""
    return f"config.{param}.value"


def _runset(entity: str, project: str, name: str, group: str, job_type: str | None = None,
            groupby: list[str] | None = None):
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    filters = [expr.Metric("Group") == group]
    if job_type:
        filters.append(expr.Metric("JobType") == job_type)
    return wr.Runset(entity=entity, project=project, name=name, filters=expr.And(*filters), groupby=groupby or [])


def _main_section(cfg: Config, entity: str, project: str) -> list:
    import wandb_workspaces.reports.v2 as wr

    group = cfg.wandb.group or cfg.study
    methods = ["tgmm", *cfg.baselines.methods]
    panels = [wr.BarPlot(title=f"eval ℓ2, K = {K} (d ∈ {{{', '.join(map(str, cfg.task.dims))}}})",
                         metrics=[f"eval/l2/d={d}/K={K}/{m}" for d in cfg.task.dims for m in methods],
                         orientation="v", title_y="ℓ2 error")
              for K in cfg.task.ks]
    return [wr.H2(text="TGMM main study"),
            wr.MarkdownBlock(text="Permutation-invariant ℓ2 error of the trained network and the classical "
                                  "baselines on the fixed evaluation sets, per number of components K "
                                  "(`python -m pipeline evaluate`)."),
            wr.PanelGrid(runsets=[_runset(entity, project, "TGMM evaluation", group, "evaluate")], panels=panels)]


def _robustness_sections(cfg: Config, entity: str, project: str) -> list:
    import wandb_workspaces.reports.v2 as wr

    from pipeline.studies.robustness import fixed_n0

    r = cfg.robustness
    fixed = f"tgmm_n0={fixed_n0(cfg)}"
    baselines = list(cfg.baselines.methods)

    def runset(name):
        return _runset(entity, project, name, ROBUSTNESS_GROUP, "robustness")

    size = [wr.LinePlot(title=f"ℓ2 vs test N per training N0, K = {K}", x="robustness/curve/N",
                        y=[f"robustness/curve/sample_size/l2/K={K}/{s}"
                           for s in [*(f"tgmm_n0={n0}" for n0 in r.train_n0), *baselines]],
                        log_x=True, log_y=True, title_x="test sample size N", title_y="ℓ2 error")
            for K in cfg.task.ks]
    fixed_panel = wr.LinePlot(title=f"error vs N for a fixed model (TGMM N0 = {fixed_n0(cfg)})",
                              x="robustness/curve/N",
                              y=[f"robustness/curve/sample_size/l2/K={K}/{fixed}" for K in cfg.task.ks],
                              log_x=True, log_y=True, title_x="sample size N at inference", title_y="ℓ2 error")
    shift = [wr.LinePlot(title=f"ℓ2 vs σ_p per method, K = {K}", x="robustness/curve/sigma_p",
                         y=[f"robustness/curve/shift/l2/K={K}/{s}" for s in [fixed, *baselines]],
                         log_y=True, title_x="mean perturbation σ_p", title_y="ℓ2 error")
             for K in cfg.task.ks]
    return [wr.H2(text="Robustness: sample size"),
            wr.MarkdownBlock(text=f"d = {r.d}: TGMM trained at N0 ∈ {r.train_n0} and the baselines, tested at "
                                  f"N ∈ {r.eval_n} on the same tasks (`python -m pipeline robustness evaluate`; "
                                  "flat metrics robustness/sample_size/l2/n0=<N0>/N=<N>/K=<K>/<method>)."),
            wr.PanelGrid(runsets=[runset("Robustness: sample size")], panels=[*size, fixed_panel]),
            wr.H2(text="Robustness: distribution shift"),
            wr.MarkdownBlock(text=f"Test means perturbed by N(0, σ_p² I), σ_p ∈ {r.sigma_p}, N = {cfg.eval.n} "
                                  "(flat metrics robustness/shift/l2/sigma_p=<σ>/K=<K>/<method>)."),
            wr.PanelGrid(runsets=[runset("Robustness: distribution shift")], panels=shift)]


def _scaling_sections(entity: str, project: str) -> list:
    import wandb_workspaces.reports.v2 as wr

    blocks = [wr.H2(text="Scaling sweeps"),
              wr.MarkdownBlock(text=f"Ray Tune sweeps (`python -m pipeline sweep <name>`): {SWEEP_METRIC} of "
                                    "each trial, grouped by the swept parameter (bars: mean over trials, "
                                    "whiskers: min–max).")]
    for name, param in SCALING_SWEEPS.items():
        key = _flat_config_key(param)
        blocks += [
            wr.H3(text=f"{sweep_group(name)}: {SWEEP_METRIC} vs {param}"),
            wr.PanelGrid(
                runsets=[_runset(entity, project, sweep_group(name), sweep_group(name), groupby=[key])],
                panels=[wr.BarPlot(title=f"{SWEEP_METRIC} vs {param}", metrics=[SWEEP_METRIC], groupby=key,
                                   groupby_aggfunc="mean", groupby_rangefunc="minmax", orientation="v",
                                   title_x=param, title_y=SWEEP_METRIC),
                        wr.LinePlot(title=f"{SWEEP_METRIC} during training, by {param}", x="trainer/global_step",
                                    y=[SWEEP_METRIC], groupby=key, groupby_aggfunc="mean",
                                    groupby_rangefunc="minmax", log_y=True, title_y=SWEEP_METRIC)]),
        ]
    return blocks


def build_report(cfg: Config, entity: str | None, project: str):
    """The dashboard as a wandb_workspaces Report (nothing is sent). `entity` None = the default entity,
    resolved only when saving; the runsets then name no entity (the report's own)."""
    import wandb_workspaces.reports.v2 as wr

    ent = entity or ""
    blocks = [wr.MarkdownBlock(text="Defined in code: `pipeline/studies/dashboard.py` "
                                    "(`python -m pipeline dashboard`)."),
              wr.TableOfContents(),
              *_main_section(cfg, ent, project), *_robustness_sections(cfg, ent, project),
              *_scaling_sections(ent, project)]
    return wr.Report(project=project, entity=ent, title=TITLE,
                     description="TGMM (Chen, Wu, Fang 2025): main evaluation, robustness (sample size, "
                                 "distribution shift, inference-time N) and scaling sweeps.",
                     blocks=blocks, width="fluid")


# ----------------------------------------------------------------------------- the printed plan

def _metric_name(m) -> str:
    if isinstance(m, str):
        return m
    kind = type(m).__name__
    return f"{kind}({getattr(m, 'name', m)!r})"


def _panel_line(p) -> str:
    kind = type(p).__name__
    title = getattr(p, "title", None) or ""
    parts = []
    if hasattr(p, "x") and getattr(p, "x", None) is not None:
        parts.append(f"x={_metric_name(p.x)}")
    metrics = getattr(p, "y", None) or getattr(p, "metrics", None) or []
    if metrics:
        parts.append("metrics=" + ", ".join(_metric_name(m) for m in metrics))
    if getattr(p, "groupby", None):
        parts.append(f"grouped by {_metric_name(p.groupby)}")
    return f"    - {kind} \"{title}\": " + "; ".join(parts)


def describe(report) -> str:
    """A readable plan of the report: title, sections, run filters, panels and their metrics."""
    import wandb_workspaces.reports.v2 as wr

    lines = [f"W&B report \"{report.title}\" in {report.entity or '<default entity>'}/{report.project}",
             f"  {report.description}"]
    for b in report.blocks:
        if isinstance(b, (wr.H1, wr.H2)):
            lines += ["", f"Section: {b.text}"]
        elif isinstance(b, wr.H3):
            lines.append(f"  Subsection: {b.text}")
        elif isinstance(b, wr.PanelGrid):
            for rs in b.runsets:
                extra = f"; grouped by {', '.join(rs.groupby)}" if rs.groupby else ""
                lines.append(f"  runs \"{rs.name}\": {rs.filters}{extra}")
            lines += [_panel_line(p) for p in b.panels]
    return "\n".join(lines)


def panel_grids(report) -> list:
    import wandb_workspaces.reports.v2 as wr

    return [b for b in report.blocks if isinstance(b, wr.PanelGrid)]


# ----------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--entity", default=None, help="W&B entity (default: params wandb.entity, else yours)")
    parser.add_argument("--project", default=None, help="W&B project (default: params wandb.project)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan even when W&B is online")


def is_online(cfg: Config) -> bool:
    from pipeline.training.tracking import has_credentials, resolve_mode

    return resolve_mode(cfg.wandb.mode) == "online" and has_credentials()


def main(args: argparse.Namespace, cfg: Config) -> int:
    entity = args.entity or cfg.wandb.entity
    project = args.project or cfg.wandb.project
    online = is_online(cfg) and not args.dry_run
    report = build_report(cfg, entity, project)
    if not online:
        why = "--dry-run" if args.dry_run else "W&B is offline/disabled or has no credentials"
        print(f"[dashboard] {why}: not saved. Would create:\n")
        print(describe(report))
        return 0
    try:
        if not entity:  # resolved only now: the default entity needs the API
            import wandb

            report.entity = wandb.Api().default_entity
            for grid in panel_grids(report):
                for rs in grid.runsets:
                    rs.entity = report.entity
        report.save()
        print(f"[dashboard] saved {report.url}")
    except Exception as e:  # a dashboard must not fail the pipeline with a traceback
        print(f"error: could not save the W&B report ({type(e).__name__}: {str(e).splitlines()[0][:300]})",
              file=sys.stderr)
        return 1
    return 0
