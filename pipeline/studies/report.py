"""Tables, DVC metrics/plots files and figures from `evaluate_grid` results.

Input: {"cells": [{"d", "K", "method", "applicable", "reason", "n_tasks", "seconds",
"l2"/"accuracy"/"loglik": {"mean", "std", "ci95", "n"}}, ...]}, either fresh from evaluate_grid or
read back from JSON (where NaN is null: both are accepted). Methods are shown in the canonical
order tgmm, em_paper, em_strong, spectral, then any others alphabetically.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

OFF_SCALE = 1e3  # on log axes, a mean this many times the panel's median is left out of the figure (noted)

CANONICAL_METHODS = ("tgmm", "em_paper", "em_strong", "spectral")
from pipeline.studies.evaluate import METRICS  # noqa: E402  (the metrics every cell carries)

# title, what is better, y-axis label, log y-axis, one-line definition
METRIC_INFO = {
    "l2": ("ℓ2 parameter error", "lower", "ℓ2 error", True,
           "(1/K) Σ_k [(1/d)‖μ̂_σ(k) − μ_k‖² + (π̂_σ(k) − π_k)²], σ = Hungarian matching"),
    "accuracy": ("Clustering accuracy", "higher", "accuracy", False,
                 "fraction of points whose MAP component under the estimate matches the truth, best relabelling"),
    "loglik": ("Average log-likelihood", "higher", "log-likelihood per point", False,
               "mean over points of log p(x_i) under the estimated mixture"),
}


# ----------------------------------------------------------------------------- reading results

def _num(v) -> float:
    return float("nan") if v is None else float(v)


def _cells(results: dict) -> list[dict]:
    return list(results["cells"])


def method_order(methods) -> list[str]:
    """Canonical methods first (in CANONICAL_METHODS order), then the rest alphabetically."""
    methods = set(methods)
    return [m for m in CANONICAL_METHODS if m in methods] + sorted(methods - set(CANONICAL_METHODS))


def _grid(results: dict):
    """(methods, ds, Ks, {(method, d, K): cell})."""
    index = {(c["method"], int(c["d"]), int(c["K"])): c for c in _cells(results)}
    present = {m for m, _, _ in index}
    if results.get("method_order"):  # a study that names its own order (e.g. the backbone ablation)
        methods = [m for m in results["method_order"] if m in present]
        methods += sorted(present - set(methods))
    else:
        methods = method_order(present)
    ds = sorted({d for _, d, _ in index})
    Ks = sorted({K for _, _, K in index})
    return methods, ds, Ks, index


def _stat(cell: dict | None, metric: str) -> tuple[float, float]:
    """(mean, ci95) of an applicable cell; NaNs otherwise."""
    if cell is None or not cell["applicable"]:
        return math.nan, math.nan
    s = cell[metric]
    return _num(s["mean"]), _num(s["ci95"])


def _best(index: dict, methods: list[str], d: int, K: int, metric: str) -> set[str]:
    """Methods with the best finite mean in the (d, K) cell; empty if fewer than two compete."""
    vals = {m: _stat(index.get((m, d, K)), metric)[0] for m in methods}
    vals = {m: v for m, v in vals.items() if math.isfinite(v)}
    if len(vals) < 2:
        return set()
    pick = min if METRIC_INFO[metric][1] == "lower" else max
    best = pick(vals.values())
    return {m for m, v in vals.items() if v == best}


# ----------------------------------------------------------------------------- DVC metrics and plots

def metrics_json(results: dict) -> dict:
    """{method: {"d=2": {"K=3": {"l2", "accuracy", "loglik"}}}, "not_applicable": ["spectral d=2 K=3", ...]}.

    Only numbers are written (DVC metrics): not-applicable cells are listed instead of scored, and
    a metric whose mean is NaN (every task failed) is left out of its cell.
    """
    methods, ds, Ks, index = _grid(results)
    out: dict = {}
    not_applicable = []
    for m in methods:
        for d in ds:
            for K in Ks:
                cell = index.get((m, d, K))
                if cell is None:
                    continue
                if not cell["applicable"]:
                    not_applicable.append(f"{m} d={d} K={K}")
                    continue
                vals = {k: _stat(cell, k)[0] for k in METRICS}
                out.setdefault(m, {}).setdefault(f"d={d}", {})[f"K={K}"] = {
                    k: v for k, v in vals.items() if math.isfinite(v)}
    out["not_applicable"] = not_applicable
    return out


def write_plot_data(results: dict, out_dir: str | Path) -> list[Path]:
    """One long-format CSV per metric for `dvc plots` (template .dvc/plots/by_method.json):
    `<metric>.csv` with columns d,K,method,<metric>,low,high (95 % CI); n/a cells are left out,
    so the file works for any dims, Ks and methods."""
    methods, ds, Ks, index = _grid(results)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for metric in METRICS:
        path = out_dir / f"{metric}.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["d", "K", "method", metric, "low", "high"])
            for d in ds:
                for m in methods:
                    for K in Ks:
                        mean, ci = _stat(index.get((m, d, K)), metric)
                        if not math.isfinite(mean):
                            continue
                        ci = ci if math.isfinite(ci) else 0.0
                        w.writerow([d, K, m, repr(mean), repr(mean - ci), repr(mean + ci)])
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- figures

def _n_tasks_note(results: dict) -> str:
    ns = {int(c["n_tasks"]) for c in _cells(results)}
    return f"{ns.pop()} tasks per cell" if len(ns) == 1 else "tasks per cell vary"


def _figure(results: dict, metric: str, path: Path) -> Path:
    methods, ds, Ks, index = _grid(results)
    title, _, ylabel, log_y, _ = METRIC_INFO[metric]
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    ncols = min(len(ds), 4)
    nrows = math.ceil(len(ds) / ncols)
    legend_cols = min(len(methods), 4)
    legend_h = 0.3 * math.ceil(len(methods) / legend_cols) + 0.2  # inches below the panels
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(4.2 * ncols, 7.0), 3.4 * nrows + legend_h + 0.4),
                             squeeze=False)
    width = 0.06 * (len(methods) - 1)  # dodge methods along x so the error bars do not overlap
    for ax, d in zip(axes.flat, ds):
        notes, series = [], []
        panel = [_stat(c, metric)[0] for (_, dd, _), c in index.items() if dd == d and c["applicable"]]
        ref = float(np.median([v for v in panel if math.isfinite(v) and v > 0] or [1.0]))  # for off-scale means
        for i, m in enumerate(methods):
            na = [K for K in Ks if (m, d, K) in index and not index[(m, d, K)]["applicable"]]
            if na:
                notes.append(f"{m}: n/a for K={','.join(map(str, na))}" if len(na) < len(Ks) else f"{m}: n/a")
            pts = [(K, *_stat(index.get((m, d, K)), metric)) for K in Ks]
            pts = [(K, mu, ci if math.isfinite(ci) else 0.0) for K, mu, ci in pts
                   if math.isfinite(mu) and (mu > 0 or not log_y)]  # log axis: zero/negative means absent
            off = [(K, mu) for K, mu, _ in pts if log_y and mu > OFF_SCALE * ref]
            if off:  # one blown-up mean would squash every other line: left out, and said so
                notes.append(f"{m}: off scale at " + ", ".join(f"K={K} (mean {_fmt(mu)})" for K, mu in off))
                pts = [p for p in pts if (p[0], p[1]) not in off]
            if pts:
                xs = [K - width / 2 + width * i / max(1, len(methods) - 1) for K, _, _ in pts]
                series.append((m, xs, [mu for _, mu, _ in pts], [ci for _, _, ci in pts]))
        floor = None
        if log_y and series:
            lows = [mu - ci if mu - ci > 0 else mu for _, _, mus, cis in series for mu, ci in zip(mus, cis)]
            highs = [mu + ci for _, _, mus, cis in series for mu, ci in zip(mus, cis)]
            floor = min(lows) / 1.5
            ax.set_yscale("log")
            ax.set_ylim(floor, max(highs) * 1.5)
        for m, xs, mus, cis in series:
            # on a log axis a CI reaching below 0 is drawn down to the bottom of the panel
            lower = cis if floor is None else [min(ci, mu - floor) for mu, ci in zip(mus, cis)]
            ax.errorbar(xs, mus, yerr=[lower, cis], color=colors[m], marker="o", ms=4, capsize=3, lw=1.5)
        ax.set_title(f"d = {d}")
        ax.set_xlabel("number of components K")
        ax.set_ylabel(ylabel)
        ax.set_xticks(Ks)
        ax.grid(True, which="major", alpha=0.3)
        if notes:
            ax.text(0.02, 0.02, "\n".join(notes), transform=ax.transAxes, fontsize=7, va="bottom",
                    color="0.35")
    for ax in list(axes.flat)[len(ds):]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=colors[m], marker="o", lw=1.5, label=m) for m in methods]
    fig.legend(handles=handles, loc="lower center", ncol=legend_cols, frameon=False)
    fig.suptitle(f"{title} vs K — mean ± 95 % CI, {_n_tasks_note(results)}", fontsize=10)
    fig.tight_layout(rect=(0, legend_h / fig.get_figheight(), 1, 1))  # room for the legend
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_figures(results: dict, out_dir: str | Path) -> list[Path]:
    """`l2_vs_K.png`, `accuracy_vs_K.png`, `loglik_vs_K.png`: one panel per d, one line per method."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [_figure(results, metric, out_dir / f"{metric}_vs_K.png") for metric in METRICS]


