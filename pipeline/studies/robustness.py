"""TGMM robustness (STUDIES.md section 1): sample-size shift, distribution shift, inference-time N.

    train    one network per training N0 at d = robustness.d   -> <out>/robustness/train/n0_<N0>/
    generate fixed evaluation sets                              -> data/robustness/{sample_size,shift}/
    evaluate every network and baseline on the same sets        -> <out>/robustness/eval/results.json
    report   markdown tables, dvc-plots CSVs, PNGs, metrics     -> <out>/robustness/report/

Evaluation sets. Per K, one base set of robustness.n_tasks TGMM tasks is drawn at
N_max = max(robustness.eval_n, eval.n) points each (seeded by (seed, ROBUSTNESS_STREAM, 0, d, K)).
  * sample size: the set at N keeps the first N points of every base task, so all N share the
    same mixtures and samples are nested (a paired comparison across N; exactly N real points).
  * shift: the first eval.n points, with every mean moved by sigma_p * eps, eps ~ N(0, I_d) drawn
    once per (task, component) (stream (seed, ROBUSTNESS_STREAM, 1, d, K)); the data are redrawn
    around the moved means with the same labels and noise, x_i = mu'_{y_i} + z_i; weights kept.
    So sigma_p = 0 is exactly the unshifted set and every sigma_p uses the same eps (paired).

Networks. N0 = task.n0 with robustness.d in task.dims is the main study's network: it is
reused (copied from <out>/train/d<d>/, after checking it was trained with these params), not
retrained. Every other N0 is trained by the one training function, `train()`, with task.n0 = N0.
The shift study and the inference-time-N ablation use the network trained at N0 = task.n0
(`fixed_n0`; max(train_n0) if task.n0 is not among them).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import torch

from pipeline.config import Config, ConfigError, deep_merge, from_dict
from pipeline.tasks.gmm import ROBUSTNESS_STREAM, GMMBatch, make_generator

DATA_DIR = Path("data") / "robustness"
GROUP = "robustness"  # W&B group of every robustness run (the dashboard filters on it)
SIZE, SHIFT = "sample_size", "shift"


# ----------------------------------------------------------------------------- paths and params

def study_dir(cfg: Config) -> Path:
    return Path(cfg.out_dir) / "robustness"


def model_dir(cfg: Config, n0: int) -> Path:
    return study_dir(cfg) / "train" / f"n0_{n0}"


def main_model_path(cfg: Config) -> Path:
    from pipeline.studies.tgmm import main_model_path as path

    return path(cfg, cfg.robustness.d)


def reuses_main_model(cfg: Config, n0: int) -> bool:
    return n0 == cfg.task.n0 and cfg.robustness.d in cfg.task.dims


def fixed_n0(cfg: Config) -> int:
    """The training N0 of the network used for the shift study and the inference-time-N ablation."""
    r = cfg.robustness
    return cfg.task.n0 if cfg.task.n0 in r.train_n0 else max(r.train_n0)


def _label(v: float) -> str:
    """0.0 -> '0', 2.5 -> '2.5': numbers in file names, metric keys and table headers."""
    return f"{float(v):g}"


def set_path(data_dir: Path, kind: str, d: int, K: int, value: float) -> Path:
    name = f"d{d}_N{int(value)}_K{K}.npz" if kind == SIZE else f"d{d}_sigma{_label(value)}_K{K}.npz"
    return Path(data_dir) / kind / name


def config_for_n0(cfg: Config, n0: int) -> Config:
    """The params a network for training sample size N0 is trained with (task.dims = [robustness.d])."""
    over = {"task": {"n0": int(n0), "dims": [cfg.robustness.d]}}
    return from_dict(deep_merge(cfg.to_dict(), over), source=f"robustness (task.n0={n0}, d={cfg.robustness.d})")


def check(cfg: Config) -> None:
    """Cross-field checks of the robustness section; raises ConfigError with one line."""
    r, kmax = cfg.robustness, max(cfg.task.ks)
    for key, values in (("train_n0", r.train_n0), ("eval_n", r.eval_n)):
        for i, v in enumerate(values):
            if v < 2 * kmax:
                raise ConfigError(f"robustness.{key}[{i}]: must be >= 2*max(task.ks)={2 * kmax}, got {v}")
    if cfg.model.position == "gpt2" and max(*r.eval_n, *r.train_n0) > cfg.model.max_len:
        raise ConfigError(f"model.max_len: {cfg.model.max_len} is shorter than the longest robustness sample "
                          f"{max(*r.eval_n, *r.train_n0)} (raise it to at least that)")
    config_for_n0(cfg, fixed_n0(cfg))  # robustness.d with task.ks: sampleable, d=1 rule, ...


# ----------------------------------------------------------------------------- evaluation sets

def _base_n(cfg: Config) -> int:
    return max(max(cfg.robustness.eval_n), cfg.eval.n)


def _sets_fingerprint(cfg: Config) -> str:
    """What the stored sets depend on: loading refuses sets made with other params."""
    import hashlib

    t, r = cfg.to_dict()["task"], cfg.robustness
    part = {"seed": cfg.seed, "task": {k: v for k, v in t.items() if k not in ("dims", "n0")},
            "d": r.d, "n_tasks": r.n_tasks, "base_n": _base_n(cfg), "shift_n": cfg.eval.n}
    return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:12]


def base_tasks(cfg: Config, K: int) -> GMMBatch:
    """robustness.n_tasks TGMM tasks with N_max real points each: every set of cell K derives from these."""
    from pipeline.training.module import sample_tasks

    d, n = cfg.robustness.d, _base_n(cfg)
    g = make_generator(cfg.seed, ROBUSTNESS_STREAM, 0, d, K)
    return sample_tasks(cfg, d, K, cfg.robustness.n_tasks, g, "cpu", n, n)


def first_points(batch: GMMBatch, N: int) -> GMMBatch:
    """The same tasks keeping only their first N points: (B, N_max, d) -> (B, N, d)."""
    if N > batch.N:
        raise ValueError(f"cannot keep {N} points of tasks with {batch.N}")
    return GMMBatch(x=batch.x[:, :N].clone(), mask=batch.mask[:, :N].clone(), weights=batch.weights.clone(),
                    means=batch.means.clone(), labels=batch.labels[:, :N].clone(),
                    scales=None if batch.scales is None else batch.scales.clone())


def mean_noise(cfg: Config, K: int, batch: GMMBatch) -> torch.Tensor:
    """eps ~ N(0, I_d) per task and component, (B, K, d); shared by every sigma_p."""
    g = make_generator(cfg.seed, ROBUSTNESS_STREAM, 1, cfg.robustness.d, K)
    return torch.randn(batch.means.shape, generator=g, dtype=batch.means.dtype)


def shift_means(batch: GMMBatch, eps: torch.Tensor, sigma_p: float) -> GMMBatch:
    """Means mu + sigma_p * eps and the data redrawn around them: x_i = mu'_{y_i} + z_i, same y_i and z_i."""
    B, N, d = batch.x.shape
    delta = float(sigma_p) * eps  # (B, K, d)
    moved = torch.gather(delta, 1, batch.labels.clamp_min(0)[..., None].expand(B, N, d))  # (B, N, d)
    x = (batch.x + moved) * batch.mask[..., None]
    return GMMBatch(x=x, mask=batch.mask.clone(), weights=batch.weights.clone(), means=batch.means + delta,
                    labels=batch.labels.clone(), scales=None if batch.scales is None else batch.scales.clone())


