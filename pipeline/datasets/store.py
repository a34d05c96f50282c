"""Materialise the datasets as plain-array files with a checksummed manifest, and load them back.

What: ``materialise(root)`` reads every selected dataset's shipped source files, checks them
(``readers``) and writes ``root/<name>.npz`` (``save_arrays``: ``x`` uint8 raw pixels (n, p),
``labels`` int64 (n,)) plus ``root/manifest.json``. ``load_dataset(name, root)`` verifies the
file's sha256 against the manifest and returns ``(X float32 (n, p) in [0, 1], labels int64 (n,))``.

Why:

* Small, exact files: the npz stores the raw integer pixels as uint8 (Fashion-MNIST t10k is ~4 MB
  compressed); scaling to [0, 1] happens at load time (digits / 16, MNIST-like / 255), so the
  file holds exactly what the source holds.
* All checks before any write: every selected source is read and validated first, then the files
  are written (each atomically), then the manifest (atomically). A bad source raises a one-line
  ``DataError`` and leaves every existing output, good or not, untouched.
* A missing source is not an error: it is recorded as ``status: "missing"`` with a one-line reason
  (which file, what to install) and reported by ``load_dataset`` as ``DatasetMissing``. A stale
  ``<name>.npz`` of a dataset that has become missing is left on disk but no longer loads.
* Idempotent: a dataset whose sources (paths and sha256) and output file are unchanged since the
  manifest was written is not rewritten, so a rerun leaves the files (bytes and mtimes, which DVC
  and make look at) as they are.

Manifest (``root/manifest.json``, a JSON object keyed by dataset name, in ``DATASETS`` order)::

    {"digits": {"status": "ok", "reason": null, "file": "digits.npz", "sha256": "...", "n": 1797,
                "p": 64, "max_pixel": 16, "licence": "...", "description": "...", "format": 1,
                "sources": [{"role": "csv", "path": ".../digits.csv.gz", "sha256": "..."}]},
     "fashion_mnist": {"status": "missing", "reason": "/usr/share/... not found; install it with `...`",
                       "file": null, "sha256": null, "n": null, "p": null, ...}}
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

from pipeline.core.arrays import DataError, MissingDataError, load_arrays, save_arrays
from pipeline.datasets.readers import N_CLASSES, read_source
from pipeline.datasets.registry import DATASETS, DatasetInfo, DatasetMissing

__all__ = ["DEFAULT_ROOT", "MANIFEST", "COMMAND", "materialise", "load_dataset", "read_manifest", "summary_line"]

DEFAULT_ROOT = Path("data/datasets")
MANIFEST = "manifest.json"
COMMAND = "python -m pipeline datasets"
FORMAT = 1  # bump when the npz layout or the manifest entry changes; forces a rewrite

SourceOverrides = Mapping[str, Mapping[str, "str | os.PathLike"]]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _unknown(name: object) -> DataError:
    return DataError(f"unknown dataset {name!r}; choose from: {', '.join(DATASETS)}")


# ----------------------------------------------------------------------------- manifest


def read_manifest(root: str | os.PathLike = DEFAULT_ROOT) -> dict:
    """``root/manifest.json`` as a dict; a missing, unreadable or malformed manifest is a one-line ``DataError``."""
    path = Path(root) / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise MissingDataError(f"dataset manifest {path}: does not exist; run `{COMMAND}`", path=path) from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"dataset manifest {path}: cannot be read ({' '.join(str(e).split())[:120]}); "
                        f"rerun `{COMMAND}`", path=path) from e
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"dataset manifest {path}: not valid JSON ({e.msg} at line {e.lineno}); "
                        f"rerun `{COMMAND}`", path=path) from e
    if not isinstance(manifest, dict):
        raise DataError(f"dataset manifest {path}: a JSON {type(manifest).__name__}, not an object; "
                        f"rerun `{COMMAND}`", path=path)
    return manifest


def _write_manifest(root: Path, manifest: dict) -> Path:
    """Temp file in ``root``, fsync, ``os.replace``: a reader sees the old manifest or the new one."""
    path = root / MANIFEST
    data = (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    tmp = root / f".{MANIFEST}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


# ----------------------------------------------------------------------------- materialise


def _select(names: Iterable[str] | str | None) -> list[str]:
    if names is None:
        return list(DATASETS)
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        if n not in DATASETS:
            raise _unknown(n)
    return [n for n in DATASETS if n in names]  # registry order, no duplicates


def _source_paths(info: DatasetInfo, overrides: SourceOverrides) -> dict[str, Path]:
    over = dict(overrides.get(info.name, {}))
    extra = set(over) - set(info.sources)
    if extra:
        raise ValueError(f"sources[{info.name!r}]: unknown roles {sorted(extra)} (has {sorted(info.sources)})")
    return {role: Path(over.get(role, default)) for role, default in info.sources.items()}


def _read_raw(info: DatasetInfo, paths: Mapping[str, Path]) -> tuple[dict[str, bytes], Path | None]:
    """(role -> raw bytes, None), or ({}, the first absent source file)."""
    for path in paths.values():
        if not path.exists():
            return {}, path
    raw = {}
    for role, path in paths.items():
        try:
            raw[role] = path.read_bytes()
        except IsADirectoryError as e:
            raise DataError(f"{info.name} source {path}: is a directory, not a file; "
                            f"reinstall {info.package} (`{info.reinstall}`)", path=path) from e
        except OSError as e:
            raise DataError(f"{info.name} source {path}: cannot be read ({' '.join(str(e).split())[:120]})",
                            path=path) from e
    return raw, None


def _base_entry(info: DatasetInfo) -> dict:
    return {"status": None, "reason": None, "file": None, "sha256": None, "n": None, "p": None,
            "max_pixel": info.max_pixel, "licence": info.licence, "description": info.shape, "format": FORMAT}


def _unchanged(old: object, sources: list[dict], root: Path) -> bool:
    """Whether the existing output of a dataset already matches these sources (so it is kept as is)."""
    if not (isinstance(old, dict) and old.get("status") == "ok" and old.get("format") == FORMAT
            and old.get("sources") == sources and isinstance(old.get("file"), str)
            and Path(old["file"]).name == old["file"]):
        return False
    try:
        return _sha256((root / old["file"]).read_bytes()) == old.get("sha256")
    except OSError:
        return False


def materialise(root: str | os.PathLike = DEFAULT_ROOT, names: Iterable[str] | str | None = None, *,
                sources: SourceOverrides | None = None, log: Callable[[str], None] | None = print) -> dict:
    """Write ``root/<name>.npz`` for each selected dataset whose sources are present, and ``root/manifest.json``.

    ``names``: dataset names (default: all of ``DATASETS``). ``sources``: per-dataset overrides of
    the source paths, ``{name: {role: path}}`` (roles as in ``DATASETS[name].sources``), e.g. to
    point a test at a small fake file. ``log``: receives one line per skipped (missing) dataset;
    None for silence. Entries of datasets not selected are kept from an existing valid manifest.

    Returns the manifest as written. Raises a one-line ``DataError`` (before writing anything at
    all) if a present source is damaged; ``DataError`` for an unknown name.
    """
    root = Path(root)
    selected = _select(names)
    overrides = sources or {}
    for n in overrides:
        if n not in DATASETS:
            raise _unknown(n)

    # Phase 1: read and check every source; nothing is written yet.
    entries: dict[str, dict] = {}
    ready: dict[str, tuple[list[dict], np.ndarray, np.ndarray]] = {}
    for name in selected:
        info = DATASETS[name]
        paths = _source_paths(info, overrides)
        raw, absent = _read_raw(info, paths)
        entry = _base_entry(info)
        srcs = [{"role": role, "path": str(path), "sha256": _sha256(raw[role]) if role in raw else None}
                for role, path in paths.items()]
        entry["sources"] = srcs
        if absent is not None:
            entry.update(status="missing", reason=f"{absent} not found; install it with {info.remedy}")
            entries[name] = entry
            if log is not None:
                log(f"[datasets] {name}: skipped: {entry['reason']}")
            continue
        x, y = read_source(info, paths, raw)  # (n, p) uint8, (n,) int64; raises DataError
        entries[name] = entry
        ready[name] = (srcs, x, y)

    # Phase 2: write the files (each atomically), then the manifest.
    root.mkdir(parents=True, exist_ok=True)
    try:
        old = read_manifest(root)
    except DataError:
        old = {}  # absent or unreadable: it is rewritten below
    manifest = {n: old[n] for n in DATASETS if n not in selected and isinstance(old.get(n), dict)}
    for name in selected:
        entry = entries[name]
        if name in ready:
            info = DATASETS[name]
            srcs, x, y = ready[name]
            if _unchanged(old.get(name), srcs, root):
                entry = {**old[name], "licence": info.licence, "description": info.shape}
            else:
                file = f"{name}.npz"
                meta = {"dataset": name, "format": FORMAT, "max_pixel": info.max_pixel, "licence": info.licence,
                        "description": info.shape, "sources": srcs,
                        "stored": "x: uint8 raw pixels (n, p); labels: int64 (n,); "
                                  "load_dataset scales x by 1/max_pixel"}
                path = save_arrays(root / file, {"x": x, "labels": y}, meta)
                entry.update(status="ok", file=file, sha256=_sha256(path.read_bytes()),
                             n=int(x.shape[0]), p=int(x.shape[1]))
        manifest[name] = entry
    manifest = {n: manifest[n] for n in DATASETS if n in manifest}
    _write_manifest(root, manifest)
    return manifest


def summary_line(name: str, entry: Mapping) -> str:
    """One line for the CLI: name, status, n x p, sha256 prefix (or the reason it is missing)."""
    if entry.get("status") == "ok":
        return (f"{name:<14} ok       {entry['n']:>6} x {entry['p']:<4} "
                f"sha256 {str(entry['sha256'])[:12]}  {entry['file']}")
    return f"{name:<14} {entry.get('status')!s:<8} {'-':>6} x {'-':<4} {entry.get('reason')}"


# ----------------------------------------------------------------------------- load


def load_dataset(name: str, root: str | os.PathLike = DEFAULT_ROOT) -> tuple[np.ndarray, np.ndarray]:
    """``(X float32 (n, p) pixels scaled to [0, 1], labels int64 (n,))`` of a materialised dataset.

    The file's sha256 must match the manifest. Raises ``DatasetMissing`` if the manifest records
    the dataset as missing (its source is not installed), and a one-line ``DataError`` for an
    unknown name, a missing/invalid manifest, a missing, altered or malformed file.
    """
    if name not in DATASETS:
        raise _unknown(name)
    info = DATASETS[name]
    root = Path(root)
    manifest = read_manifest(root)
    mpath = root / MANIFEST
    entry = manifest.get(name)
    if not isinstance(entry, dict):
        raise DataError(f"dataset manifest {mpath}: no entry for {name}; rerun `{COMMAND}`", path=mpath)
    status = entry.get("status")
    if status == "missing":
        raise DatasetMissing(f"dataset {name}: {entry.get('reason') or 'source not found'}", name=name, path=mpath)
    file, want = entry.get("file"), entry.get("sha256")
    if status != "ok" or not isinstance(file, str) or Path(file).name != file or not isinstance(want, str):
        raise DataError(f"dataset manifest {mpath}: malformed entry for {name} (status {status!r}, file {file!r}); "
                        f"rerun `{COMMAND}`", path=mpath)
    path = root / file
    try:
        got = _sha256(path.read_bytes())
    except FileNotFoundError as e:
        raise MissingDataError(f"dataset {name} {path}: does not exist; rerun `{COMMAND}`", path=path) from e
    except OSError as e:
        raise DataError(f"dataset {name} {path}: cannot be read ({' '.join(str(e).split())[:120]}); "
                        f"rerun `{COMMAND}`", path=path) from e
    if got != want:
        raise DataError(f"dataset {name} {path}: checksum mismatch (manifest {want[:12]}, file {got[:12]}); "
                        f"rerun `{COMMAND}`", path=path)
    arrays, meta = load_arrays(path, ("x", "labels"), what=f"dataset {name}", produced_by=COMMAND)
    x, y = arrays["x"], arrays["labels"]  # (n, p) uint8, (n,) int64

    def bad(problem: str) -> DataError:
        return DataError(f"dataset {name} {path}: {problem}; rerun `{COMMAND}`", path=path)

    if meta.get("dataset") != name or meta.get("max_pixel") != info.max_pixel:
        raise bad(f"meta says dataset {meta.get('dataset')!r} with max_pixel {meta.get('max_pixel')!r}, "
                  f"expected {name!r} with {info.max_pixel}")
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape != (entry.get("n"), entry.get("p")):
        raise bad(f"x is {x.dtype}{list(x.shape)}, the manifest says uint8[{entry.get('n')}, {entry.get('p')}]")
    if y.dtype != np.int64 or y.shape != (x.shape[0],):
        raise bad(f"labels are {y.dtype}{list(y.shape)}, expected int64[{x.shape[0]}]")
    if x.size and int(x.max()) > info.max_pixel:
        raise bad(f"pixel values up to {int(x.max())}, expected 0..{info.max_pixel}")
    if y.size and (int(y.min()) < 0 or int(y.max()) >= N_CLASSES):
        raise bad(f"labels in {int(y.min())}..{int(y.max())}, expected 0..{N_CLASSES - 1}")
    return x.astype(np.float32) / np.float32(info.max_pixel), y
