"""Plain-array data files: one ``.npz`` of numeric/bool/str arrays plus a JSON ``meta`` record.

What: ``save_arrays`` writes named arrays (NumPy arrays or torch tensors) and a JSON-serialisable
``meta`` mapping into one compressed ``.npz``; ``load_arrays`` reads it back as
``(dict[str, np.ndarray], dict)``. ``meta`` is stored as UTF-8 JSON bytes (a ``uint8`` array) under
the reserved member name ``"meta"``.

Why:

* No pickle anywhere. Object arrays are refused when writing and never unpickled when reading
  (``allow_pickle=False``): loading a data file must not be able to run code. A file that would
  need pickle is reported as a bad file to regenerate, never as something to load "unsafely".
* Atomic writes. The archive is written to a temporary file in the destination directory, flushed
  to disk and then ``os.replace``-d over the destination, so an interrupted or failed write never
  leaves a truncated file and never damages an existing one. All validation happens before
  anything touches the disk.
* One-line errors. Every way a file can be bad (missing, empty, not a zip, truncated, corrupt
  member, pickled member, foreign zip, missing arrays, bad meta) becomes a ``DataError`` whose
  message is a single line naming the file, what is wrong with it and what to do about it
  (e.g. "rerun `dvc repro generate`"). A missing file raises ``MissingDataError``, which is
  both a ``DataError`` and a ``FileNotFoundError``.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DataError", "MissingDataError", "META_KEY", "save_arrays", "load_arrays"]

META_KEY = "meta"

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header; an empty archive's end record
_NPY_MAGIC = b"\x93NUMPY"
_PICKLE_MAGIC = b"\x80"  # pickle protocol 2+ (what np.save of a bare object array writes)
# savez_compressed's own named parameters ("file"; "allow_pickle" in NumPy >= 2.1) cannot be array names.
_SAVEZ_PARAMS = frozenset(
    name for name, p in inspect.signature(np.savez_compressed).parameters.items()
    if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
)
_MAX_REASON = 160


class DataError(ValueError):
    """A data file that cannot be used as it is; ``str(e)`` is one line: file, problem, remedy.

    ``path`` (keyword-only, may be None) is kept as an attribute; the message is the only
    positional argument, so the exception pickles (multiprocessing, Ray) without losing it.
    """

    def __init__(self, message: str, *, path: str | os.PathLike | None = None):
        super().__init__(message)
        self.path = None if path is None else Path(path)


class MissingDataError(DataError, FileNotFoundError):
    """The data file does not exist; catchable as ``DataError`` or ``FileNotFoundError``."""


# ----------------------------------------------------------------------------- writing


def _to_numpy(name: str, value: Any) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu") and hasattr(value, "numpy"):  # a torch.Tensor
        try:
            value = value.detach().cpu().numpy()
        except (TypeError, RuntimeError) as e:  # e.g. bfloat16 has no NumPy dtype
            raise TypeError(f"array {name!r}: cannot convert {type(value).__name__} "
                            f"of dtype {getattr(value, 'dtype', '?')} to NumPy: {_one_line(e)}") from e
    arr = np.asarray(value)
    if arr.dtype.hasobject:
        raise TypeError(f"array {name!r} has dtype {arr.dtype}, which holds Python objects and would need "
                        "pickle; store plain numeric, bool or string arrays only")
    return arr


def save_arrays(path: str | os.PathLike, arrays: Mapping[str, Any], meta: Mapping) -> Path:
    """Write ``arrays`` and ``meta`` to ``path`` as one compressed ``.npz``, atomically.

    ``arrays``: name -> ``np.ndarray`` or ``torch.Tensor`` (detached and moved to the CPU); object
    dtypes are refused, as is the reserved name ``"meta"``. ``meta``: a mapping that ``json.dumps``
    can serialise (tuples come back as lists, non-string keys as strings; NumPy scalars are
    refused — convert them with ``.item()``). The parent directory is created if needed; the file
    name is used exactly as given (no ".npz" is appended). Returns ``Path(path)``.

    Raises ``TypeError``/``ValueError`` before anything is written if an input is invalid; if the
    write itself fails, the temporary file is removed and any existing ``path`` is left untouched.
    """
    path = Path(path)
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a mapping (stored as a JSON object), got {type(meta).__name__}")
    plain: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"array names must be non-empty strings, got {name!r}")
        if name == META_KEY:
            raise ValueError(f"array name {META_KEY!r} is reserved for the meta record; rename the array")
        if name in _SAVEZ_PARAMS:
            raise ValueError(f"array name {name!r} clashes with a parameter of np.savez_compressed; rename the array")
        plain[name] = _to_numpy(name, value)
    try:
        data = json.dumps(dict(meta), sort_keys=True, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as e:  # unserialisable value, circular reference, unsortable keys, lone surrogate
        raise TypeError(f"meta is not JSON-serialisable: {_one_line(e)}") from e
    meta_bytes = np.frombuffer(data, dtype=np.uint8)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        # os.open with 0o666 so the umask applies as for any new file (mkstemp would give 0o600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as f:  # a file object, so numpy does not append ".npz" to the name
            np.savez_compressed(f, **{META_KEY: meta_bytes}, **plain)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # also KeyboardInterrupt: never leave the temporary file behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (POSIX); best effort, a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- reading


def _one_line(e: BaseException | str, limit: int = _MAX_REASON) -> str:
    """A short single-line reason; never echoes advice to load with pickle."""
    text = " ".join(str(e).split()) or type(e).__name__
    if "pickle" in text.lower() or "unsafe" in text.lower():
        text = "it holds pickled Python objects, which are never loaded"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shown(path: Path) -> str:
    s = str(path)
    return repr(s) if any(c in s for c in "\n\r") else s


def _member_header(z: Any, key: str) -> tuple[tuple[int, ...], np.dtype, int] | None:
    """(shape, dtype, member size in bytes) from the .npy header of member ``key`` of the open NpzFile.

    Reads only the header (public ``np.lib.format`` readers); None if it cannot be read. Used to
    explain a failure, never to load data.
    """
    try:
        name = key + ".npy"
        with z.zip.open(name) as fp:
            version = np.lib.format.read_magic(fp)
            reader = {(1, 0): np.lib.format.read_array_header_1_0,
                      (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if reader is None:
                return None
            shape, _fortran, dtype = reader(fp)
            return tuple(shape), np.dtype(dtype), z.zip.getinfo(name).file_size
    except Exception:  # noqa: BLE001 - only a diagnosis; the caller reports the original failure
        return None


def _diagnose(z: Any, key: str, e: BaseException) -> str | None:
    """A specific problem for a member that failed to load, or None to report it as generic corruption."""
    header = _member_header(z, key)
    if header is None:
        return None
    shape, dtype, size = header
    if dtype.hasobject:
        return f"array {key!r} holds Python objects (pickled), which are never loaded"
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if isinstance(e, MemoryError) and declared > size:
        return (f"not a valid .npz archive (corrupt header of array {key!r}: it declares shape {shape}, "
                f"{declared} bytes, but the member holds {size})")
    return None


def load_arrays(path: str | os.PathLike, required: Sequence[str] = (), *, what: str = "data file",
                produced_by: str = "") -> tuple[dict[str, np.ndarray], dict]:
    """Read a file written by ``save_arrays``: ``(arrays without "meta", meta dict)``.

    Never unpickles (``allow_pickle=False``) and reads every member eagerly, so all damage shows
    here. ``required`` names arrays that must be present. ``what`` names the kind of file in
    messages ("evaluation set"), ``produced_by`` the command that recreates it ("dvc repro
    generate"). Every failure raises ``DataError`` with a one-line message (``MissingDataError``,
    also a ``FileNotFoundError``, when the file does not exist). ``MemoryError`` is not converted.
    """
    path = Path(path)
    remedy = f"rerun `{produced_by}`" if produced_by else "recreate it (delete it and rerun the step that writes it)"

    label = f"{what} {_shown(path)}" if what else _shown(path)

    def fail(problem: str, cls: type[DataError] = DataError) -> DataError:
        return cls(f"{label}: {problem}; {remedy}", path=path)

    try:
        f = open(path, "rb")
    except FileNotFoundError as e:
        raise fail("does not exist", MissingDataError) from e
    except IsADirectoryError as e:
        raise fail("is a directory, not a .npz file") from e
    except OSError as e:
        raise fail(f"cannot be opened ({_one_line(e)})") from e

    arrays: dict[str, np.ndarray] = {}
    with f:
        try:
            head = f.read(len(_NPY_MAGIC))
            f.seek(0)
        except OSError as e:
            raise fail(f"cannot be read ({_one_line(e)})") from e
        if not head:
            raise fail("is empty (0 bytes; an interrupted or failed write?)")
        if not head.startswith(_ZIP_MAGIC):
            if len(head) < len(_ZIP_MAGIC[0]) and any(m.startswith(head) for m in _ZIP_MAGIC):
                raise fail(f"not a valid .npz archive (truncated: only {len(head)} bytes)")
            if head.startswith(_NPY_MAGIC):
                kind = "a single .npy array"
            elif head.startswith(_PICKLE_MAGIC):
                kind = "pickled Python data, which is never loaded"
            else:
                kind = f"unrecognised content starting with {head[:4]!r}"
            raise fail(f"not a .npz archive ({kind})")
        key = None
        try:
            with np.load(f, allow_pickle=False) as z:
                for key in z.files:  # read each member now: surfaces truncation, bad CRCs, object arrays
                    try:
                        value = z[key]
                    except (ValueError, MemoryError) as e:  # diagnosed while the archive is still open
                        problem = _diagnose(z, key, e)
                        if problem is not None:
                            raise fail(problem) from e
                        raise
                    if not isinstance(value, np.ndarray):  # NpzFile returns raw bytes for non-.npy members
                        raise fail(f"not a .npz of arrays (member {key!r} is not a .npy array)")
                    arrays[key] = value
        except (DataError, MemoryError):  # MemoryError: a genuinely large file, not a corrupt one
            raise
        except Exception as e:  # noqa: BLE001 - BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, ...
            raise fail(_corrupt(e, key)) from e

    if META_KEY not in arrays:
        raise fail(f"has no {META_KEY!r} record (not written by save_arrays; has {sorted(arrays)})")
    meta_arr = arrays.pop(META_KEY)
    missing = [k for k in required if k != META_KEY and k not in arrays]
    if missing:
        raise fail(f"lacks required arrays {missing} (has {sorted(arrays)})")
    if meta_arr.dtype != np.uint8 or meta_arr.ndim != 1:
        raise fail(f"{META_KEY!r} record is {meta_arr.dtype}{list(meta_arr.shape)}, not UTF-8 JSON bytes")
    try:
        meta = json.loads(meta_arr.tobytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise fail(f"{META_KEY!r} record is not valid UTF-8 ({_one_line(e)})") from e
    except json.JSONDecodeError as e:
        raise fail(f"{META_KEY!r} record is not valid JSON ({_one_line(e)})") from e
    if not isinstance(meta, dict):
        raise fail(f"{META_KEY!r} record is a JSON {type(meta).__name__}, not an object")
    return arrays, meta


def _corrupt(e: BaseException, key: str | None) -> str:
    where = f" in array {key!r}" if key is not None else ""
    return f"not a valid .npz archive (truncated or corrupt{where}: {type(e).__name__}: {_one_line(e)})"