def generate(cfg: Config, data_dir: Path = DATA_DIR) -> list[Path]:
    """Write every sample-size and shift set (npz via save_eval_set) and a manifest; stale sets are removed."""
    from pipeline.studies.evaluate import save_eval_set

    check(cfg)
    r, data_dir = cfg.robustness, Path(data_dir)
    common = {"d": r.d, "n_tasks": r.n_tasks, "seed": cfg.seed, "anisotropic": cfg.task.anisotropic,
              "fingerprint": _sets_fingerprint(cfg)}
    paths = []
    for K in cfg.task.ks:
        base = base_tasks(cfg, K)
        for N in r.eval_n:
            p = set_path(data_dir, SIZE, r.d, K, N)
            save_eval_set(p, first_points(base, N), {**common, "study": SIZE, "K": K, "n": N, "sigma_p": 0.0})
            paths.append(p)
        unshifted, eps = first_points(base, cfg.eval.n), mean_noise(cfg, K, base)
        for s in r.sigma_p:
            p = set_path(data_dir, SHIFT, r.d, K, s)
            save_eval_set(p, shift_means(unshifted, eps, s),
                          {**common, "study": SHIFT, "K": K, "n": cfg.eval.n, "sigma_p": float(s)})
            paths.append(p)
    keep = set(paths)
    for kind in (SIZE, SHIFT):
        for old in (data_dir / kind).glob("*.npz"):
            if old not in keep:
                old.unlink()
    (data_dir / "manifest.json").write_text(json.dumps(
        {"files": [str(p.relative_to(data_dir)) for p in paths], "d": r.d, "ks": cfg.task.ks,
         "eval_n": r.eval_n, "sigma_p": r.sigma_p, "shift_n": cfg.eval.n, "n_tasks": r.n_tasks,
         "fingerprint": common["fingerprint"]}, indent=2) + "\n")
    return paths


