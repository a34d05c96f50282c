"""What identifies a trained network: its run's identity (resolved params, minus the keys that
cannot change it) plus the code it depends on — the training spine, the backbones and its own
family. Editing another family, a study, the evaluation or the report changes none of these, so
it neither retrains nor invalidates the network.
"""
from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

from pipeline.core.config import RunConfig

PACKAGE = Path(__file__).resolve().parents[1]
# The spine files a training run executes (evaluation, reporting, tuning are not among them).
SPINE = ("core/config.py", "core/family.py", "core/rng.py", "core/network.py", "core/module.py", "core/train.py",
         "core/batch.py", "core/matching.py")


def code_files(family: str) -> list[Path]:
    from pipeline.core import family as F

    files = [PACKAGE / f for f in SPINE]
    files += sorted((PACKAGE / "models").rglob("*.py"))
    for name in F.family_names_with_uses(family):  # its own folder and the families it imports
        files += sorted(F.module_dir(name).rglob("*.py"))
    return files


@lru_cache(maxsize=None)
def _hash_files(paths: tuple[Path, ...], stamps: tuple[tuple[int, int], ...]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.relative_to(PACKAGE).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def code_fingerprint(family: str) -> str:
    """Hash of the code a run of `family` depends on (cached while the files are unchanged)."""
    paths = tuple(code_files(family))
    stamps = tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in paths)
    return _hash_files(paths, stamps)


def fingerprint(run: RunConfig) -> str:
    """e.g. 'gmm-3f2a9c01b7de': a checkpoint or trained network belongs to a run iff this matches."""
    part = {"run": run.identity(), "code": code_fingerprint(run.family)}
    return f"{run.family}-" + hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:12]
