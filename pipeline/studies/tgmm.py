"""The TGMM study: which solvers on which evaluation sets, and where the results land.

    generate : fixed evaluation sets per (d, K)   -> data/gmm/d{d}_K{K}.npz
    evaluate : network + classical solvers on them -> <out>/eval/results.json
    report   : metrics JSON, dvc-plots CSVs, PNG figures, markdown tables -> <out>/report/
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from pipeline.config import Config
from pipeline.tasks.base import Solver
from pipeline.tasks.gmm import BASELINE_STREAM, EVAL_STREAM, GMMBatch, make_generator
from pipeline.training.module import sample_tasks

DATA_DIR = Path("data") / "gmm"


def eval_set_path(data_dir: Path, d: int, K: int) -> Path:
    return Path(data_dir) / f"d{d}_K{K}.npz"


def make_eval_set(cfg: Config, d: int, K: int, device="cpu") -> GMMBatch:
    """The fixed evaluation tasks of cell (d, K): N = eval.n samples each, seeded by (seed, d, K)."""
    g = make_generator(cfg.seed, EVAL_STREAM, d, K, device=device)
    return sample_tasks(cfg, d, K, cfg.eval.n_tasks, g, device, cfg.eval.n, cfg.eval.n)


def generate(cfg: Config, data_dir: Path = DATA_DIR) -> list[Path]:
    from pipeline.studies.evaluate import save_eval_set

    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for d in cfg.task.dims:
        for K in cfg.task.ks:
            path = eval_set_path(data_dir, d, K)
            meta = {"d": d, "K": K, "n": cfg.eval.n, "n_tasks": cfg.eval.n_tasks, "seed": cfg.seed,
                    "anisotropic": cfg.task.anisotropic}
            save_eval_set(path, make_eval_set(cfg, d, K), meta)
            paths.append(path)
    (data_dir / "manifest.json").write_text(json.dumps(
        {"files": [p.name for p in paths], "dims": cfg.task.dims, "ks": cfg.task.ks}, indent=2) + "\n")
    return paths


def load_eval_sets(cfg: Config, data_dir: Path = DATA_DIR) -> dict[tuple[int, int], GMMBatch]:
    from pipeline.studies.evaluate import load_eval_set

    sets = {}
    for d in cfg.task.dims:
        for K in cfg.task.ks:
            path = eval_set_path(data_dir, d, K)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: evaluation set not found (run `python -m pipeline generate`)")
            batch, meta = load_eval_set(path)
            if (meta.get("d"), meta.get("K"), meta.get("n_tasks"), meta.get("n")) != (d, K, cfg.eval.n_tasks, cfg.eval.n):
                raise ValueError(f"{path}: was generated for other params ({meta}); rerun `python -m pipeline generate`")
            sets[(d, K)] = batch
    return sets


def baseline_solvers(cfg: Config, d: int) -> list[Solver]:
    from pipeline.algorithms import EMPaper, EMStrong, Spectral

    b = cfg.baselines
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=make_generator(cfg.seed, BASELINE_STREAM, d)))
    aniso = cfg.task.anisotropic
    cov = "diag" if aniso else "identity"  # anisotropic tasks: EM fits diagonal covariances
    table = {
        "em_paper": lambda: EMPaper(max_iter=b.em_max_iter, tol=b.em_tol, seed=seed, covariance=cov),
        "em_strong": lambda: EMStrong(restarts=b.strong_restarts, max_iter=b.em_max_iter, tol=b.em_tol,
                                      covariance=cov, seed=seed),
        "spectral": lambda: Spectral(n_restarts=b.spectral_restarts, n_iter=b.spectral_iters, seed=seed,
                                     anisotropic=aniso),
    }
    return [table[m]() for m in b.methods]


def main_model_path(cfg: Config, d: int) -> Path:
    return Path(cfg.out_dir) / "train" / f"d{d}" / "model.safetensors"


def annotate(path: Path, **extra) -> None:
    """Add keys to a JSON file (created if missing)."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**data, **extra}, indent=2, sort_keys=True) + "\n")


