"""Evaluate solvers on fixed GMM evaluation sets: timing, per-task metrics, JSON-ready results.

A *cell* is one (d, K, method). `evaluate_grid` returns

    {"cells": [{"d": 2, "K": 3, "method": "tgmm", "applicable": true, "reason": "", "n_tasks": 256,
                "seconds": 0.12, "l2": {"mean", "std", "ci95", "n"}, "accuracy": {...},
                "loglik": {...}}, ...]}

with NaN already replaced by None, so `json.dump(results, f, allow_nan=False)` writes valid JSON
(`write_results` does that). Evaluation sets are stored as .npz of plain arrays plus the meta
dict as JSON bytes, and are always loaded with allow_pickle=False.
"""
from __future__ import annotations

import json
import math
import os
import time
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.studies.metrics import clustering_accuracy, l2_error, log_likelihood, summarize
from pipeline.tasks.base import Solver
from pipeline.tasks.gmm import GMMBatch, GMMEstimate

METRICS = ("l2", "accuracy", "loglik")


# ----------------------------------------------------------------------------- running solvers

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _concat(parts: list[GMMEstimate]) -> GMMEstimate:
    if len(parts) == 1:
        return parts[0]
    not_app = [p for p in parts if not p.applicable]
    if not_app:  # a method is (not) applicable per (d, K), so one chunk decides for all
        return GMMEstimate.not_applicable(sum(p.weights.shape[0] for p in parts), parts[0].weights.shape[1],
                                          parts[0].means.shape[2], not_app[0].reason)
    scales = None
    if all(p.scales is not None for p in parts):
        scales = torch.cat([p.scales for p in parts])
    elif any(p.scales is not None for p in parts):
        raise ValueError("solver returned scales for some chunks but not others")
    return GMMEstimate(weights=torch.cat([p.weights for p in parts]), means=torch.cat([p.means for p in parts]),
                       scales=scales)


def run_solver(solver: Solver, batch: GMMBatch, chunk_size: int | None = None) -> tuple[GMMEstimate, float]:
    """Run `solver` on `batch` (in chunks of `chunk_size` tasks if given) under no_grad.

    Returns the estimate on CPU in float32 (extras dropped when chunked) and the wall seconds spent
    inside the solver calls (CUDA synchronised before and after each call).
    """
    device = batch.x.device
    step = batch.B if not chunk_size else int(chunk_size)
    parts, seconds = [], 0.0
    with torch.no_grad():
        for start in range(0, batch.B, step):
            chunk = batch.slice(start, min(batch.B, start + step))
            _sync(device)
            t0 = time.perf_counter()
            est = solver(chunk)
            _sync(device)
            seconds += time.perf_counter() - t0
            parts.append(est.detach_cpu())
    return _concat(parts), seconds


def _nan_per_task(B: int, K: int) -> dict[str, np.ndarray]:
    nan = np.full(B, np.nan)
    return {"l2": nan, "accuracy": nan.copy(), "loglik": nan.copy(), "perms": np.full((B, K), -1, dtype=np.int64)}


def evaluate_solver(solver: Solver, batch: GMMBatch, chunk_size: int | None = None,
                    return_per_task: bool = False) -> dict | tuple[dict, dict[str, np.ndarray]]:
    """Time `solver` on `batch` and score every task; returns the cell dict (floats may be NaN).

    With return_per_task=True returns (cell, per_task) where per_task holds the (B,) arrays "l2",
    "accuracy", "loglik" and the (B, K) matching "perms" (-1 where not scored), e.g. for np.savez.
    """
    est, seconds = run_solver(solver, batch, chunk_size)
    cpu = batch.to("cpu")
    if est.applicable:
        l2, perms = l2_error(est.weights, est.means, cpu.weights, cpu.means)
        per_task = {
            "l2": l2,
            "accuracy": clustering_accuracy(cpu.x, cpu.mask, cpu.labels, est.weights, est.means, est.scales),
            "loglik": log_likelihood(cpu.x, cpu.mask, est.weights, est.means, est.scales),
            "perms": perms,
        }
    else:
        per_task = _nan_per_task(batch.B, batch.K)
    cell = {
        "method": solver.name,
        "applicable": bool(est.applicable),
        "reason": "" if est.applicable else (est.reason or "not applicable"),
        "n_tasks": int(batch.B),
        "seconds": float(seconds),
        **{m: summarize(per_task[m]) for m in METRICS},
    }
    return (cell, per_task) if return_per_task else cell


# ----------------------------------------------------------------------------- the (d, K) grid