def load_sets(cfg: Config, data_dir: Path = DATA_DIR) -> tuple[dict, dict]:
    """({(N, K): batch}, {(sigma_p, K): batch}); refuses sets generated for other params."""
    from pipeline.studies.evaluate import load_eval_set

    r, fp = cfg.robustness, _sets_fingerprint(cfg)
    wanted = [(SIZE, N, K) for N in r.eval_n for K in cfg.task.ks] + \
             [(SHIFT, s, K) for s in r.sigma_p for K in cfg.task.ks]
    out: dict[str, dict] = {SIZE: {}, SHIFT: {}}
    for kind, v, K in wanted:
        path = set_path(data_dir, kind, r.d, K, v)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: robustness evaluation set not found "
                                    "(run `python -m pipeline robustness generate`)")
        batch, meta = load_eval_set(path)
        expected = {"n": v} if kind == SIZE else {"n": cfg.eval.n, "sigma_p": float(v)}
        if meta.get("fingerprint") != fp or (batch.d, batch.K) != (r.d, K) or \
                any(meta.get(k) != e for k, e in expected.items()):
            raise ConfigError(f"{path}: was generated for other params; "
                              "rerun `python -m pipeline robustness generate`")
        out[kind][(v, K)] = batch
    return out[SIZE], out[SHIFT]


# ----------------------------------------------------------------------------- training

def reuse_main_model(cfg: Config, n0: int) -> Path:
    """Copy the main study's network (trained at N0 = task.n0) into the robustness layout, unchanged."""
    from pipeline.studies.tgmm import annotate, copy_main_network

    out = model_dir(cfg, n0)
    path = copy_main_network(cfg, cfg.robustness.d, out, why=f"the main model is reused for N0={n0} = task.n0")
    annotate(out / "model.json", task_n0=n0)
    annotate(out / "metrics.json", n0=n0, reused_main_model=1)
    return path


def train_n0(cfg: Config, n0: int, *, track: bool = True, resume: bool = True, reuse: bool = True,
             progress_bar: bool = True) -> tuple[Path, bool]:
    """The network for training sample size N0: (model path, whether the main model was reused)."""
    from pipeline.studies.tgmm import annotate
    from pipeline.training.train import _is_rank_zero, train

    check(cfg)
    if reuse and reuses_main_model(cfg, n0):
        return reuse_main_model(cfg, n0), True
    out = model_dir(cfg, n0)
    res = train(config_for_n0(cfg, n0), cfg.robustness.d, out, track=track, resume=resume,
                progress_bar=progress_bar, run_name=f"{cfg.study}-robustness-train-n0_{n0}",
                wandb_group=GROUP)
    if _is_rank_zero() and res.model_path.is_file():
        annotate(out / "model.json", task_n0=n0)
        annotate(out / "metrics.json", n0=n0, reused_main_model=0)
    return res.model_path, False


# ----------------------------------------------------------------------------- evaluation

def _network_solvers(cfg: Config, device) -> dict[int, object]:
    from pipeline.models.tgmm import NetworkSolver, load_network
    from pipeline.studies.tgmm import check_trained_network

    paths = {n0: check_trained_network(model_dir(cfg, n0) / "model.safetensors", config_for_n0(cfg, n0),
                                       cfg.robustness.d, f"run `python -m pipeline robustness train --n0 {n0}`")
             for n0 in cfg.robustness.train_n0}  # all checked before any compute
    return {n0: NetworkSolver(load_network(p, device=device), name=f"tgmm@n0={n0}") for n0, p in paths.items()}


def _grid(solvers: list, sets: dict, chunk_size: int, **fields) -> list[dict]:
    """evaluate_grid over {(d, K): batch} with network cells relabelled method 'tgmm' + their n0."""
    from pipeline.studies.evaluate import evaluate_grid

    cells = evaluate_grid(lambda _d: solvers, sets, chunk_size=chunk_size, progress=False)["cells"]
    for c in cells:
        n0 = None
        if c["method"].startswith("tgmm@n0="):
            c["method"], n0 = "tgmm", int(c["method"].split("=", 1)[1])
        c.update(n0=n0, **fields)
    return cells


