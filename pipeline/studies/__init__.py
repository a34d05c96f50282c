"""Study declarations: one module per study, each defining STUDY (core/study.py).

Register a study by listing its module here; params.yaml `studies` picks which ones run.
"""
from __future__ import annotations

import importlib

STUDY_MODULES = {
    "tgmm": "pipeline.studies.tgmm",
    "robustness": "pipeline.studies.robustness",
    "ablation": "pipeline.studies.ablation",
    "linreg": "pipeline.studies.linreg",
    "second_order": "pipeline.studies.second_order",
    "logreg": "pipeline.studies.logreg",
    "pca": "pipeline.studies.pca",
    "clustering": "pipeline.studies.clustering",
    "mixreg": "pipeline.studies.mixreg",
}

_CACHE: dict = {}


def names() -> list[str]:
    return list(STUDY_MODULES)


def get(name: str):
    if name not in STUDY_MODULES:
        raise KeyError(f"unknown study {name!r} (registered: {', '.join(STUDY_MODULES)})")
    if name not in _CACHE:
        _CACHE[name] = importlib.import_module(STUDY_MODULES[name]).STUDY
    return _CACHE[name]