def check_trained_network(path: Path, run_cfg: Config, d: int, rerun: str, *,
                          allow_unfingerprinted: bool = False) -> Path:
    """Fail (before any compute) unless the network at `path` and its .json exist and were trained with
    run_cfg's params and code. `rerun` says what (re)creates it, e.g. "run `python -m pipeline train --d 2`"."""
    from pipeline.config import ConfigError
    from pipeline.training.train import training_fingerprint

    spec = path.with_suffix(".json")
    for p in (path, spec):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: trained network not found ({rerun})")
    have, want = json.loads(spec.read_text()).get("fingerprint"), training_fingerprint(run_cfg, d)
    if have != want and not (allow_unfingerprinted and have is None):
        raise ConfigError(f"{path}: was trained with other params (fingerprint {have}, these params give {want}); "
                          f"{rerun}")
    return path


def copy_main_network(cfg: Config, d: int, out_dir: Path, why: str) -> Path:
    """Copy the main study's network for d (model, spec, metrics) into out_dir, unchanged, after checking
    it was trained with these params: other studies reuse it instead of training the same network twice."""
    import shutil

    src = check_trained_network(main_model_path(cfg, d), cfg, d, f"{why}: run `python -m pipeline train --d {d}` "
                                "first, or pass --no-reuse", allow_unfingerprinted=True)
    spec = src.with_suffix(".json")
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, out_dir / "model.safetensors")
    shutil.copyfile(spec, out_dir / "model.json")
    annotate(out_dir / "model.json", reused_from=str(src))
    if (src.parent / "metrics.json").is_file():
        shutil.copyfile(src.parent / "metrics.json", out_dir / "metrics.json")
    return out_dir / "model.safetensors"


def network_solver(cfg: Config, d: int, device) -> Solver:
    from pipeline.models.tgmm import NetworkSolver, load_network

    path = main_model_path(cfg, d)
    return NetworkSolver(load_network(path, device=device), name="tgmm")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("eval.device: cuda requested but no CUDA device is available")
    return torch.device(name)


def evaluate(cfg: Config, data_dir: Path = DATA_DIR, track: bool = True) -> dict:
    from pipeline.studies.evaluate import evaluate_grid, write_results
    from pipeline.training import tracking

    sets = load_eval_sets(cfg, data_dir)
    for d in cfg.task.dims:  # fail before any compute if a network is missing
        p = Path(cfg.out_dir) / "train" / f"d{d}" / "model.safetensors"
        if not p.is_file():
            raise FileNotFoundError(f"{p}: trained network not found (run `python -m pipeline train --d {d}`)")
    device = resolve_device(cfg.eval.device)
    sets = {k: v.to(device) for k, v in sets.items()}

    def solvers_for_d(d: int) -> list[Solver]:
        return [network_solver(cfg, d, device), *baseline_solvers(cfg, d)]

    results = evaluate_grid(solvers_for_d, sets, chunk_size=cfg.eval.chunk_size)
    results.update(study=cfg.study, dims=cfg.task.dims, ks=cfg.task.ks, n=cfg.eval.n, n_tasks=cfg.eval.n_tasks,
                   device=str(device))
    out = Path(cfg.out_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    write_results(out / "results.json", results)
    if track:
        with tracking.tracked_run(cfg, f"{cfg.study}-evaluate", "evaluate", cfg.out_dir) as logger:
            if logger is not None:
                logger.experiment.log(eval_metrics_flat(results))
    return results


def eval_metrics_flat(results: dict) -> dict[str, float]:
    """eval/<metric>/d=<d>/K=<K>/<method> for W&B; not-applicable cells are left out."""
    from pipeline.studies.evaluate import METRICS

    flat = {}
    for c in results["cells"]:
        if not c["applicable"]:
            continue
        for metric in METRICS:
            v = c[metric]["mean"]
            if v is not None and math.isfinite(v):
                flat[f"eval/{metric}/d={c['d']}/K={c['K']}/{c['method']}"] = v
        flat[f"eval/seconds/d={c['d']}/K={c['K']}/{c['method']}"] = c["seconds"]
    return flat


def report(cfg: Config) -> list[Path]:
    from pipeline.studies.report import write_report

    from pipeline.studies.evaluate import load_results

    results = load_results(Path(cfg.out_dir) / "eval" / "results.json", "python -m pipeline evaluate")
    return write_report(results, Path(cfg.out_dir) / "report")
