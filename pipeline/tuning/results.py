"""A sweep's results: one row per trial (varied params, seed, final metrics, wall time, status)
as CSV and JSON, and PNG plots of the metric against each swept param, one line per K with the
spread over seeds as error bars. Rebuilt from Tune's experiment directory, so it works for an
interrupted sweep too (its unfinished trials are listed with their status).
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from pipeline.core.config import Config
from pipeline.tuning.spec import SweepSpec

TABLE_CSV, TABLE_JSON = "results.csv", "results.json"
MAX_PANELS = 6


def _status(trial) -> str:
    s = str(trial.status)
    if s == "TERMINATED":
        return "COMPLETED" if (trial.last_result or {}).get("final") == 1 else "STOPPED"  # scheduler stop
    return s


def _error_line(trial) -> str:
    path = getattr(trial, "error_file", None) or ""
    try:
        if path and Path(path).is_file():
            lines = [ln for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
            return lines[-1][:300] if lines else ""
    except OSError:
        pass
    return "error" if str(trial.status) == "ERROR" else ""


def _attempts(sdir: Path, trial_id: str) -> list[dict]:
    f = sdir / "trials" / trial_id / "attempts.jsonl"
    if not f.is_file():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def collect(experiment_path: str, spec: SweepSpec, sdir: Path) -> list[dict]:
    """One row per trial, read from Tune's experiment directory."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(experiment_path, default_metric=spec.metric, default_mode=spec.mode)
    rows = []
    for t in analysis.trials:
        last = dict(t.last_result or {})
        attempts = _attempts(sdir, t.trial_id)
        row = {"trial_id": t.trial_id}
        for k in spec.param_keys:
            row[k] = t.config.get(k)
        row["seed"] = t.config.get("seed")
        row["status"] = _status(t)
        row["step"] = last.get("step")
        # Tune's time_total_s adds up every attempt of the trial (restores included).
        row["wall_time_s"] = round(float(last["time_total_s"]), 2) if "time_total_s" in last else None
        row["num_failures"] = int(getattr(t, "num_failures", 0) or 0)
        row["attempts"] = len(attempts) or None
        row["restored_step"] = next((a["restored_step"] for a in reversed(attempts)
                                     if a.get("restored_step") is not None), None)
        for k in sorted(k for k in last if k.startswith(("val/", "train/"))):
            row[k] = float(last[k])
        row["error"] = _error_line(t) if row["status"] == "ERROR" else ""
        rows.append(row)
    rows.sort(key=lambda r: (tuple(_sort_key(r.get(k)) for k in spec.param_keys), _sort_key(r["seed"]),
                             r["trial_id"]))
    return rows


def _sort_key(v):
    if isinstance(v, bool) or v is None:
        return (2, str(v))
    if isinstance(v, (int, float)):
        return (0, float(v), "")
    return (1, 0.0, json.dumps(v, sort_keys=True, default=str))


def _columns(rows: list[dict], spec: SweepSpec) -> list[str]:
    fixed = ["trial_id", *spec.param_keys, "seed", "status", "step", "wall_time_s", "num_failures", "attempts",
             "restored_step"]
    metrics = sorted({k for r in rows for k in r if k.startswith(("val/", "train/"))},
                     key=lambda k: (not k.startswith("val/"), k))
    return fixed + metrics + ["error"]


def _cell(v):
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    if v is None:
        return ""
    return v


def best_row(rows: list[dict], spec: SweepSpec) -> dict | None:
    ok = [r for r in rows if r["status"] == "COMPLETED" and isinstance(r.get(spec.metric), float)
          and math.isfinite(r[spec.metric])]
    if not ok:
        return None
    return (min if spec.mode == "min" else max)(ok, key=lambda r: r[spec.metric])


def write(rows: list[dict], spec: SweepSpec, sdir: Path, cfg: Config | None = None) -> list[Path]:
    """results.csv, results.json and the PNG plots into sdir; returns the paths written."""
    sdir.mkdir(parents=True, exist_ok=True)
    cols = _columns(rows, spec)
    csv_path = sdir / TABLE_CSV
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: _cell(r.get(c)) for c in cols})
    counts: dict[str, int] = defaultdict(int)
    for r in rows:
        counts[r["status"]] += 1
    json_path = sdir / TABLE_JSON
    json_path.write_text(json.dumps({
        "sweep": spec.name, "description": spec.description, "spec": spec.path, "study": spec.study, "unit": spec.unit,
        "params": spec.param_keys, "seeds": spec.seeds, "metric": spec.metric, "mode": spec.mode,
        "status_counts": dict(counts), "best": best_row(rows, spec), "trials": rows,
    }, indent=2, default=str) + "\n")
    return [csv_path, json_path, *plot(rows, spec, sdir)]


# ----------------------------------------------------------------------------------------- plots

def _families(spec: SweepSpec) -> list[str]:
    """The metrics plotted: the family's monitor (e.g. val/l2, val/mse) and the sweep's metric."""
    from pipeline.core import family as F

    fams = [F.get(spec.family).monitor]
    m = spec.metric.split("/K=")[0]
    if m not in fams:
        fams.append(m)
    return fams