def json_ready(obj):
    """Replace NaN/inf floats by None and numpy scalars by Python ones, recursively."""
    if isinstance(obj, Mapping):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def evaluate_grid(solvers_for_d: Callable[[int], list[Solver]], eval_sets: Mapping[tuple[int, int], GMMBatch],
                  chunk_size: int | None = None, per_task_dir: str | Path | None = None,
                  progress: bool = True) -> dict:
    """Evaluate every solver on every (d, K) evaluation set; JSON-ready results (NaN -> None).

    `solvers_for_d(d)` is called once per dimension (a trained network is usually per d). Cells are
    ordered by (d, K), then by solver order. If `per_task_dir` is given, the per-task arrays of
    each cell are written there as `<method>_d<d>_K<K>.npz`.
    """
    keys = sorted(eval_sets)
    solvers = {d: list(solvers_for_d(d)) for d in sorted({d for d, _ in keys})}
    if per_task_dir is not None:
        per_task_dir = Path(per_task_dir)
        per_task_dir.mkdir(parents=True, exist_ok=True)
    cells = []
    with tqdm(total=sum(len(solvers[d]) for d, _ in keys), desc="evaluate", unit="cell",
              disable=not progress) as bar:
        for d, K in keys:
            batch = eval_sets[(d, K)]
            if (batch.d, batch.K) != (d, K):
                raise ValueError(f"eval set keyed (d={d}, K={K}) holds d={batch.d}, K={batch.K}")
            for solver in solvers[d]:
                bar.set_postfix_str(f"d={d} K={K} {solver.name}")
                cell, per_task = evaluate_solver(solver, batch, chunk_size, return_per_task=True)
                cells.append({"d": int(d), "K": int(K), **cell})
                if per_task_dir is not None:
                    np.savez_compressed(per_task_dir / f"{solver.name}_d{d}_K{K}.npz", **per_task)
                bar.update(1)
    return json_ready({"cells": cells})


def write_results(path: str | Path, results: dict) -> Path:
    """Write results as strict JSON (NaN -> null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_ready(results), indent=2, allow_nan=False) + "\n")
    return path


def load_results(path: str | Path, produced_by: str = "") -> dict:
    """A results.json; missing, a one-line FileNotFoundError naming the command that writes it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: results not found" + (f" (run `{produced_by}`)" if produced_by else ""))
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------- evaluation sets

_BATCH_KEYS = ("x", "mask", "weights", "means", "labels")


def save_eval_set(path: str | Path, batch: GMMBatch, meta: dict) -> Path:
    """Store `batch` (plain arrays) and `meta` (a JSON-serialisable dict, as UTF-8 bytes) in one .npz.

    Written to a temporary file and renamed, so an interrupted run never leaves a truncated set.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = batch.to_numpy()
    meta_bytes = np.frombuffer(json.dumps(meta, sort_keys=True).encode("utf-8"), dtype=np.uint8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:  # a file object, so numpy does not append ".npz" to the name
        np.savez_compressed(f, meta=meta_bytes, **arrays)
    os.replace(tmp, path)
    return path


def load_eval_set(path: str | Path) -> tuple[GMMBatch, dict]:
    """Inverse of `save_eval_set`; never unpickles. Raises FileNotFoundError or ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation set {path} does not exist (run the generate stage first)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}  # reading every member here surfaces object arrays
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"evaluation set {path} is corrupt or not a plain-array .npz: {e}") from e
    missing = [k for k in (*_BATCH_KEYS, "meta") if k not in arrays]
    if missing:
        raise ValueError(f"evaluation set {path} lacks arrays {missing}; has {sorted(arrays)}")
    try:
        meta = json.loads(arrays.pop("meta").tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"evaluation set {path} has an unreadable meta record: {e}") from e
    x, mask, w, m, y = (arrays[k] for k in _BATCH_KEYS)
    if x.ndim != 3 or m.ndim != 3:
        raise ValueError(f"evaluation set {path}: x and means must be 3-d, got {x.shape} and {m.shape}")
    B, N, d = x.shape
    K = m.shape[1]
    shapes_ok = (mask.shape == (B, N) and y.shape == (B, N) and w.shape == (B, K) and m.shape == (B, K, d)
                 and ("scales" not in arrays or arrays["scales"].shape == (B, K, d)))
    if not shapes_ok or mask.dtype != np.bool_:
        raise ValueError(f"evaluation set {path} has inconsistent arrays: "
                         + ", ".join(f"{k} {a.dtype}{a.shape}" for k, a in arrays.items()))
    return GMMBatch.from_numpy(arrays), meta