def evaluate(cfg: Config, data_dir: Path = DATA_DIR, track: bool = True) -> dict:
    """Every network (per N0) and every baseline on the same sample-size and shift sets."""
    from pipeline.studies.evaluate import write_results
    from pipeline.studies.tgmm import baseline_solvers, resolve_device

    check(cfg)
    r = cfg.robustness
    size_sets, shift_sets = load_sets(cfg, data_dir)
    device = resolve_device(cfg.eval.device)
    nets = _network_solvers(cfg, device)
    baselines = baseline_solvers(cfg, r.d)
    t0 = time.perf_counter()
    size_cells, shift_cells = [], []
    for N in r.eval_n:
        sets = {(r.d, K): size_sets[(N, K)].to(device) for K in cfg.task.ks}
        size_cells += _grid([*nets.values(), *baselines], sets, cfg.eval.chunk_size, N=N, sigma_p=None)
        print(f"[robustness evaluate] sample size N={N}: done ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    n_fixed = fixed_n0(cfg)
    for s in r.sigma_p:
        sets = {(r.d, K): shift_sets[(s, K)].to(device) for K in cfg.task.ks}
        shift_cells += _grid([nets[n_fixed], *baselines], sets, cfg.eval.chunk_size, N=cfg.eval.n, sigma_p=float(s))
        print(f"[robustness evaluate] shift sigma_p={_label(s)}: done ({time.perf_counter() - t0:.1f} s)",
              file=sys.stderr)
    results = {SIZE: {"cells": size_cells}, SHIFT: {"cells": shift_cells},
               "study": cfg.study, "d": r.d, "ks": cfg.task.ks, "train_n0": r.train_n0, "eval_n": r.eval_n,
               "sigma_p": r.sigma_p, "shift_n": cfg.eval.n, "fixed_n0": n_fixed, "n_tasks": r.n_tasks,
               "reused_main_model": "reused_from" in json.loads(
                   (model_dir(cfg, n_fixed) / "model.json").read_text()),
               "device": str(device), "seconds": time.perf_counter() - t0}
    write_results(study_dir(cfg) / "eval" / "results.json", results)
    if track:
        log_wandb(cfg, results)
    return results


def _series(c: dict) -> str:
    return c["method"] if c.get("n0") is None else f"{c['method']}_n0={c['n0']}"


def metrics_flat(results: dict) -> dict[str, float]:
    """robustness/sample_size/<metric>/[n0=<N0>/]N=<N>/K=<K>/<method> and
    robustness/shift/<metric>/sigma_p=<s>/K=<K>/<method>; not-applicable cells left out."""
    from pipeline.studies.evaluate import METRICS

    flat = {}
    for kind in (SIZE, SHIFT):
        for c in results[kind]["cells"]:
            if not c["applicable"]:
                continue
            where = (("" if c["n0"] is None else f"n0={c['n0']}/") + f"N={c['N']}") if kind == SIZE \
                else f"sigma_p={_label(c['sigma_p'])}"
            for m in METRICS:
                v = c[m]["mean"]
                if v is not None and math.isfinite(v):
                    flat[f"robustness/{kind}/{m}/{where}/K={c['K']}/{c['method']}"] = v
    return flat


def curve_rows(results: dict) -> list[dict[str, float]]:
    """History rows that make W&B line plots against N and sigma_p (x keys robustness/curve/N and
    robustness/curve/sigma_p; y keys robustness/curve/<study>/l2/K=<K>/<series>)."""
    rows = []
    for kind, x_key, x_of in ((SIZE, "robustness/curve/N", lambda c: c["N"]),
                              (SHIFT, "robustness/curve/sigma_p", lambda c: c["sigma_p"])):
        by_x: dict = {}
        for c in results[kind]["cells"]:
            v = c["l2"]["mean"]
            if c["applicable"] and v is not None and math.isfinite(v):
                by_x.setdefault(x_of(c), {})[f"robustness/curve/{kind}/l2/K={c['K']}/{_series(c)}"] = v
        rows += [{x_key: x, **ys} for x, ys in sorted(by_x.items())]
    return rows


def log_wandb(cfg: Config, results: dict) -> None:
    """One run (job_type and group 'robustness'): the flat metrics, then the curves against N and sigma_p."""
    from pipeline.training import tracking

    with tracking.tracked_run(cfg, f"{cfg.study}-robustness", "robustness", cfg.out_dir,
                              group=GROUP) as logger:
        if logger is None:
            return
        run = logger.experiment
        run.log(metrics_flat(results))
        for x_key, study in (("robustness/curve/N", SIZE), ("robustness/curve/sigma_p", SHIFT)):
            run.define_metric(x_key)
            run.define_metric(f"robustness/curve/{study}/*", step_metric=x_key)
        for row in curve_rows(results):
            run.log(row)


# ----------------------------------------------------------------------------- report

def _index(cells: list[dict], key: str) -> dict:
    """{(series, K, x): cell} with series = (method, n0) and x = cell[key]."""
    return {((c["method"], c.get("n0")), int(c["K"]), c[key]): c for c in cells}


def _series_order(cells: list[dict]) -> list[tuple[str, int | None]]:
    from pipeline.studies.report import method_order

    series = {(c["method"], c.get("n0")) for c in cells}
    order = {m: i for i, m in enumerate(method_order({m for m, _ in series}))}
    return sorted(series, key=lambda s: (order[s[0]], -1 if s[1] is None else s[1]))


def _name(series: tuple[str, int | None]) -> str:
    m, n0 = series
    return m if n0 is None else f"{m} (N0={n0})"


def _table(cells: list[dict], key: str, header: str, fmt_x, metric: str, K: int, stat: str = "mean") -> list[str]:
    """Rows: series; columns: the values of `key`; cells mean ± ci95 (or the median), best in bold."""
    from pipeline.studies.report import METRIC_INFO, _fmt_ci, _num, _stat

    idx, series = _index(cells, key), _series_order(cells)
    xs = sorted({c[key] for c in cells})
    better = METRIC_INFO[metric][1]

    def value(c):
        if c is None or not c["applicable"]:
            return math.nan, math.nan
        return (_num(c[metric].get("median")), math.nan) if stat == "median" else _stat(c, metric)

    best = {}
    for x in xs:
        vals = [value(idx.get((s, K, x)))[0] for s in series]
        vals = [v for v in vals if math.isfinite(v)]
        best[x] = (min if better == "lower" else max)(vals) if len(vals) > 1 else None
    lines = [f"| {header} | " + " | ".join(fmt_x(x) for x in xs) + " |", "|---|" + "---:|" * len(xs)]
    for s in series:
        row = []
        for x in xs:
            c = idx.get((s, K, x))
            mu, ci = value(c)
            if c is None:
                row.append("")
            elif not c["applicable"]:
                row.append("n/a")
            else:
                text = _fmt_ci(mu, ci)
                row.append(f"**{text}**" if best[x] is not None and mu == best[x] else text)
        lines.append(f"| {_name(s)} | " + " | ".join(row) + " |")
    return lines


def markdown(results: dict) -> str:
    from pipeline.studies.report import METRIC_INFO

    ks, n_fixed = results["ks"], results["fixed_n0"]
    size, shift = results[SIZE]["cells"], results[SHIFT]["cells"]
    title, better, _, _, definition = METRIC_INFO["l2"]
    reused = " (the main study's network, reused)" if results.get("reused_main_model") else ""
    out = ["# TGMM robustness: sample size and distribution shift", "",
           f"d = {results['d']}, {results['n_tasks']} tasks per cell, the same tasks for every method. "
           f"{title} ({better} is better): {definition}. Mean ± 95 % CI half-width over tasks; **bold**: best "
           f"in the column; n/a: method not defined there (spectral needs K ≤ d).", "",
           "## Sample size: train N0 × test N", "",
           "Rows: TGMM trained with N ~ U[N0/2, N0] (one network per N0) and the classical baselines; "
           "columns: the sample size N of every test task (nested samples of the same mixtures).", ""]
    for K in ks:
        out += [f"**K = {K}**", "", *_table(size, "N", "train N0 \\ test N", str, "l2", K), ""]
    out += ["![l2 vs N](figures/l2_vs_N_by_n0.png)", "",
            "## Distribution shift: means + N(0, σ_p² I)", "",
            f"TGMM trained at N0 = {n_fixed}{reused}; test tasks at N = {results['shift_n']} whose means are "
            "the TGMM means plus σ_p·ε, ε ~ N(0, I) (the same ε for every σ_p), data redrawn around them.", ""]
    for K in ks:
        out += [f"**K = {K}**", "", *_table(shift, "sigma_p", "method \\ σ_p", _label, "l2", K), ""]
    out += ["![l2 vs sigma_p](figures/l2_vs_sigma_p.png)", "",
            "## Inference-time N: error vs N for a fixed model", "",
            f"The network trained at N0 = {n_fixed}, evaluated at every test N (rows: K).", "",
            *_fixed_table(results), "", "![fixed model](figures/l2_vs_N_fixed_model.png)", "",
            "## Medians over tasks", "",
            "A few blow-ups (e.g. the spectral method on near-collinear means) can dominate a mean.", ""]
    for K in ks:
        out += [f"**Sample size, K = {K}** (median ℓ2)", "",
                *_table(size, "N", "train N0 \\ test N", str, "l2", K, stat="median"), "",
                f"**Shift, K = {K}** (median ℓ2)", "",
                *_table(shift, "sigma_p", "method \\ σ_p", _label, "l2", K, stat="median"), ""]
    out += ["## Clustering accuracy", ""]
    for K in ks:
        out += [f"**Sample size, K = {K}**", "", *_table(size, "N", "train N0 \\ test N", str, "accuracy", K), "",
                f"**Shift, K = {K}**", "", *_table(shift, "sigma_p", "method \\ σ_p", _label, "accuracy", K), ""]
    return "\n".join(out)


def _fixed_cells(results: dict) -> list[dict]:
    return [c for c in results[SIZE]["cells"] if c["method"] == "tgmm" and c["n0"] == results["fixed_n0"]]


def _fixed_table(results: dict) -> list[str]:
    from pipeline.studies.report import _fmt_ci, _stat

    cells = {(c["K"], c["N"]): c for c in _fixed_cells(results)}
    ns = sorted({N for _, N in cells})
    lines = ["| K \\ test N | " + " | ".join(map(str, ns)) + " |", "|---|" + "---:|" * len(ns)]
    for K in results["ks"]:
        row = []
        for N in ns:
            mu, ci = _stat(cells.get((K, N)), "l2")
            if not math.isfinite(mu):
                row.append("")
            else:
                row.append(_fmt_ci(mu, ci))
        lines.append(f"| {K} | " + " | ".join(row) + " |")
    return lines


def metrics_json(results: dict) -> dict:
    """DVC metrics: sample_size.<method>[.n0=<N0>].N=<N>.K=<K>.<metric>, shift.<method>.sigma_p=<s>.K=<K>.<metric>."""
    from pipeline.studies.evaluate import METRICS
    from pipeline.studies.report import _stat

    out: dict = {SIZE: {}, SHIFT: {}, "fixed_n0": results["fixed_n0"]}
    not_applicable = []
    for kind in (SIZE, SHIFT):
        for c in results[kind]["cells"]:
            where = f"N={c['N']}" if kind == SIZE else f"sigma_p={_label(c['sigma_p'])}"
            if not c["applicable"]:
                not_applicable.append(f"{kind} {_series(c)} {where} K={c['K']}")
                continue
            node = out[kind].setdefault(c["method"], {})
            if c.get("n0") is not None:
                node = node.setdefault(f"n0={c['n0']}", {})
            vals = {m: _stat(c, m)[0] for m in METRICS}
            node.setdefault(where, {})[f"K={c['K']}"] = {m: v for m, v in vals.items() if math.isfinite(v)}
    out["not_applicable"] = sorted(set(not_applicable))
    return out


def write_plot_data(results: dict, out_dir: Path) -> list[Path]:
    """Long-format CSVs for `dvc plots` (one row per cell, 95 % CI in low/high; n/a cells left out).
    Every file has `panel` (one facet per value) and `series` (one line per value) columns:
      sample_size_<m>.csv  K,panel,method,n0,series,N,<m>,low,high        (m = l2, accuracy)
      shift_<m>.csv        K,panel,method,series,sigma_p,<m>,low,high
      fixed_model_l2.csv   K,panel,n0,series,N,l2,low,high              (panel: the one N0; series: K)
    """
    from pipeline.studies.report import _stat

    out_dir.mkdir(parents=True, exist_ok=True)

    def ordered(cells, key):
        order = _series_order(cells)
        return sorted(cells, key=lambda c: (c["K"], order.index((c["method"], c.get("n0"))), c[key]))

    def write(path, header, rows, metric):
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow([*header, metric, "low", "high"])
            for lead, c in rows:
                mu, ci = _stat(c, metric)
                if math.isfinite(mu):
                    ci = ci if math.isfinite(ci) else 0.0
                    w.writerow([*lead, repr(mu), repr(mu - ci), repr(mu + ci)])
        return path

    paths = []
    for metric in ("l2", "accuracy"):
        size = [([c["K"], f"K={c['K']}", c["method"], "" if c["n0"] is None else c["n0"],
                  _name((c["method"], c["n0"])), c["N"]], c) for c in ordered(results[SIZE]["cells"], "N")]
        paths.append(write(out_dir / f"{SIZE}_{metric}.csv", ["K", "panel", "method", "n0", "series", "N"],
                           size, metric))
        shift = [([c["K"], f"K={c['K']}", c["method"], _name((c["method"], c["n0"])), _label(c["sigma_p"])], c)
                 for c in ordered(results[SHIFT]["cells"], "sigma_p")]
        paths.append(write(out_dir / f"{SHIFT}_{metric}.csv", ["K", "panel", "method", "series", "sigma_p"],
                           shift, metric))
    fixed = [([c["K"], f"TGMM N0={c['n0']}", c["n0"], f"K={c['K']}", c["N"]], c)
             for c in sorted(_fixed_cells(results), key=lambda c: (c["K"], c["N"]))]
    paths.append(write(out_dir / "fixed_model_l2.csv", ["K", "panel", "n0", "series", "N"], fixed, "l2"))
    return paths


def _series_style(series_list: list, train_n0: list[int]) -> dict:
    """Networks: shades of blue by N0, the same in every figure (solid); baselines: the main report's
    colours (dashed)."""
    import matplotlib.pyplot as plt

    from pipeline.studies.report import CANONICAL_METHODS

    nets = sorted(set(train_n0) | {s[1] for s in series_list if s[1] is not None})
    blues = plt.get_cmap("Blues")
    style = {}
    for s in series_list:
        if s[1] is not None:
            shade = 0.45 + 0.5 * (nets.index(s[1]) / max(1, len(nets) - 1)) if len(nets) > 1 else 0.8
            style[s] = {"color": blues(shade), "ls": "-", "marker": "o"}
        else:
            i = CANONICAL_METHODS.index(s[0]) if s[0] in CANONICAL_METHODS else 4 + len(style)
            style[s] = {"color": plt.get_cmap("tab10")(i % 10), "ls": "--", "marker": "s"}
    return style


def _panels(results: dict, cells: list[dict], key: str, path: Path, *, xlabel: str, title: str, xscale,
            offsets: bool, mark_n0: bool = False) -> Path:
    """One panel per K: ℓ2 mean ± 95 % CI against `key`, one line per series, log y."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    import numpy as np

    from pipeline.studies.report import OFF_SCALE, _fmt, _stat

    ks = results["ks"]
    idx, series = _index(cells, key), _series_order(cells)
    style = _series_style(series, results["train_n0"])
    xs = sorted({c[key] for c in cells})
    ncols = min(len(ks), 4)
    nrows = math.ceil(len(ks) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.3 * ncols, 3.7 * nrows + 0.5), squeeze=False)
    for ax, K in zip(axes.flat, ks):
        lines, notes = [], []
        for i, s in enumerate(series):
            pts = []
            for x in xs:
                c = idx.get((s, K, x))
                if c is not None and not c["applicable"]:
                    notes.append(f"{_name(s)}: n/a")
                    break
                mu, ci = _stat(c, "l2")
                if math.isfinite(mu) and mu > 0:
                    pts.append((x, mu, ci if math.isfinite(ci) else 0.0))
            if pts:
                shift = 1 + 0.025 * (i - (len(series) - 1) / 2) if offsets else 1.0  # dodge error bars
                lines.append((s, [p[0] * shift for p in pts], [p[1] for p in pts], [p[2] for p in pts]))
        if len(lines) > 1:  # a series blown up by a few tasks (spectral, d = 2) would flatten the rest
            meds = [float(np.median(mus)) for _, _, mus, _ in lines]
            ref = float(np.median(meds))
            for (s, _, mus, _), med in zip(list(lines), meds):
                if med > OFF_SCALE * ref:
                    lines.remove(next(line for line in lines if line[0] == s))
                    notes.append(f"{_name(s)}: off scale (mean {_fmt(min(mus))} to {_fmt(max(mus))}; see tables)")
        if lines:
            floor = min(mu - ci if mu - ci > 0 else mu for _, _, mus, cis in lines for mu, ci in zip(mus, cis)) / 1.5
            top = max(mu + ci for _, _, mus, cis in lines for mu, ci in zip(mus, cis)) * 1.5
            ax.set_yscale("log")
            ax.set_ylim(floor, top)
            for s, px, mus, cis in lines:
                lower = [min(ci, mu - floor) for mu, ci in zip(mus, cis)]
                ax.errorbar(px, mus, yerr=[lower, cis], capsize=2.5, lw=1.5, ms=4, **style[s])
                if mark_n0 and s[1] is not None:
                    ax.axvline(s[1], color=style[s]["color"], ls=":", lw=1)
        xscale(ax)
        ax.set_xticks(xs)
        ax.set_xticklabels([_label(x) for x in xs])
        ax.set_title(f"K = {K}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ℓ2 error")
        ax.grid(True, which="major", alpha=0.3)
        if notes:  # under the axis, where no data can be hidden
            ax.annotate("\n".join(notes), xy=(0, 0), xycoords="axes fraction", xytext=(0, -38),
                        textcoords="offset points", fontsize=7, va="top", color="0.35")
    for ax in list(axes.flat)[len(ks):]:
        ax.set_visible(False)
    handles = [Line2D([], [], lw=1.5, label=_name(s), **style[s]) for s in series]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(series), 6), frameon=False)
    fig.suptitle(f"{title} — mean ± 95 % CI, d = {results['d']}, {results['n_tasks']} tasks per cell")
    fig.tight_layout(rect=(0, 0.45 / (3.7 * nrows + 0.5), 1, 1), h_pad=2.0)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _log2_x(ax) -> None:
    ax.set_xscale("log", base=2)
    ax.minorticks_off()


def _symlog_x(ax) -> None:
    ax.set_xscale("symlog", linthresh=1.0)
    ax.minorticks_off()


def _fixed_figure(results: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    from pipeline.studies.report import _stat

    cells = _fixed_cells(results)
    ns = sorted({c["N"] for c in cells})
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    cmap = plt.get_cmap("viridis")
    for i, K in enumerate(results["ks"]):
        pts = [(c["N"], *_stat(c, "l2")) for c in sorted(cells, key=lambda c: c["N"]) if c["K"] == K]
        pts = [(N, mu, ci if math.isfinite(ci) else 0.0) for N, mu, ci in pts if math.isfinite(mu) and mu > 0]
        if pts:
            mus, cis = [p[1] for p in pts], [p[2] for p in pts]
            ax.errorbar([p[0] for p in pts], mus, yerr=[[min(ci, 0.9 * mu) for mu, ci in zip(mus, cis)], cis],
                        color=cmap(i / max(1, len(results["ks"]) - 1)), marker="o", ms=4, capsize=2.5, lw=1.5,
                        label=f"K = {K}")
    ax.axvline(results["fixed_n0"], color="0.5", ls=":", lw=1)
    ax.text(results["fixed_n0"], 0.98, " training N0", transform=ax.get_xaxis_transform(), fontsize=7,
            color="0.4", va="top")
    ax.set_yscale("log")
    _log2_x(ax)
    ax.set_xticks(ns)
    ax.set_xticklabels([str(n) for n in ns])
    ax.set_xlabel("sample size N at inference")
    ax.set_ylabel("ℓ2 error")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    ax.set_title(f"TGMM (N0 = {results['fixed_n0']}): error vs N for a fixed model, d = {results['d']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_figures(results: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        _panels(results, results[SIZE]["cells"], "N", out_dir / "l2_vs_N_by_n0.png", xlabel="test sample size N",
                title="ℓ2 error vs test N per training N0 (dotted: each network's N0)", xscale=_log2_x,
                offsets=True, mark_n0=True),
        _panels(results, results[SHIFT]["cells"], "sigma_p", out_dir / "l2_vs_sigma_p.png",
                xlabel="mean perturbation σ_p (symlog)", title=f"ℓ2 error vs σ_p (TGMM N0 = {results['fixed_n0']}, "
                f"N = {results['shift_n']})", xscale=_symlog_x, offsets=False),
        _fixed_figure(results, out_dir / "l2_vs_N_fixed_model.png"),
    ]


def write_report(results: dict, out_dir: Path) -> list[Path]:
    """metrics.json, plots/*.csv, figures/*.png and report.md under out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = out_dir / "metrics.json"
    metrics.write_text(json.dumps(metrics_json(results), indent=2, allow_nan=False) + "\n")
    paths = [metrics, *write_plot_data(results, out_dir / "plots"), *write_figures(results, out_dir / "figures")]
    (out_dir / "report.md").write_text(markdown(results))
    return paths + [out_dir / "report.md"]


def report(cfg: Config) -> list[Path]:
    from pipeline.studies.evaluate import load_results

    results = load_results(study_dir(cfg) / "eval" / "results.json", "python -m pipeline robustness evaluate")
    return write_report(results, study_dir(cfg) / "report")


# ----------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="robustness_action", required=True, metavar="ACTION")
    t = sub.add_parser("train", help="train the network for each training N0 (reuses the main model at task.n0)")
    t.add_argument("--n0", type=int, action="append", help="training N0 (repeatable; default: robustness.train_n0)")
    t.add_argument("--no-track", action="store_true", help="no W&B run")
    t.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    t.add_argument("--no-reuse", action="store_true",
                   help="train at N0 = task.n0 too instead of reusing the main model")
    g = sub.add_parser("generate", help="write the sample-size and distribution-shift evaluation sets")
    g.add_argument("--data-dir", default=str(DATA_DIR))
    e = sub.add_parser("evaluate", help="every network and baseline on the same sets")
    e.add_argument("--data-dir", default=str(DATA_DIR))
    e.add_argument("--no-track", action="store_true", help="no W&B run")
    sub.add_parser("report", help="tables, dvc-plots CSVs, PNG figures, metrics JSON")


def main(args: argparse.Namespace, cfg: Config) -> int:
    action = args.robustness_action
    try:
        check(cfg)
        if action == "train":
            n0s = args.n0 or cfg.robustness.train_n0
            bad = [n for n in n0s if n not in cfg.robustness.train_n0]
            if bad:
                raise ConfigError(f"--n0 {bad[0]}: not in robustness.train_n0={cfg.robustness.train_n0}")
            for n0 in n0s:
                t0 = time.perf_counter()
                path, reused = train_n0(cfg, n0, track=not args.no_track, resume=not args.no_resume,
                                        reuse=not args.no_reuse)
                how = (f"reused the main model {main_model_path(cfg)} (task.n0 = {n0}, d = {cfg.robustness.d}); "
                       "no retraining") if reused else f"trained in {time.perf_counter() - t0:.0f} s"
                print(f"[robustness train N0={n0}] {how} -> {path}")
        elif action == "generate":
            paths = generate(cfg, Path(args.data_dir))
            print(f"wrote {len(paths)} robustness evaluation sets to {Path(args.data_dir)}")
        elif action == "evaluate":
            res = evaluate(cfg, Path(args.data_dir), track=not args.no_track)
            n = len(res[SIZE]["cells"]) + len(res[SHIFT]["cells"])
            print(f"evaluated {n} cells in {res['seconds']:.1f} s -> {study_dir(cfg) / 'eval' / 'results.json'}")
        elif action == "report":
            for p in report(cfg):
                print(p)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
