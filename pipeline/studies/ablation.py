"""TGMM flexibility (STUDIES.md section 1): the backbone ablation and the anisotropic study.

    params   each variant's matched width and parameter count (no training)
    train    every variant of `ablation.variants` at d = ablation.d   -> <out>/ablation/train/<variant>/
             and the main model on anisotropic mixtures             -> <out>/ablation/train/anisotropic/
    generate evaluation sets    -> data/ablation/{iso,aniso}_d<d>_K<K>.npz
             (iso: the main study's tasks, same seeds, so identical to data/gmm/d<d>_K<K>.npz)
    evaluate every variant and the baselines on the iso sets; the anisotropic network and the
             baselines (EM with diagonal covariances; spectral n/a) on the aniso sets
                                                                     -> <out>/ablation/eval/results.json
    report   tables, dvc-plots CSVs, PNG figures, metrics JSON       -> <out>/ablation/report/

Variants. A variant is `model` with a few keys overridden (params.yaml `ablation.variants`), e.g.
{backbone: mamba2} or {attention: relu}. With `ablation.match_params` its width n_embd is chosen so
that the whole network (read-in, backbone, read-out heads) has the parameter count closest to the
main network's; depth and heads stay. A variant that sets n_embd itself keeps it. A variant equal
to `model` is the main study's network, copied, not retrained (when ablation.d is in task.dims); so
is the anisotropic network when the main study is anisotropic already. Everything else is trained by the one `train()`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from pipeline.config import Config, ConfigError, ModelConfig, check_model, variant_model

DATA_DIR = Path("data") / "ablation"
ANISO = "anisotropic"
BACKBONES = "backbones"


# ----------------------------------------------------------------------------- paths and params

def study_dir(cfg: Config) -> Path:
    return Path(cfg.out_dir) / "ablation"


def model_dir(cfg: Config, name: str) -> Path:
    return study_dir(cfg) / "train" / name


def set_path(data_dir: Path, kind: str, d: int, K: int) -> Path:
    """kind: 'iso' (the main study's tasks) or 'aniso'."""
    return Path(data_dir) / f"{kind}_d{d}_K{K}.npz"


def n_params(cfg: Config, m: ModelConfig, anisotropic: bool | None = None) -> int:
    from pipeline.models.tgmm import count_parameters

    scales = cfg.task.anisotropic if anisotropic is None else anisotropic
    return count_parameters(cfg.ablation.d, cfg.task.ks, m, scales)


def matched_model(cfg: Config, name: str) -> ModelConfig:
    """The variant's model; with match_params, at the width whose parameter count is closest to the
    main network's (ties: the narrower). Widths tried: multiples of n_head up to 4x model.n_embd that
    pass the variant's own checks (e.g. mamba2's headdim must divide expand * n_embd)."""
    m = variant_model(cfg, name)
    if not cfg.ablation.match_params or "n_embd" in cfg.ablation.variants[name] or m == cfg.model:
        return m
    target = n_params(cfg, cfg.model)
    best = None
    for width in range(m.n_head, 4 * cfg.model.n_embd + 1, m.n_head):
        cand = replace(m, n_embd=width)
        try:
            check_model(cand, f"ablation.variants.{name}")
        except ConfigError:
            continue
        gap = abs(n_params(cfg, cand) - target)
        if best is None or gap < best[0]:
            best = (gap, cand)
    if best is None:
        raise ConfigError(f"ablation.variants.{name}: no width up to {4 * cfg.model.n_embd} satisfies the variant's "
                          "constraints (check headdim / n_head)")
    return best[1]


def _single_run(cfg: Config) -> Config:
    """A run of one network does not carry the study's variants (they are relative to the main model and
    need not be valid relative to a variant's; the training fingerprint ignores this section anyway)."""
    return replace(cfg, ablation=replace(cfg.ablation, variants={"main": {}}))


def variant_config(cfg: Config, name: str) -> Config:
    return _single_run(replace(cfg, model=matched_model(cfg, name)))


def anisotropic_config(cfg: Config) -> Config:
    return _single_run(replace(cfg, task=replace(cfg.task, anisotropic=True)))


def run_config(cfg: Config, name: str) -> Config:
    """The config that trains `name`: a variant at its matched width, or the anisotropic network."""
    return anisotropic_config(cfg) if name == ANISO else variant_config(cfg, name)


def reuses_main_model(cfg: Config, name: str, model: ModelConfig | None = None) -> bool:
    """Whether `name` is the main study's network (`model`: the variant's matched model, if known)."""
    if cfg.ablation.d not in cfg.task.dims:
        return False
    if name == ANISO:
        return cfg.task.anisotropic
    return (model or matched_model(cfg, name)) == cfg.model


def describe_variants(cfg: Config) -> dict[str, dict]:
    """{variant: {backbone, label, n_embd, params, reuses_main_model}} (milliseconds: meta-device counts)."""
    from pipeline.models.backbone import describe

    out = {}
    for name in cfg.ablation.variants:
        m = matched_model(cfg, name)
        out[name] = {"backbone": m.backbone, "label": describe(m), "n_embd": m.n_embd, "params": n_params(cfg, m),
                     "reuses_main_model": reuses_main_model(cfg, name, m)}
    return out


# ----------------------------------------------------------------------------- training

def train_one(cfg: Config, name: str, *, track: bool = True, resume: bool = True, reuse: bool = True,
              progress_bar: bool = True) -> tuple[Path, bool]:
    """Train variant `name` (or ANISO): (model path, whether the main study's network was reused)."""
    from pipeline.studies.tgmm import annotate, copy_main_network
    from pipeline.training.train import _is_rank_zero, train

    d, out = cfg.ablation.d, model_dir(cfg, name)
    run_cfg = run_config(cfg, name)
    info = {"variant": name, "n_embd": run_cfg.model.n_embd,
            "params": n_params(cfg, run_cfg.model, run_cfg.task.anisotropic)}
    if reuse and reuses_main_model(cfg, name, run_cfg.model):
        path = copy_main_network(cfg, d, out, why=f"the main model is reused as ablation variant {name!r}")
        annotate(out / "metrics.json", **info, reused_main_model=1)
        return path, True
    t0 = time.perf_counter()
    res = train(run_cfg, d, out, track=track, resume=resume, progress_bar=progress_bar,
                run_name=f"{cfg.study}-ablation-{name}", wandb_group="ablation")
    if _is_rank_zero() and res.model_path.is_file():
        annotate(out / "metrics.json", **info, reused_main_model=0, train_seconds=time.perf_counter() - t0)
    return res.model_path, False


# ----------------------------------------------------------------------------- evaluation sets

def generate(cfg: Config, data_dir: Path = DATA_DIR) -> list[Path]:
    """Per K: the main study's tasks at d = ablation.d (same seeds) and their anisotropic counterpart."""
    from pipeline.studies.evaluate import save_eval_set
    from pipeline.studies.tgmm import make_eval_set

    d = cfg.ablation.d
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind, kcfg in (("iso", replace(cfg, task=replace(cfg.task, anisotropic=False))),
                       ("aniso", anisotropic_config(cfg))):
        for K in cfg.task.ks:
            meta = {"d": d, "K": K, "n": cfg.eval.n, "n_tasks": cfg.eval.n_tasks, "seed": cfg.seed,
                    "anisotropic": kind == "aniso"}
            paths.append(save_eval_set(set_path(data_dir, kind, d, K), make_eval_set(kcfg, d, K), meta))
    return paths


def load_sets(cfg: Config, data_dir: Path = DATA_DIR) -> tuple[dict, dict]:
    """({(d, K): isotropic set}, {(d, K): anisotropic set}) for d = ablation.d."""
    from pipeline.studies.evaluate import load_eval_set

    d = cfg.ablation.d
    out: dict[str, dict] = {"iso": {}, "aniso": {}}
    for kind in out:
        for K in cfg.task.ks:
            path = set_path(data_dir, kind, d, K)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: evaluation set not found (run `python -m pipeline ablation generate`)")
            batch, meta = load_eval_set(path)
            want = (d, K, cfg.eval.n_tasks, cfg.eval.n, kind == "aniso")
            if (meta.get("d"), meta.get("K"), meta.get("n_tasks"), meta.get("n"), meta.get("anisotropic")) != want:
                raise ValueError(f"{path}: was generated for other params ({meta}); "
                                 "rerun `python -m pipeline ablation generate`")
            out[kind][(d, K)] = batch
    return out["iso"], out["aniso"]


# ----------------------------------------------------------------------------- evaluation

def _load_checked(cfg: Config, name: str, device):
    """The trained network of `name`, after checking it belongs to these params (before any compute)."""
    from pipeline.models.tgmm import load_network
    from pipeline.studies.tgmm import check_trained_network

    hint = "--anisotropic" if name == ANISO else f"--variant {name}"
    path = check_trained_network(model_dir(cfg, name) / "model.safetensors", run_config(cfg, name), cfg.ablation.d,
                                 f"run `python -m pipeline ablation train {hint}`")
    return lambda: load_network(path, device=device)


def evaluate(cfg: Config, data_dir: Path = DATA_DIR, track: bool = True) -> dict:
    from pipeline.models.tgmm import NetworkSolver
    from pipeline.studies.evaluate import evaluate_grid, write_results
    from pipeline.studies.tgmm import baseline_solvers, resolve_device

    d = cfg.ablation.d
    iso, aniso = load_sets(cfg, data_dir)
    device = resolve_device(cfg.eval.device)
    loaders = {name: _load_checked(cfg, name, device) for name in [*cfg.ablation.variants, ANISO]}
    t0 = time.perf_counter()
    nets = [NetworkSolver(loaders[name](), name=name) for name in cfg.ablation.variants]
    baselines = baseline_solvers(cfg, d)
    backbones = evaluate_grid(lambda _d: [*nets, *baselines], {k: v.to(device) for k, v in iso.items()},
                              chunk_size=cfg.eval.chunk_size, progress=False)
    backbones["method_order"] = [*cfg.ablation.variants, *(b.name for b in baselines)]
    print(f"[ablation evaluate] backbones: done ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    acfg = anisotropic_config(cfg)
    aniso_res = evaluate_grid(lambda _d: [NetworkSolver(loaders[ANISO](), name="tgmm"), *baseline_solvers(acfg, d)],
                              {k: v.to(device) for k, v in aniso.items()}, chunk_size=cfg.eval.chunk_size,
                              progress=False)
    print(f"[ablation evaluate] anisotropic: done ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    variants = describe_variants(cfg)
    for name, info in variants.items():
        metrics = model_dir(cfg, name) / "metrics.json"
        if metrics.is_file():
            info["val_l2"] = json.loads(metrics.read_text()).get("val/l2")
    results = {BACKBONES: backbones, ANISO: aniso_res, "variants": variants,
               "reference_params": n_params(cfg, cfg.model), "study": cfg.study, "d": d, "ks": cfg.task.ks,
               "n": cfg.eval.n, "n_tasks": cfg.eval.n_tasks, "device": str(device),
               "seconds": time.perf_counter() - t0}
    write_results(study_dir(cfg) / "eval" / "results.json", results)
    if track:
        log_wandb(cfg, results)
    return results


def log_wandb(cfg: Config, results: dict) -> None:
    """One run (group and job_type 'ablation'): ablation/<part>/<metric>/d=<d>/K=<K>/<method> and the counts."""
    from pipeline.studies.tgmm import eval_metrics_flat
    from pipeline.training import tracking

    with tracking.tracked_run(cfg, f"{cfg.study}-ablation", "ablation", cfg.out_dir, group="ablation") as logger:
        if logger is None:
            return
        flat = {}
        for part in (BACKBONES, ANISO):
            flat.update({f"ablation/{part}/{k[len('eval/'):]}": v for k, v in eval_metrics_flat(results[part]).items()})
        flat.update({f"ablation/params/{n}": v["params"] for n, v in results["variants"].items()})
        logger.experiment.log(flat)


# ----------------------------------------------------------------------------- report

def backbone_table(results: dict, metric: str = "l2") -> str:
    """Rows: variants (with width and parameter count), then baselines; columns: K; cells mean ± 95 % CI."""
    from pipeline.studies.report import METRIC_INFO, _fmt_ci, _grid, _row, _stat

    part = results[BACKBONES]
    methods, ds, Ks, index = _grid(part)
    (d,) = ds
    title, better, _, _, _ = METRIC_INFO[metric]
    variants = results["variants"]
    lines = [f"### {title} by K per backbone, d = {d} ({better} is better)", "",
             f"Mean ± 95 % CI over {results['n_tasks']} tasks per K (N = {results['n']}); every network has about "
             f"the main network's {results['reference_params']:,} parameters.", "",
             "| method | model | params | " + " | ".join(f"K={K}" for K in Ks) + " |",
             "|---|---|---:|" + "---:|" * len(Ks)]
    for m in methods:
        cells = _row(index, m, d, Ks, lambda cell, _K: _fmt_ci(*_stat(cell, metric)))
        v = variants.get(m)
        model, params = (v["label"], f"{v['params']:,}") if v else ("classical baseline", "—")
        lines.append(f"| {m} | {model} | {params} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(results: dict) -> str:
    from pipeline.studies.report import markdown_median_table, markdown_table

    d = results["d"]
    return "\n".join([
        "# TGMM flexibility: backbone ablation and anisotropic mixtures", "",
        f"d = {d}, K ∈ {results['ks']}; {results['n_tasks']} evaluation tasks per K at N = {results['n']}.", "",
        "## Backbones at matched parameter count", "",
        "Each network is the TGMM model (same read-in and read-out heads, same training) with another sequence "
        "backbone; widths chosen so that the parameter counts match the main network. Every network is scored "
        "on the same tasks (the main study's evaluation set at this d).", "",
        backbone_table(results, "l2"), backbone_table(results, "accuracy"),
        "![l2 by K per backbone](figures/backbones/l2_vs_K.png)", "",
        "## Anisotropic mixtures", "",
        "Per-component diagonal standard deviations 2·softplus(U(−1, 1)); the network also predicts them. EM fits "
        "diagonal covariances; the spectral method assumes one spherical covariance and is not applicable.", "",
        markdown_table(results[ANISO], "l2"), markdown_median_table(results[ANISO], "l2"),
        markdown_table(results[ANISO], "accuracy"),
        "![anisotropic l2 by K](figures/anisotropic/l2_vs_K.png)", ""])


def metrics_json(results: dict) -> dict:
    from pipeline.studies.report import metrics_json as cell_metrics

    return {BACKBONES: cell_metrics(results[BACKBONES]), ANISO: cell_metrics(results[ANISO]),
            "params": {n: v["params"] for n, v in results["variants"].items()},
            "reference_params": results["reference_params"]}


def write_report(results: dict, out_dir: Path) -> list[Path]:
    """metrics.json, plots/<part>/<metric>.csv, figures/<part>/<metric>_vs_K.png and report.md."""
    from pipeline.studies.report import write_figures, write_plot_data

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = out_dir / "metrics.json"
    metrics.write_text(json.dumps(metrics_json(results), indent=2, allow_nan=False) + "\n")
    paths = [metrics]
    for part in (BACKBONES, ANISO):
        paths += write_plot_data(results[part], out_dir / "plots" / part)
        paths += write_figures(results[part], out_dir / "figures" / part)
    (out_dir / "report.md").write_text(markdown(results))
    return paths + [out_dir / "report.md"]


def report(cfg: Config) -> list[Path]:
    from pipeline.studies.evaluate import load_results

    results = load_results(study_dir(cfg) / "eval" / "results.json", "python -m pipeline ablation evaluate")
    return write_report(results, study_dir(cfg) / "report")


# ----------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="ablation_action", required=True, metavar="ACTION")
    sub.add_parser("params", help="print each variant's matched width and parameter count")
    t = sub.add_parser("train", help="train the variants and the anisotropic network (default: all)")
    t.add_argument("--variant", action="append", help="a variant of ablation.variants (repeatable)")
    t.add_argument("--anisotropic", action="store_true", help="train the anisotropic network")
    t.add_argument("--no-track", action="store_true", help="no W&B run")
    t.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    t.add_argument("--no-reuse", action="store_true", help="retrain a variant equal to the main model too")
    g = sub.add_parser("generate", help="write the isotropic and anisotropic evaluation sets")
    g.add_argument("--data-dir", default=str(DATA_DIR))
    e = sub.add_parser("evaluate", help="every network and baseline on the same sets")
    e.add_argument("--data-dir", default=str(DATA_DIR))
    e.add_argument("--no-track", action="store_true", help="no W&B run")
    sub.add_parser("report", help="tables, dvc-plots CSVs, PNG figures, metrics JSON")


def main(args: argparse.Namespace, cfg: Config) -> int:
    action = args.ablation_action
    try:
        if action == "params":
            ref = n_params(cfg, cfg.model)
            print(f"reference: the main network, {ref:,} parameters (d = {cfg.ablation.d}, K in {cfg.task.ks})")
            for name, v in describe_variants(cfg).items():
                note = " (the main network, reused)" if v["reuses_main_model"] else ""
                print(f"  {name:<18} {v['label']:<36} {v['params']:>9,} ({100 * (v['params'] / ref - 1):+.1f} %){note}")
        elif action == "train":
            names = list(args.variant or [])
            for n in names:
                variant_model(cfg, n)  # unknown name -> one-line error before any compute
            if not names and not args.anisotropic:
                names = [*cfg.ablation.variants, ANISO]
            elif args.anisotropic:
                names.append(ANISO)
            for name in names:
                t0 = time.perf_counter()
                path, reused = train_one(cfg, name, track=not args.no_track, resume=not args.no_resume,
                                         reuse=not args.no_reuse)
                how = "reused the main model (no retraining)" if reused else \
                    f"trained in {time.perf_counter() - t0:.0f} s"
                print(f"[ablation train {name}] {how} -> {path}")
        elif action == "generate":
            paths = generate(cfg, Path(args.data_dir))
            print(f"wrote {len(paths)} evaluation sets to {Path(args.data_dir)}")
        elif action == "evaluate":
            res = evaluate(cfg, Path(args.data_dir), track=not args.no_track)
            n = len(res[BACKBONES]["cells"]) + len(res[ANISO]["cells"])
            print(f"evaluated {n} cells in {res['seconds']:.1f} s -> {study_dir(cfg) / 'eval' / 'results.json'}")
        elif action == "report":
            for p in report(cfg):
                print(p)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
