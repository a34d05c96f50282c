"""A study's report, drawn from its declaration (core/study.py Table / Figure) and its long-format
results (core/results.py):

    report.md          title, per-metric definitions, the declared tables (mean ± 95 % CI, medians,
                       seconds), notes, and the figures
    figures/<name>.png one panel per value of `panels`, one line per method, mean ± 95 % CI
    plots/<name>.csv   the same data for `dvc plots` (template .dvc/plots/by_series*.json)
    metrics.json       every applicable mean, keyed <grid>/<metric>/<point>/<method> (`dvc metrics`)
"""
from __future__ import annotations

import csv
import itertools
import json
import math
import textwrap
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from pipeline.core import family as F  # noqa: E402
from pipeline.core.results import num  # noqa: E402

OFF_SCALE = 1e3  # on log axes, a mean this many times the panel's median is left out of the figure (noted)


def fmt(v: float) -> str:
    """3 significant digits, positional unless very small or large."""
    if not math.isfinite(v):
        return "nan"
    if v == 0 or 1e-4 <= abs(v) < 1e6:
        return np.format_float_positional(v, precision=3, unique=False, fractional=False, trim="-")
    return f"{v:.3g}"


def fmt_ci(mu: float, ci: float) -> str:
    """'mean ± ci', or the mean alone when the interval is undefined (one task)."""
    return fmt(mu) if not math.isfinite(ci) else f"{fmt(mu)} ± {fmt(ci)}"


def _key(point: dict) -> tuple:
    return tuple(sorted(point.items()))


class Index:
    """Rows of one results file, looked up by (grid, point, method, metric)."""

    def __init__(self, results: dict):
        self.results = results
        self.rows = results["rows"]
        self.by = {(r["grid"], _key(r["point"]), r["method"], r["metric"]): r for r in self.rows}
        self.na = {(r["grid"], _key(r["point"]), r["method"]) for r in self.rows if not r["applicable"]}

    def methods(self, grid: str) -> list[str]:
        return list(dict.fromkeys(r["method"] for r in self.rows if r["grid"] == grid))

    def get(self, grid: str, point: dict, method: str, metric: str) -> dict | None:
        row = self.by.get((grid, _key(point), method, metric))
        if row is None and (grid, _key({k: v for k, v in point.items() if k in self._axes(grid)}), method) in self.na:
            return {"applicable": False, "reason": "", "mean": None}
        return row

    def _axes(self, grid: str) -> list[str]:
        return self.results["meta"]["grids"][grid]["axes"]

    def values(self, grid: str, metric: str, axis: str) -> list:
        return sorted({r["point"][axis] for r in self.rows if r["grid"] == grid and r["metric"] == metric
                       and axis in r["point"]})


def _matches(point: dict, where: dict | None) -> bool:
    return not where or all(point.get(k) == v for k, v in where.items())


def _cell_text(row: dict | None, stat: str) -> tuple[str, float]:
    if row is None:
        return "", math.nan
    if not row["applicable"]:
        return "n/a", math.nan
    if stat == "median":
        v = num(row["median"])
        return fmt(v), v
    if stat == "seconds":
        v = num(row["seconds"])
        return fmt(v), v
    v = num(row["mean"])
    return fmt_ci(v, num(row["ci95"])), v


def table(index: Index, spec, metric) -> str:
    """Rows: methods; columns: the values of spec.cols; one block per value of the other axes."""
    grid = spec.grid
    axes = [a for a in index._axes(grid) + ([metric.axis] if metric.axis else []) if a != spec.cols]
    cols = index.values(grid, spec.metric, spec.cols)
    if spec.values is not None:
        cols = [c for c in cols if c in spec.values]
    others = [index.values(grid, spec.metric, a) for a in axes]
    methods = index.methods(grid)
    pick = min if metric.better == "lower" else max
    blocks = []
    for combo in itertools.product(*others):
        fixed = dict(zip(axes, combo))
        if not _matches({**fixed}, {k: v for k, v in (spec.where or {}).items() if k in fixed}):
            continue
        cells = {}
        for m in methods:
            for c in cols:
                point = {**fixed, spec.cols: c}
                cells[(m, c)] = _cell_text(index.get(grid, point, m, spec.metric), spec.stat)
        if all(t == "" for t, _ in cells.values()):
            continue
        best = {}
        if spec.stat != "seconds":
            for c in cols:
                vals = [v for (m, cc), (_, v) in cells.items() if cc == c and math.isfinite(v)]
                best[c] = pick(vals) if len(vals) > 1 else None
        head = ", ".join(f"{k} = {v}" for k, v in fixed.items())
        lines = [f"**{head}**" if head else "", "",
                 f"| method | " + " | ".join(f"{spec.cols}={c}" for c in cols) + " |",
                 "|---|" + "---:|" * len(cols)]
        for m in methods:
            row = []
            for c in cols:
                text, v = cells[(m, c)]
                row.append(f"**{text}**" if best.get(c) is not None and v == best[c] else text)
            if any(row):
                lines.append(f"| {m} | " + " | ".join(row) + " |")
        blocks.append("\n".join(lines).strip())
    stat = {"mean": "mean ± 95 % CI (Student t over tasks)", "median": "median over tasks",
            "seconds": "solver wall seconds for all tasks of the cell"}[spec.stat]
    title = spec.title or f"{metric.label} ({spec.metric}), {stat}"
    note = "" if spec.stat == "seconds" else f" Best per column in bold ({metric.better} is better)."
    return f"### {title}\n\n{stat}.{note}\n\n" + "\n\n".join(blocks) + "\n"


