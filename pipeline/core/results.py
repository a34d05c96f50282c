"""The one long-format results schema every study writes, and the summary of per-task values.

results.json = {"study", "family", "title", "rows": [row, ...], "meta": {...}} with one row per
(grid, point, method, metric[, axis value]):

    {"grid": "main", "point": {"d": 2, "K": 3}, "method": "tgmm", "network": "tgmm-d2" | null,
     "metric": "l2", "mean", "ci95" (95 % Student-t half-width), "median", "std", "n" (tasks scored),
     "seconds" (solver wall time at this point), "applicable": bool, "reason": ""}

NaN is stored as null, so the file is strict JSON.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from torch import Tensor

ROW_KEYS = ("grid", "point", "method", "network", "metric", "mean", "ci95", "median", "std", "n", "seconds",
            "applicable", "reason")


def _np(a) -> np.ndarray:
    if isinstance(a, Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def summarize(values: ArrayLike) -> dict:
    """Mean over tasks with a 95 % Student-t confidence half-width; NaN entries are dropped.

    Returns {"mean", "std" (ddof=1), "ci95" (half-width), "median", "n" (tasks scored)}. With n = 0
    all are NaN; with n = 1 std and ci95 are NaN (undefined). The median is there because a few
    blow-ups (e.g. the spectral method on near-collinear means) can dominate a mean.
    """
    v = _np(values).astype(np.float64).ravel()
    v = v[~np.isnan(v)]
    n = int(v.size)
    nan = float("nan")
    if n == 0:
        return {"mean": nan, "std": nan, "ci95": nan, "median": nan, "n": 0}
    mean = float(v.mean())
    if n == 1:
        return {"mean": mean, "std": nan, "ci95": nan, "median": mean, "n": 1}
    std = float(v.std(ddof=1))
    from scipy.special import stdtrit  # = scipy.stats.t.ppf, without scipy.stats' 1.1-1.5 s import

    ci95 = float(stdtrit(n - 1, 0.975) * std / math.sqrt(n))
    return {"mean": mean, "std": std, "ci95": ci95, "median": float(np.median(v)), "n": n}


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


def write_results(path: str | Path, results: dict) -> Path:
    """Write results as strict JSON (NaN -> null), atomically."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(json_ready(results), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def load_results(path: str | Path, produced_by: str = "") -> dict:
    """A results.json; missing or unreadable: a one-line error naming the command that writes it."""
    from pipeline.core.config import ConfigError

    path = Path(path)
    hint = f" (run `{produced_by}`)" if produced_by else ""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: results not found{hint}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid results JSON ({type(e).__name__}){hint}") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ConfigError(f"{path}: not a results file of this pipeline (no rows){hint}")
    return data


def num(v) -> float:
    return float("nan") if v is None else float(v)