# ----------------------------------------------------------------------------- markdown

def _fmt(v: float) -> str:
    """3 significant digits, positional unless very small or large."""
    if not math.isfinite(v):
        return "nan"
    if v == 0 or 1e-4 <= abs(v) < 1e6:
        return np.format_float_positional(v, precision=3, unique=False, fractional=False, trim="-")
    return f"{v:.3g}"


def _fmt_ci(mu: float, ci: float) -> str:
    """'mean ± ci', or the mean alone when the interval is undefined (one task)."""
    return _fmt(mu) if not math.isfinite(ci) else f"{_fmt(mu)} ± {_fmt(ci)}"


def _row(index: dict, m: str, d: int, Ks, text) -> list[str]:
    """Table cells of method m at dimension d: '' (not evaluated), 'n/a' or text(cell)."""
    row = []
    for K in Ks:
        cell = index.get((m, d, K))
        row.append("" if cell is None else "n/a" if not cell["applicable"] else text(cell, K))
    return row


def markdown_table(results: dict, metric: str = "l2") -> str:
    """One block per method (rows d, columns K, cells `mean ± ci95`), best method per cell in bold."""
    methods, ds, Ks, index = _grid(results)
    title, better, _, _, definition = METRIC_INFO[metric]
    lines = [f"### {title} ({better} is better)", "",
             f"{definition}. Mean ± 95 % CI half-width over tasks ({_n_tasks_note(results)}); "
             f"**bold**: best method in the cell; n/a: method not defined there.", ""]
    reasons = {}
    for m in methods:
        lines += [f"**{m}**", "", "| d \\ K | " + " | ".join(str(K) for K in Ks) + " |",
                  "|---|" + "---:|" * len(Ks)]
        for d in ds:
            def text(cell, K, d=d, m=m):
                mu, ci = _stat(cell, metric)
                t = _fmt_ci(mu, ci)
                return f"**{t}**" if m in _best(index, methods, d, K, metric) else t

            for K in Ks:
                cell = index.get((m, d, K))
                if cell is not None and not cell["applicable"]:
                    reasons.setdefault(m, cell.get("reason") or "not applicable")
            lines.append(f"| {d} | " + " | ".join(_row(index, m, d, Ks, text)) + " |")
        lines.append("")
    for m, r in reasons.items():
        lines.append(f"n/a for {m}: {r}")
    if reasons:
        lines.append("")
    return "\n".join(lines)


