"""The W&B dashboard of every study, defined in code with `wandb-workspaces`.

`python -m pipeline dashboard` builds one W&B report with a section per study in params.yaml
`studies` (drawn from the study's declaration: its grids, points, methods and the family's
metrics; runs: the study's W&B group, job type evaluate, metric keys
<study>/<grid>/<metric>/<point>/<method> as core/evaluate.flat_metrics logs them) and one
section per sweep (sweeps/*.yaml: its metric against each swept parameter, group sweep-<name>).

Online (W&B credentials configured and the resolved mode is online) the report is saved and its
URL printed. Otherwise the plan (title, sections, run filters, panels and their metrics) is
printed and nothing touches the network; exit status 0 either way.

Config keys are referenced in W&B's *flat* form (`config:model.n_layer.value`): training runs log
`tracking.run_record`, which flattens a run's params to dotted keys such as "model.n_layer".
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.core.config import Config

TITLE = "Transformers as algorithm simulators: every study"


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


def _axis_size(cfg: Config, st, fam, grid, point: dict, metric) -> int | None:
    """How many values the per-task axis of `metric` (e.g. k of in-context regression) has at `point`:
    the declaration does not say, so one task of the point's set is scored by its first classical
    solver (what evaluate does for every task). None if no solver of the grid answers."""
    batch = grid.make_set(cfg, point)
    one = batch.slice(0, 1)
    task = st.point_task(cfg, grid, point)
    for m in grid.methods(cfg, point):
        if m.solver is None or m.solver not in fam.solvers:
            continue
        est = fam.solvers[m.solver].factory(st.solver_params(cfg), cfg.seed, task)(one)
        if getattr(est, "applicable", True):
            return int(metric.fn(one, est).shape[1])
    return None


def _study_section(cfg: Config, name: str, entity: str, project: str) -> list:
    """Per grid and metric: a bar plot of every (point, method) mean; a metric with a per-task axis:
    per point, a bar plot of every (axis value, method) mean. Metric keys as evaluate.flat_metrics."""
    import wandb_workspaces.reports.v2 as wr

    from pipeline import studies as S
    from pipeline.core import family as F
    from pipeline.core.evaluate import point_key

    st = S.get(name)
    fam = F.get(st.family)
    panels = []
    for grid in st.grids(cfg):
        methods = list(dict.fromkeys(m.name for p in grid.points for m in grid.methods(cfg, p)))
        for metric in fam.metrics.values():
            if metric.axis is None:
                keys = [f"{name}/{grid.name}/{metric.name}/" + "/".join(f"{k}={v}" for k, v in p.items()) + f"/{m}"
                        for p in grid.points for m in methods]
                panels.append(wr.BarPlot(title=f"{grid.title or grid.name}: {metric.label}", metrics=keys,
                                         orientation="v", title_y=metric.label))
            else:
                for p in grid.points:
                    prefix = "".join(f"{k}={v}/" for k, v in p.items())
                    size = _axis_size(cfg, st, fam, grid, p, metric)
                    values = [str(i) for i in range(size)] if size is not None else ["*"]
                    here = [m.name for m in grid.methods(cfg, p)]
                    where = f" {point_key(p)}" if p else ""
                    panels.append(wr.BarPlot(
                        title=f"{grid.title or grid.name}{where}: {metric.label} per {metric.axis}",
                        metrics=[f"{name}/{grid.name}/{metric.name}/{prefix}{metric.axis}={i}/{m}"
                                 for i in values for m in here], orientation="v", title_y=metric.label))
    return [wr.H2(text=st.title),
            wr.MarkdownBlock(text=f"Study `{name}` (family `{st.family}`; {st.doc}): every method on the same "
                                  f"fixed evaluation sets (`python -m pipeline --study {name} evaluate`)."),
            wr.PanelGrid(runsets=[_runset(entity, project, f"{name} evaluation", name, "evaluate")], panels=panels)]


def _sweep_sections(cfg: Config, entity: str, project: str, root: Path = Path("sweeps")) -> list:
    import wandb_workspaces.reports.v2 as wr

    from pipeline.core.plan import sweep_names
    from pipeline.tuning.spec import load_spec, sweep_group

    blocks = [wr.H2(text="Scaling sweeps"),
              wr.MarkdownBlock(text="Ray Tune sweeps (`python -m pipeline sweep sweeps/<name>.yaml`): each trial's "
                                    "metric, grouped by the swept parameter (bars: mean over trials, whiskers: min–max).")]
    for name in sweep_names(root):
        spec = load_spec(root / f"{name}.yaml", cfg)
        for param in spec.param_keys:
            key = _flat_config_key(param)
            blocks += [
                wr.H3(text=f"{sweep_group(name)} ({spec.study}): {spec.metric} vs {param}"),
                wr.PanelGrid(
                    runsets=[_runset(entity, project, sweep_group(name), sweep_group(name), groupby=[key])],
                    panels=[wr.BarPlot(title=f"{spec.metric} vs {param}", metrics=[spec.metric], groupby=key,
                                       groupby_aggfunc="mean", groupby_rangefunc="minmax", orientation="v",
                                       title_x=param, title_y=spec.metric),
                            wr.LinePlot(title=f"{spec.metric} during training, by {param}", x="trainer/global_step",
                                        y=[spec.metric], groupby=key, groupby_aggfunc="mean",
                                        groupby_rangefunc="minmax", log_y=True, title_y=spec.metric)]),
            ]
    return blocks


def build_report(cfg: Config, entity: str | None, project: str):
    """The dashboard as a wandb_workspaces Report (nothing is sent). `entity` None = the default entity,
    resolved only when saving; the runsets then name no entity (the report's own)."""
    import wandb_workspaces.reports.v2 as wr

    ent = entity or ""
    blocks = [wr.MarkdownBlock(text="Defined in code: `pipeline/core/dashboard.py` (`python -m pipeline dashboard`)."),
              wr.TableOfContents()]
    for name in cfg.studies:
        blocks += _study_section(cfg, name, ent, project)
    blocks += _sweep_sections(cfg, ent, project)
    return wr.Report(project=project, entity=ent, title=TITLE,
                     description="Every study's evaluation (one section per study) and the scaling sweeps.",
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
    from pipeline.core.tracking import has_credentials, resolve_mode

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