def _ks(rows: list[dict], family: str) -> list[int]:
    ks = set()
    for r in rows:
        for k in r:
            if k.startswith(family + "/K="):
                try:
                    ks.add(int(k.rsplit("=", 1)[1]))
                except ValueError:
                    pass
    return sorted(ks)


def _mean_sd(vals: list[float]) -> tuple[float, float]:
    vals = [v for v in vals if isinstance(v, float) and math.isfinite(v)]
    if not vals:
        return math.nan, 0.0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def plot(rows: list[dict], spec: SweepSpec, sdir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["status"] == "COMPLETED"]
    if not done:
        return []
    written = []
    for family in _families(spec):
        ks = _ks(done, family)
        series = [(f"K={k}", f"{family}/K={k}", {}) for k in ks]
        if any(family in r for r in done):
            series.append(("mean over K" if ks else family, family, {"color": "black", "linestyle": "--"}))
        if not series:
            continue
        for p in spec.params:
            others = [q for q in spec.param_keys if q != p.key]
            groups: dict[tuple, list[dict]] = defaultdict(list)
            for r in done:
                groups[tuple(json.dumps(r.get(q), default=str) for q in others)].append(r)
            aggregated = len(groups) > MAX_PANELS
            if aggregated:
                groups = {(): done}
            keys = sorted(groups, key=lambda g: [_sort_key(json.loads(x)) for x in g])
            xcol, ycol = p.key.replace(".", "_"), family.replace("/", "_")
            records = []  # the plotted points, long format, for `dvc plots` (field names without dots)
            fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 4.0), squeeze=False, sharey=True)
            for ax, g in zip(axes[0], keys):
                grows = groups[g]
                xs_raw = sorted({json.dumps(r.get(p.key), default=str) for r in grows},
                                key=lambda s: _sort_key(json.loads(s)))
                xvals = [json.loads(s) for s in xs_raw]
                numeric = all(_is_num(v) for v in xvals)
                xpos = xvals if numeric else list(range(len(xvals)))
                all_y = []
                logx = numeric and (p.kind == "loguniform" or (min(xvals) > 0 and max(xvals) / min(xvals) >= 8))
                span = (max(xpos) - min(xpos)) if len(xpos) > 1 else 1.0
                panel = ", ".join(f"{q}={_fmt(json.loads(v))}" for q, v in zip(others, g)) or "all"
                for i, (label, key, style) in enumerate(series):
                    ys, es = [], []
                    for s, xv in zip(xs_raw, xvals):
                        vals = [r.get(key) for r in grows if json.dumps(r.get(p.key), default=str) == s]
                        m, sd = _mean_sd(vals)
                        ys.append(m)
                        es.append(sd)
                        if not math.isnan(m):
                            records.append({xcol: _cell(xv), "series": label, "panel": panel, ycol: m,
                                            "low": m - sd, "high": m + sd, "n": len(vals)})
                    if all(math.isnan(y) for y in ys):
                        continue
                    all_y += [y for y in ys if not math.isnan(y)]
                    off = (i - (len(series) - 1) / 2) * 0.012  # dodge: error bars of the lines side by side
                    xs = [x * (1 + 2 * off) for x in xpos] if logx else [x + off * span for x in xpos]
                    ax.errorbar(xs, ys, yerr=es, marker="o", capsize=4, label=label, **style)
                if logx:
                    ax.set_xscale("log", base=2 if all(float(v).is_integer() for v in xvals) else 10)
                if len(xvals) <= 12:
                    ax.set_xticks(xpos)
                    ax.set_xticklabels([_fmt(v) for v in xvals])
                    ax.minorticks_off()
                if all_y and min(all_y) > 0 and max(all_y) / min(all_y) > 20:
                    ax.set_yscale("log")
                ax.set_xlabel(p.key)
                ax.grid(True, alpha=0.3)
                if others and not aggregated:
                    ax.set_title(panel, fontsize=9)
            axes[0][0].set_ylabel(f"final {family}")
            axes[0][-1].legend(fontsize=8)
            n_seeds = len({r["seed"] for r in done})
            spread = "mean ± sd over seeds" if n_seeds > 1 else "1 seed, no spread"
            extra = "; other params pooled" if aggregated else ""
            fig.suptitle(f"sweep {spec.name}: {family} vs {p.key} ({spec.study}/{spec.unit}, {spread}{extra})", fontsize=10)
            fig.tight_layout()
            out = sdir / f"{family.replace('/', '_')}_vs_{p.key}.png"
            fig.savefig(out, dpi=110)
            plt.close(fig)
            written.append(out)
            table = out.with_suffix(".csv")
            with open(table, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=[xcol, "series", "panel", ycol, "low", "high", "n"])
                w.writeheader()
                w.writerows(records)
            written.append(table)
    return written


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list):
        return "[" + ",".join(map(str, v)) + "]"
    return str(v)
