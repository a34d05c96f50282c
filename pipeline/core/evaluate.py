"""Offline evaluation of a declared study: fixed evaluation sets -> every method -> long-format results.

    generate(cfg, study)  every grid point's tasks -> data/<study>/<grid>/<point>.npz (plain arrays + meta)
    evaluate(cfg, study)  networks (checked against the plan's fingerprints) and classical solvers on
                          those sets, then the study's probes (core/probe.py) ->
                          <out_dir>/<study>/results.json (core/results.py schema)

Methods run under no_grad in chunks of eval.chunk_size tasks; per-task metrics are computed per
chunk and concatenated, and a solver's random start for a task depends on the task's index in its
set only (batch.slice keeps it), so results never depend on the chunking.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.core import family as F
from pipeline.core import plan as P
from pipeline.core.arrays import DataError, load_arrays, save_arrays
from pipeline.core.config import Config, ConfigError
from pipeline.core.results import summarize, write_results


def point_key(point: dict) -> str:
    """{'d': 2, 'K': 3} -> 'd2_K3' (a file name; floats as %g)."""
    return "_".join(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in point.items()) or "all"


def set_path(study: str, grid: str, point: dict, root: Path | None = None) -> Path:
    return (root or P.data_dir(study)) / grid / f"{point_key(point)}.npz"


def _set_meta(cfg: Config, study, grid, point: dict) -> dict:
    """What a stored set must match: what the study's sets depend on (plan.data_file) and the point."""
    plan_part = P.data_file(cfg, study.name)
    fp = hashlib.sha256(json.dumps(plan_part, sort_keys=True).encode()).hexdigest()[:12]
    return {"study": study.name, "grid": grid.name, "point": point, "fingerprint": fp}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("eval.device: cuda requested but no CUDA device is available (use auto or cpu)")
    return torch.device(name)


def generate(cfg: Config, study, root: Path | None = None) -> list[Path]:
    """Write every grid point's evaluation set; files of points no longer declared are removed."""
    from pipeline.core.study import SkipPoint

    root = root or P.data_dir(study.name)
    paths, skipped = [], {}
    for grid in study.grids(cfg):
        for point in grid.points:
            try:
                batch = grid.make_set(cfg, point)
            except SkipPoint as e:
                skipped[f"{grid.name}/{point_key(point)}"] = str(e)
                print(f"[{study.name}] {grid.name} {point_key(point)}: skipped: {e}")
                continue
            paths.append(save_arrays(set_path(study.name, grid.name, point, root), batch.to_numpy(),
                                     _set_meta(cfg, study, grid, point)))
    keep = set(paths)
    for old in root.rglob("*.npz"):
        if old not in keep:
            old.unlink()
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps({"study": study.name, "files": [
        str(p.relative_to(root)) for p in paths], "skipped": skipped}, indent=2) + "\n")
    return paths


def skipped_points(study, root: Path | None = None) -> dict[str, str]:
    """{"<grid>/<point key>": reason} of the points `generate` skipped (SkipPoint)."""
    path = (root or P.data_dir(study.name)) / "manifest.json"
    try:
        return dict(json.loads(path.read_text()).get("skipped", {}))
    except (OSError, ValueError):
        return {}


def load_set(cfg: Config, study, grid, point: dict, root: Path | None = None):
    fam = F.get(study.family)
    path = set_path(study.name, grid.name, point, root)
    produced_by = f"python -m pipeline --study {study.name} generate"
    arrays, meta = load_arrays(path, fam.batch_type.REQUIRED, what="evaluation set", produced_by=produced_by)
    want = _set_meta(cfg, study, grid, point)
    if meta.get("fingerprint") != want["fingerprint"] or meta.get("point") != json.loads(json.dumps(point)):
        raise DataError(f"evaluation set {path}: was generated for other params; rerun `{produced_by}`")
    try:
        return fam.batch_type.from_numpy(arrays, where=f"evaluation set {path}")
    except ValueError as e:
        raise DataError(f"{e}; rerun `{produced_by}`") from None