def markdown_median_table(results: dict, metric: str = "l2") -> str:
    """Medians over tasks, one row per (method, d): robust to the few blow-ups that can dominate a mean."""
    methods, ds, Ks, index = _grid(results)
    title = METRIC_INFO[metric][0]
    lines = [f"### Median {title} over tasks", "", "| method | d | " + " | ".join(f"K={K}" for K in Ks) + " |",
             "|---|---:|" + "---:|" * len(Ks)]
    for m in methods:
        for d in ds:
            def text(cell, K):
                med = _num((cell.get(metric) or {}).get("median"))
                return _fmt(med) if math.isfinite(med) else ""

            lines.append(f"| {m} | {d} | " + " | ".join(_row(index, m, d, Ks, text)) + " |")
    return "\n".join(lines + [""])


def markdown_time_table(results: dict) -> str:
    """Wall seconds of the solver calls per method and d (summed over K), with ms per task."""
    methods, ds, Ks, index = _grid(results)
    lines = ["### Wall time", "",
             "Seconds spent in the solver over all evaluated K at each d (metrics excluded), "
             "ms per task in parentheses; not-applicable cells are not counted.", "",
             "| method | " + " | ".join(f"d={d}" for d in ds) + " | total |", "|---|" + "---:|" * (len(ds) + 1)]
    for m in methods:
        row, tot_s, tot_n = [], 0.0, 0
        for d in ds:
            cells = [index[(m, d, K)] for K in Ks if (m, d, K) in index and index[(m, d, K)]["applicable"]]
            if not cells:
                row.append("n/a")
                continue
            s = sum(_num(c["seconds"]) for c in cells)
            n = sum(int(c["n_tasks"]) for c in cells)
            tot_s, tot_n = tot_s + s, tot_n + n
            row.append(f"{s:.3g} s ({1e3 * s / n:.3g} ms)")
        row.append(f"{tot_s:.3g} s ({1e3 * tot_s / tot_n:.3g} ms)" if tot_n else "n/a")
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_report(results: dict, out_dir: str | Path) -> list[Path]:
    """metrics.json, plots/<metric>.csv, figures/<metric>_vs_K.png and report.md under out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(json.dumps(metrics_json(results), indent=2, allow_nan=False) + "\n")
    paths = [metrics_path, *write_plot_data(results, out_dir / "plots")]
    figures = write_figures(results, out_dir / "figures")
    paths += figures
    body = ["# GMM parameter estimation: methods across (d, K)", ""]
    for metric in METRICS:
        body += [markdown_table(results, metric), f"![{metric}](figures/{metric}_vs_K.png)", ""]
        if metric == "l2":
            body += [markdown_median_table(results, metric), ""]
    body.append(markdown_time_table(results))
    report = out_dir / "report.md"
    report.write_text("\n".join(body))
    return paths + [report]