# ----------------------------------------------------------------------------- figures

def _series(index: Index, spec, metric, panel_value) -> tuple[list, list[str]]:
    grid = spec.grid
    xs = index.values(grid, spec.metric, spec.x)
    out, notes = [], []
    for m in index.methods(grid):
        pts, na = [], []
        for x in xs:
            point = {spec.x: x} if spec.panels is None else {spec.x: x, spec.panels: panel_value}
            cands = [r for r in index.rows if r["grid"] == grid and r["method"] == m and r["metric"] == spec.metric
                     and all(r["point"].get(k) == v for k, v in point.items())
                     and _matches(r["point"], spec.where)]
            if not cands:
                continue
            r = cands[0]
            if not r["applicable"]:
                na.append(x)
                continue
            mu, ci = num(r["mean"]), num(r["ci95"])
            if math.isfinite(mu) and (mu > 0 or not metric.log_scale):
                pts.append((x, mu, ci if math.isfinite(ci) else 0.0))
        if na:
            notes.append(f"{m}: n/a" if not pts else f"{m}: n/a at {spec.x}=" + ",".join(map(str, na)))
        if pts:
            out.append((m, pts))
    return out, notes


def figure(index: Index, spec, metric, path: Path) -> Path:
    grid = spec.grid
    panels = index.values(grid, spec.metric, spec.panels) if spec.panels else [None]
    if spec.panels and spec.where and spec.panels in spec.where:
        panels = [spec.where[spec.panels]]
    methods = index.methods(grid)
    cmap, n_colors = ("tab10", 10) if len(methods) <= 10 else ("tab20", 20)  # no two lines share a colour
    colors = {m: plt.get_cmap(cmap)(i % n_colors) for i, m in enumerate(methods)}
    ncols = min(len(panels), 4)
    nrows = math.ceil(len(panels) / ncols)
    legend_cols = min(len(methods), 4)
    legend_h = 0.3 * math.ceil(len(methods) / legend_cols) + 0.2
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(4.2 * ncols, 7.0), 3.4 * nrows + legend_h + 0.4),
                             squeeze=False)
    for ax, pv in zip(axes.flat, panels):
        series, notes = _series(index, spec, metric, pv)
        if metric.log_scale and series:
            ref = float(np.median([mu for _, pts in series for _, mu, _ in pts if mu > 0] or [1.0]))
            kept = []
            for m, pts in series:
                off = [(x, mu) for x, mu, _ in pts if mu > OFF_SCALE * ref]
                if off:  # one blown-up mean would squash every other line: left out, and said so
                    notes.append(f"{m}: off scale at " + ", ".join(f"{spec.x}={x} (mean {fmt(mu)})" for x, mu in off))
                    pts = [p for p in pts if (p[0], p[1]) not in off]
                if pts:
                    kept.append((m, pts))
            series = kept
        floor = None
        if metric.log_scale and series:
            lows = [mu - ci if mu - ci > 0 else mu for _, pts in series for _, mu, ci in pts]
            highs = [mu + ci for _, pts in series for _, mu, ci in pts]
            floor = min(lows) / 1.5
            ax.set_yscale("log")
            ax.set_ylim(floor, max(highs) * 1.5)
        n = max(1, len(series) - 1)
        allx = sorted({x for _, pts in series for x, _, _ in pts})
        step = min(np.diff(allx)) if len(allx) > 1 and spec.xscale == "linear" else 0
        for i, (m, pts) in enumerate(series):
            dodge = 0.12 * step * (i / n - 0.5) if step else 0  # keep error bars apart
            xs = [x + dodge for x, _, _ in pts]
            mus = [mu for _, mu, _ in pts]
            cis = [ci for _, _, ci in pts]
            lower = cis if floor is None else [min(ci, mu - floor) for mu, ci in zip(mus, cis)]
            ax.errorbar(xs, mus, yerr=[lower, cis], color=colors[m], marker="o", ms=3.5, capsize=2.5, lw=1.4)
        if spec.xscale == "log2":
            ax.set_xscale("log", base=2)
        elif spec.xscale == "symlog":
            ax.set_xscale("symlog", linthresh=1.0)
        if pv is not None:
            ax.set_title(f"{spec.panels} = {pv}")
        ax.set_xlabel(spec.x)
        if ax in axes[:, 0]:  # one y label per row: long labels would run into the next panel
            ax.set_ylabel(metric.label)
        if spec.xscale == "linear" and len(allx) <= 12:
            ax.set_xticks(allx)
        ax.grid(True, which="major", alpha=0.3)
        if notes:
            text = "\n".join(textwrap.fill(n, 52) for n in notes)  # wrapped: a note must not overflow its panel
            ax.text(0.02, 0.02, text, transform=ax.transAxes, fontsize=7, va="bottom", color="0.35")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=colors[m], marker="o", lw=1.4, label=m) for m in methods]
    fig.legend(handles=handles, loc="lower center", ncol=legend_cols, frameon=False)
    n_tasks = index.results["meta"]["grids"][grid].get("n_tasks")
    fig.suptitle(f"{spec.title or metric.label} — mean ± 95 % CI" + (f", {n_tasks} tasks per point" if n_tasks else ""),
                 fontsize=10)
    fig.tight_layout(rect=(0, legend_h / fig.get_figheight(), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_csv(index: Index, spec, metric, path: Path) -> Path:
    """Long-format CSV for `dvc plots`: panel, series, <x>, value, low, high (applicable means only)."""
    panels = index.values(spec.grid, spec.metric, spec.panels) if spec.panels else [None]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["panel", "series", spec.x, "value", "low", "high"])
        for pv in panels:
            series, _ = _series(index, spec, metric, pv)
            for m, pts in series:
                for x, mu, ci in pts:
                    w.writerow(["all" if pv is None else f"{spec.panels}={pv}", m, x, repr(mu), repr(mu - ci),
                                repr(mu + ci)])
    return path


def metrics_json(results: dict) -> dict:
    """Flat {<grid>/<metric>/<point>/<method>: mean} of applicable rows (what `dvc metrics diff` compares)."""
    out = {}
    for r in results["rows"]:
        if r["applicable"] and r["mean"] is not None:
            where = ",".join(f"{k}={v}" for k, v in r["point"].items())
            out[f"{r['grid']}/{r['metric']}/{where}/{r['method']}"] = round(float(r["mean"]), 6)
    return out


# ----------------------------------------------------------------------------- probing (core/probe.py)

def _probe_rows(results: dict, name: str) -> dict:
    """{(metric, method, layer, step): row} of one probe."""
    return {(r["metric"], r["method"], r["point"].get("layer"), r["point"].get("step")): r
            for r in results["rows"] if r["grid"] == f"probe:{name}"}


def probe_heatmap(results: dict, name: str, path: Path) -> Path:
    """One panel per algorithm: mean residual cosine of layer (rows) vs step (columns), best step marked."""
    p = results["meta"]["probes"][name]
    rows = _probe_rows(results, name)
    algs = list(p["algorithms"])
    L = p["layers"]
    width = max(4.6 * len(algs), 7.0)
    fig, axes = plt.subplots(1, len(algs), figsize=(width, 0.42 * L + 2.6), squeeze=False)
    for ax, a in zip(axes[0], algs):
        steps = p["algorithms"][a]["steps"]
        sim = np.array([[num(rows[("cosine", a, layer, k)]["mean"]) for k in steps] for layer in range(L)])
        im = ax.imshow(sim, aspect="auto", origin="lower", cmap="viridis", vmin=np.nanmin(sim), vmax=np.nanmax(sim))
        best = np.nanargmax(sim, axis=1)
        ax.plot(best, range(L), "o", color="white", ms=4, mec="black", mew=0.6)
        ax.set_xticks(range(len(steps)))
        ax.set_xticklabels([str(k) for k in steps], fontsize=7, rotation=90 if len(steps) > 8 else 0)
        ax.set_yticks(range(L))
        ax.set_xlabel(p["algorithms"][a]["label"] or f"{a} step")
        ax.set_title(a, fontsize=9)
        if ax is axes[0, 0]:
            ax.set_ylabel("layer (0 = read-in)")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    title = (f"{p['title'] or name}: residual cosine, layer probe vs algorithm step (dot: best), "
             f"{p['n_held_out']} held-out tasks")
    fig.suptitle(textwrap.fill(title, int(width * 13)), fontsize=9)  # wrapped: never wider than the figure
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def probe_best_steps_figure(results: dict, path: Path, csv_path: Path) -> Path:
    """Panels per algorithm, one line per probe: the best-matching step of every layer (+ a dvc-plots CSV)."""
    probes = results["meta"]["probes"]
    algs = list(dict.fromkeys(a for p in probes.values() for a in p["algorithms"]))
    fig, axes = plt.subplots(1, len(algs), figsize=(max(6.4, 4.4 * len(algs)), 3.6), squeeze=False)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["panel", "series", "layer", "value"])
        for ax, a in zip(axes[0], algs):
            log, grid = False, [0]
            for name, p in probes.items():
                if a not in p["algorithms"]:
                    continue
                alg = p["algorithms"][a]
                best = alg["best_steps"]
                log = log or alg["log_steps"]
                grid += alg["steps"]
                ax.plot(range(len(best)), best, marker="o", ms=3.5, lw=1.4, label=name)
                for layer, k in enumerate(best):
                    w.writerow([a, name, layer, k])
            if log:
                ax.set_yscale("symlog", base=2, linthresh=1)
            ax.set_ylim(min(grid), max(grid) * (1.25 if log else 1.05) + 0.25)  # the probed range, not the best steps
            ax.set_title(a, fontsize=9)
            ax.set_xlabel("layer (0 = read-in)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
            ax.set_ylabel("best-matching step")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("best-matching algorithm step per layer (argmax of the residual cosine)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def probe_table(results: dict, name: str) -> str:
    """Markdown: per layer, the probe's error, each algorithm's best step (its mean cosine) and the
    step of equal error."""
    p = results["meta"]["probes"][name]
    rows = _probe_rows(results, name)
    algs = list(p["algorithms"])
    md = [f"**{p['title'] or name}** (network `{p['network']}`, read-out {p['fit']} on {p['n_fit']} fresh prompts, "
          f"{p['n_held_out']} held-out)", "",
          "| layer | probe error | " + " | ".join(f"{a}: best step (cosine) | {a}: step of equal error"
                                               for a in algs) + " |",
          "|---:|---:|" + "---:|---:|" * len(algs)]
    for layer in range(p["layers"]):
        err = rows[("error", "probe", layer, None)]
        cells = [f"{fmt(num(rows[('best_step', a, layer, None)]['mean']))} "
                 f"({num(rows[('best_cosine', a, layer, None)]['mean']):.3f}) | "
                 + fmt(num(rows.get(("matched_step", a, layer, None), {}).get("mean", math.nan))) for a in algs]
        md.append(f"| {layer} | {fmt(num(err['mean']))} | " + " | ".join(cells) + " |")
    return "\n".join(md) + "\n"


def alignment_table(all_results: dict) -> str:
    """The cross-study answer to "which algorithm is it": for every probe of every study, per layer,
    the algorithm (and step) whose residuals its probe matches best, the mean cosine, and that
    algorithm's step of equal error."""
    lines, L = [], 0
    for study, res in all_results.items():
        for name, p in (res["meta"].get("probes") or {}).items():
            rows = _probe_rows(res, name)
            cells = []
            for layer in range(p["layers"]):
                cands = [(num(rows[("best_cosine", a, layer, None)]["mean"]), a,
                          num(rows[("best_step", a, layer, None)]["mean"])) for a in p["algorithms"]]
                cos, a, k = max(cands, key=lambda c: -math.inf if math.isnan(c[0]) else c[0])
                eq = rows.get(("matched_step", a, layer, None), {}).get("mean")
                cells.append(f"{a} {fmt(k)} ({cos:.3f})" + ("" if eq is None else f"; = error {fmt(num(eq))}"))
            L = max(L, len(cells))
            lines.append((study, p["title"] or name, p["network"], cells))
    if not lines:
        return "No study declares probing.\n"
    md = ["| study | probe | network | " + " | ".join(f"layer {i}" for i in range(L)) + " |",
          "|---|---|---|" + "---|" * L]
    for study, title, net, cells in lines:
        md.append(f"| {study} | {title} | `{net}` | " + " | ".join(cells + [""] * (L - len(cells))) + " |")
    return "\n".join(md) + "\n"


def write_summary(cfg, studies: list, out_path: Path) -> Path:
    """The top-level report: every study's title and report, and the cross-study alignment table."""
    from pipeline.core import plan as P
    from pipeline.core.results import load_results

    all_results = {}
    md = ["# Transformers as algorithm simulators: every study of this run", "",
          f"Studies: {', '.join(s.name for s in studies)}. Each study's report: "
          f"`{cfg.out_dir}/<study>/report/report.md`.", ""]
    for st in studies:
        res = load_results(P.study_dir(cfg, st.name) / "results.json", f"python -m pipeline --study {st.name} evaluate")
        all_results[st.name] = res
        md.append(f"- **{st.name}**: {st.title} ([report]({st.name}/report/report.md); about it: `{st.doc}`)")
    md += ["", "## Which algorithm does each layer run?", "",
           "Per probed network and layer: the algorithm and step whose residuals (prediction - target over the "
           "prompt) the layer's refitted read-out matches best, with the mean residual cosine over held-out "
           "tasks (1 = the same errors), and \"= error k\": the step of that algorithm whose error equals the "
           "layer's (how many steps' worth of accuracy it reaches; the informative number for random-start "
           "algorithms such as the power method, whose residuals no network can share). Steps are iterations "
           "(Newton, GD, EM, power) or passes (online GD).", "",
           alignment_table(all_results)]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("\n".join(md).rstrip() + "\n")
    return out_path


def write_report(cfg, study, results: dict, out_dir: Path) -> list[Path]:
    fam = F.get(study.family)
    index = Index(results)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    md = [f"# {study.title}", ""]
    if study.doc:
        md += [f"What this study is and how to run it: `{study.doc}`.", ""]
    nets = results["meta"].get("networks", {})
    if nets:
        md += ["Networks (unit → run in `outputs/runs/`): " + ", ".join(f"{u} → `{r}`" for u, r in nets.items()), ""]
    md += ["Metrics:", ""] + [f"- **{m.name}** ({m.label}, {m.better} is better): {m.definition}"
                              for m in fam.metrics.values()] + [""]
    na = sorted({(r["method"], r["reason"]) for r in results["rows"] if not r["applicable"]})
    if na:
        md += ["Not applicable: " + "; ".join(f"{m} ({why})" for m, why in na), ""]
    notes = study.notes(cfg, results)
    if notes:
        md += ["## Findings", ""] + [f"- {n}" for n in notes] + [""]
    md += ["## Tables", ""]
    for spec in study.tables(cfg):
        md.append(table(index, spec, fam.metrics[spec.metric]))
    md += ["## Figures", ""]
    for spec in study.figures(cfg):
        metric = fam.metrics[spec.metric]
        p = figure(index, spec, metric, out_dir / "figures" / f"{spec.name}.png")
        plot_csv(index, spec, metric, out_dir / "plots" / f"{spec.name}.csv")
        md.append(f"![{spec.title or spec.name}](figures/{p.name})\n")
        paths.append(p)
    probes = results["meta"].get("probes") or {}
    if probes:
        md += ["## Probing: which algorithm step does each layer match?", "",
               "Each layer's read-out is refitted on frozen hidden states; its residuals (prediction - target "
               "over the prompt) are compared by cosine similarity with each algorithm's residuals after k steps "
               "on the same held-out tasks (core/probe.py).", ""]
        p = probe_best_steps_figure(results, out_dir / "figures" / "probe_best_steps.png",
                                    out_dir / "plots" / "probe_best_steps.csv")
        md.append(f"![best-matching step per layer](figures/{p.name})\n")
        paths.append(p)
        for name in probes:
            md.append(probe_table(results, name))
            p = probe_heatmap(results, name, out_dir / "figures" / f"probe_{name}.png")
            md.append(f"![{name}](figures/{p.name})\n")
            paths.append(p)
    (out_dir / "report.md").write_text("\n".join(md).rstrip() + "\n")
    (out_dir / "metrics.json").write_text(json.dumps(metrics_json(results), indent=2, sort_keys=True) + "\n")
    for sub in ("figures", "plots"):
        (out_dir / sub).mkdir(exist_ok=True)
    return [out_dir / "report.md", out_dir / "metrics.json", *paths]