# ----------------------------------------------------------------------------- running methods

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def score(solver, batch, metrics: dict, chunk_size: int | None) -> tuple[dict[str, np.ndarray], float, bool, str]:
    """Run `solver` on `batch` chunk by chunk; per-task metric arrays (B,) or (B, P), solver seconds,
    applicable, reason."""
    device = batch.device
    step = batch.B if not chunk_size else int(chunk_size)
    parts: dict[str, list] = {m: [] for m in metrics}
    seconds, applicable, reason = 0.0, True, ""
    with torch.no_grad():
        for start in range(0, batch.B, step):
            chunk = batch.slice(start, min(batch.B, start + step))
            _sync(device)
            t0 = time.perf_counter()
            est = solver(chunk)
            _sync(device)
            seconds += time.perf_counter() - t0
            if not getattr(est, "applicable", True):
                return {}, seconds, False, getattr(est, "reason", "") or "not applicable"
            cpu = chunk.to("cpu")
            for name, m in metrics.items():
                v = m.fn(cpu, est)
                parts[name].append(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
    return {m: np.concatenate(v) for m, v in parts.items()}, seconds, applicable, reason


def rows_for(grid: str, point: dict, method, network: str | None, metrics: dict, values: dict, seconds: float,
             applicable: bool, reason: str) -> list[dict]:
    rows = []
    for name, m in metrics.items():
        base = {"grid": grid, "method": method.name, "network": network, "metric": name, "seconds": seconds,
                "applicable": applicable, "reason": reason}
        if not applicable:
            nan = summarize(np.array([]))
            if m.axis is None:
                rows.append({**base, "point": dict(point), **nan})
            continue
        v = values[name]
        if m.axis is None:
            rows.append({**base, "point": dict(point), **summarize(v)})
        else:
            for i in range(v.shape[1]):
                rows.append({**base, "point": {**point, m.axis: i + m.axis_start}, **summarize(v[:, i])})
    return rows


class _Networks:
    """Trained networks of a study, loaded once each and checked against the plan before any compute."""

    def __init__(self, cfg: Config, study, device):
        from pipeline.core.network import NetworkSolver, load_network

        plan = P.resolve_all(cfg, [study.name])
        self.run_of = plan.studies[study.name].networks  # unit -> run id
        self.solvers = {}
        for unit, rid in self.run_of.items():
            path = P.run_dir(cfg, rid) / "model.safetensors"
            net = load_network(path, device, expect_fingerprint=plan.fingerprints[rid],
                               rerun=f"run `python -m pipeline train --run {rid}`")
            self.solvers[unit] = NetworkSolver(net, name=unit)


def is_evaluated(cfg: Config, name: str) -> bool:
    """True if the study's results.json was written from exactly its current inputs (the
    fingerprint evaluate() stores): the evaluate command then skips it."""
    import json

    path = P.study_dir(cfg, name) / "results.json"
    try:
        meta = json.loads(path.read_text()).get("meta", {})
    except (OSError, ValueError, AttributeError):
        return False
    plan = P.resolve_all(cfg, [name])
    return meta.get("inputs") == P.evaluation_fingerprint(cfg, plan, name)


def evaluate(cfg: Config, study, root: Path | None = None, track: bool = True, progress: bool = True) -> dict:
    """Every declared grid x point x method; returns (and writes) the results, with the fingerprint
    of their inputs (is_evaluated)."""
    from pipeline.core import tracking

    inputs = P.evaluation_fingerprint(cfg, P.resolve_all(cfg, [study.name]), study.name) if root is None else None

    fam = F.get(study.family)
    grids = study.grids(cfg)
    sets = {(g.name, P_key): None for g in grids for P_key in map(point_key, g.points)}
    skipped = skipped_points(study, root)
    for g in grids:  # every set and network is checked before any compute
        for point in g.points:
            if f"{g.name}/{point_key(point)}" not in skipped:
                sets[(g.name, point_key(point))] = load_set(cfg, study, g, point, root)
    device = resolve_device(cfg.eval.device)
    nets = _Networks(cfg, study, device)
    solver_params = study.solver_params(cfg)
    rows: list[dict] = []
    total = sum(len(g.methods(cfg, p)) for g in grids for p in g.points)
    t_start = time.perf_counter()
    with tqdm(total=total, desc=f"evaluate {study.name}", unit="cell", disable=not progress) as bar:
        for gi, g in enumerate(grids):
            for pi, point in enumerate(g.points):
                skip = skipped.get(f"{g.name}/{point_key(point)}")
                batch = None if skip else sets[(g.name, point_key(point))].to(device)
                task = study.point_task(cfg, g, point)
                for method in g.methods(cfg, point):
                    bar.set_postfix_str(f"{g.name} {point_key(point)} {method.name}")
                    if skip:
                        rows += rows_for(g.name, point, method, nets.run_of.get(method.unit), fam.metrics, {}, 0.0,
                                         False, f"skipped: {skip}")
                        bar.update(1)
                        continue
                    if method.unit is not None:
                        solver, network = nets.solvers[method.unit], nets.run_of[method.unit]
                    else:
                        if method.solver not in fam.solvers:
                            raise ConfigError(f"{study.name}: unknown solver {method.solver!r} for family "
                                              f"{fam.name} (choose from: {', '.join(fam.solvers)})")
                        params = {**solver_params, **(method.params or {})}
                        solver, network = fam.solvers[method.solver].factory(params, cfg.seed, task), None
                    values, seconds, ok, reason = score(solver, batch, fam.metrics, cfg.eval.chunk_size)
                    rows += rows_for(g.name, point, method, network, fam.metrics, values, seconds, ok, reason)
                    bar.update(1)
    from pipeline.core.probe import run_study_probes

    probe_rows, probes = run_study_probes(cfg, study, sets, nets, device, solver_params, progress=progress)
    rows += probe_rows
    results = {"study": study.name, "family": study.family, "title": study.title, "rows": rows,
               "meta": {"inputs": inputs, "device": str(device), "seconds": time.perf_counter() - t_start,
                        "networks": nets.run_of, "probes": probes,
                        "grids": {g.name: {"axes": g.axes, "points": g.points, "n_tasks": g.n_tasks,
                                           "title": g.title} for g in grids}}}
    write_results(P.study_dir(cfg, study.name) / "results.json", results)
    if track:
        with tracking.tracked_run(cfg, f"{study.name}-evaluate", "evaluate", Path(cfg.out_dir) / "wandb",
                                  group=study.name) as run:
            if run is not None:
                run.log(flat_metrics(results))
    return results


def flat_metrics(results: dict) -> dict[str, float]:
    """<study>/<grid>/<metric>/<point>/<method> -> mean, for W&B (not-applicable and NaN left out)."""
    import math

    out = {}
    for r in results["rows"]:
        if r["applicable"] and r["mean"] is not None and math.isfinite(r["mean"]):
            where = "/".join(f"{k}={v}" for k, v in r["point"].items())
            out[f"{results['study']}/{r['grid']}/{r['metric']}/{where}/{r['method']}"] = r["mean"]
    return out
