"""pipeline.core.arrays: round trip, atomic writes, and one-line DataErrors for every bad file."""
from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core import arrays as A
from pipeline.core.arrays import DataError, MissingDataError, load_arrays, save_arrays

PRODUCED_BY = "python -m pipeline generate"
WHAT = "evaluation set"


def sample_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x": rng.normal(size=(4, 16, 3)),
        "x32": rng.normal(size=(4, 16, 3)).astype(np.float32),
        "mask": rng.random((4, 16)) > 0.3,
        "labels": rng.integers(0, 3, size=(4, 16)),
        "small": rng.integers(-100, 100, size=7).astype(np.int8),
        "bytes": rng.integers(0, 256, size=5).astype(np.uint8),
        "names": np.array(["alpha", "beta", "γ"]),
        "scalar": np.array(2.5),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "fortran": np.asfortranarray(rng.normal(size=(3, 5))),
    }


META = {"study": "tgmm", "d": 2, "K": [2, 3], "sigma": 0.5, "note": "naïve ✓", "nested": {"ok": True, "none": None}}


def good_file(tmp_path: Path, name: str = "set.npz") -> Path:
    return save_arrays(tmp_path / name, sample_arrays(), META)


def load_bad(path: Path, **kw) -> DataError:
    """Load `path`, which must fail with a clean one-line DataError; return it."""
    with pytest.raises(DataError) as info:
        load_arrays(path, what=WHAT, produced_by=PRODUCED_BY, **kw)
    msg = str(info.value)
    assert "\n" not in msg and "\r" not in msg, msg
    assert str(path) in msg, msg
    assert WHAT in msg and f"rerun `{PRODUCED_BY}`" in msg, msg
    low = msg.lower()
    assert "allow_pickle" not in low and "unsafe" not in low and "pickle.load" not in low, msg
    assert info.value.path == path
    return info.value


def write_zip(path: Path, members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def raw_npy(header: bytes, payload: bytes = b"\0" * 24) -> bytes:
    """A version 1.0 .npy with a hand-written (possibly bad) header."""
    pad = (64 - (10 + len(header) + 1) % 64) % 64
    h = header + b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h + payload


def meta_npy(text: bytes) -> bytes:
    return npy_bytes(np.frombuffer(text, dtype=np.uint8))


# ----------------------------------------------------------------------------- round trip


def test_round_trip_numpy(tmp_path):
    src = sample_arrays()
    path = save_arrays(tmp_path / "sub" / "dir" / "set.npz", src, META)
    assert path == tmp_path / "sub" / "dir" / "set.npz" and path.is_file()
    arrays, meta = load_arrays(path, required=("x", "mask"))
    assert meta == META
    assert set(arrays) == set(src)
    for k, a in src.items():
        b = arrays[k]
        assert b.dtype == a.dtype and b.shape == a.shape, k
        np.testing.assert_array_equal(b, a)
    assert arrays["mask"].dtype == np.bool_
    assert isinstance(meta, dict)


def test_round_trip_torch_and_exact_name(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=g, requires_grad=True)
    mask = torch.rand(3, 4, generator=g) > 0.5
    path = save_arrays(tmp_path / "set.data", {"x": x, "mask": mask, "y": torch.arange(5)}, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set.data"]  # no ".npz" appended, no temp left
    arrays, meta = load_arrays(path)
    assert meta == {}
    assert arrays["x"].dtype == np.float32 and arrays["mask"].dtype == np.bool_ and arrays["y"].dtype == np.int64
    np.testing.assert_array_equal(arrays["x"], x.detach().numpy())
    np.testing.assert_array_equal(arrays["mask"], mask.numpy())


def test_overwrite_replaces_and_mode_follows_umask(tmp_path):
    path = good_file(tmp_path)
    save_arrays(path, {"z": np.arange(3)}, {"v": 2})
    arrays, meta = load_arrays(path)
    assert list(arrays) == ["z"] and meta == {"v": 2}
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert (path.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777)  # not mkstemp's 0o600


def test_meta_is_stored_as_utf8_json_under_reserved_key(tmp_path):
    path = good_file(tmp_path)
    with np.load(path, allow_pickle=False) as z:
        assert "meta" in z.files
        m = z["meta"]
    assert m.dtype == np.uint8
    assert json.loads(m.tobytes().decode("utf-8")) == META


def test_loads_never_allow_pickle(tmp_path, monkeypatch):
    path = good_file(tmp_path)
    seen = []
    real = np.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("allow_pickle"))
        return real(*args, **kwargs)

    monkeypatch.setattr(A.np, "load", spy)
    load_arrays(path)
    assert seen == [False]


# ----------------------------------------------------------------------------- writing: rejection and atomicity


class _Unserialisable:
    pass


@pytest.mark.parametrize("arrays, meta, exc", [
    ({"meta": np.arange(3)}, {}, ValueError),                              # reserved name
    ({"file": np.arange(3)}, {}, ValueError),                              # clashes with savez's parameter
    ({"": np.arange(3)}, {}, TypeError),
    ({"x": np.array([{"a": 1}, None], dtype=object)}, {}, TypeError),     # object array
    ({"x": np.zeros(2, dtype=[("a", "f8"), ("b", "O")])}, {}, TypeError),  # object inside a structured dtype
    ({"x": np.arange(3)}, {"bad": _Unserialisable()}, TypeError),
    ({"x": np.arange(3)}, {"n": np.int64(3)}, TypeError),                 # NumPy scalar: use .item()
    ({"x": np.arange(3)}, {"s": {1, 2}}, TypeError),
    ({"x": np.arange(3)}, ["not", "a", "mapping"], TypeError),
])
def test_rejected_write_leaves_existing_file_untouched(tmp_path, arrays, meta, exc):
    path = good_file(tmp_path)
    before = path.read_bytes()
    with pytest.raises(exc):
        save_arrays(path, arrays, meta)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file behind
    load_arrays(path)


def test_circular_meta_rejected(tmp_path):
    meta: dict = {}
    meta["self"] = meta
    with pytest.raises(TypeError, match="JSON"):
        save_arrays(tmp_path / "set.npz", {"x": np.arange(2)}, meta)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_write_interrupted_midway_is_atomic(tmp_path, monkeypatch, error):
    path = good_file(tmp_path)
    before = path.read_bytes()

    def half_write(f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial archive")
        raise error

    monkeypatch.setattr(A.np, "savez_compressed", half_write)
    with pytest.raises(type(error)):
        save_arrays(path, {"x": np.arange(1000)}, {"v": 1})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_failed_replace_onto_directory_cleans_up(tmp_path):
    target = tmp_path / "set.npz"
    target.mkdir()
    with pytest.raises(OSError):
        save_arrays(target, {"x": np.arange(3)}, {})
    assert [p.name for p in tmp_path.iterdir()] == ["set.npz"] and target.is_dir()


# ----------------------------------------------------------------------------- reading bad files


def test_missing_file(tmp_path):
    path = tmp_path / "nope.npz"
    err = load_bad(path)
    assert isinstance(err, MissingDataError) and isinstance(err, FileNotFoundError) and isinstance(err, ValueError)
    assert "does not exist" in str(err)
    with pytest.raises(FileNotFoundError):
        load_arrays(path)


def test_directory(tmp_path):
    (tmp_path / "d.npz").mkdir()
    assert "directory" in str(load_bad(tmp_path / "d.npz"))


def test_empty_file(tmp_path):
    path = tmp_path / "set.npz"
    path.write_bytes(b"")
    assert "empty" in str(load_bad(path))


@pytest.mark.parametrize("content", [b"garbage", b"x", b"PK", b"\x93NUMPY", b"\x00" * 100,
                                     pickle.dumps({"x": [1, 2]}), b"<html>not found</html>"])
def test_garbage_bytes(tmp_path, content):
    path = tmp_path / "set.npz"
    path.write_bytes(content)
    assert "npz" in str(load_bad(path))


def test_single_npy_file(tmp_path):
    path = tmp_path / "set.npz"
    with path.open("wb") as f:
        np.save(f, np.arange(4))
    assert ".npy" in str(load_bad(path))


@pytest.mark.parametrize("fraction", [0.0005, 0.1, 0.5, 0.9, -1, -21, -22])
def test_truncated_archive(tmp_path, fraction):
    data = good_file(tmp_path).read_bytes()
    cut = len(data) + fraction if fraction < 0 else max(1, int(len(data) * fraction))
    path = tmp_path / "cut.npz"
    path.write_bytes(data[:cut])
    msg = str(load_bad(path))
    assert "truncated or corrupt" in msg or "truncated:" in msg


def _member_data_offset(path: Path, member: str) -> tuple[int, int]:
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    raw = path.read_bytes()
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len, info.compress_size


@pytest.mark.parametrize("where", [0.5, 0.95])
def test_flipped_byte_in_member_data(tmp_path, where):
    path = good_file(tmp_path)
    start, size = _member_data_offset(path, "x.npy")
    data = bytearray(path.read_bytes())
    data[start + int(size * where)] ^= 0xFF
    path.write_bytes(bytes(data))
    msg = str(load_bad(path))
    assert "corrupt in array 'x'" in msg


def test_object_array_member(tmp_path):
    path = tmp_path / "set.npz"
    np.savez(path, meta=np.frombuffer(b"{}", np.uint8), x=np.array([{"a": 1}, [2, 3]], dtype=object))
    msg = str(load_bad(path))
    assert "'x'" in msg and "objects" in msg


def test_object_array_only_member(tmp_path):
    path = tmp_path / "set.npz"
    np.savez(path, np.array([None, 1], dtype=object))
    assert "'arr_0'" in str(load_bad(path))


def test_zip_that_is_not_an_npz(tmp_path):
    path = write_zip(tmp_path / "set.npz", {"readme.txt": b"hello", "meta.npy": meta_npy(b"{}")})
    assert "'readme.txt'" in str(load_bad(path))


def test_empty_zip(tmp_path):
    path = write_zip(tmp_path / "set.npz", {})
    assert "no 'meta' record" in str(load_bad(path))


@pytest.mark.parametrize("header", [
    b"{'descr': '<f8', 'fortran_order': False, 'shape': (3,",              # tokenize.TokenError, not ValueError
    b"{'descr': 'zz', 'fortran_order': False, 'shape': (3,), }",
    b"{'descr': '<f8', 'fortran_order': False, 'shape': (-1,), }",
    b"{'descr': '<f8', 'fortran_order': False, 'shape': (10**3,), }",
    b"{'descr': '<f8', 'fortran_order': False, 'shape': (100000,), }",     # more data declared than present
    b"{'descr': '<f8', 'fortran_order': False, 'shape': (1000000000000000,), }",  # would be a MemoryError
    b"not a dict at all",
])
def test_corrupt_npy_header(tmp_path, header):
    path = write_zip(tmp_path / "set.npz", {"meta.npy": meta_npy(b"{}"), "x.npy": raw_npy(header)})
    assert "corrupt" in str(load_bad(path))


def test_bad_npy_magic_inside_zip(tmp_path):
    path = write_zip(tmp_path / "set.npz", {"meta.npy": meta_npy(b"{}"), "x.npy": b"definitely not npy"})
    assert "member 'x' is not a .npy array" in str(load_bad(path))  # NpzFile hands back raw bytes here


def test_missing_required_arrays(tmp_path):
    path = good_file(tmp_path)
    msg = str(load_bad(path, required=("x", "weights", "means", "meta")))
    assert "['weights', 'means']" in msg and "'mask'" in msg  # names what is missing and what is present


def test_meta_missing(tmp_path):
    path = tmp_path / "set.npz"
    np.savez_compressed(path, x=np.arange(3))
    msg = str(load_bad(path))
    assert "no 'meta' record" in msg and "'x'" in msg


@pytest.mark.parametrize("meta_member, expect", [
    (meta_npy(b"\xff\xfe{}"), "UTF-8"),
    (meta_npy(b'{"a": '), "JSON"),
    (meta_npy(b""), "JSON"),
    (meta_npy(b"[1, 2]"), "not an object"),
    (npy_bytes(np.array([1.0, 2.0])), "not UTF-8 JSON bytes"),
    (npy_bytes(np.frombuffer(b"{}", np.uint8).reshape(1, 2)), "not UTF-8 JSON bytes"),
])
def test_bad_meta(tmp_path, meta_member, expect):
    path = write_zip(tmp_path / "set.npz", {"meta.npy": meta_member, "x.npy": npy_bytes(np.arange(3))})
    assert expect in str(load_bad(path))


def test_defaults_without_what_or_produced_by(tmp_path):
    path = tmp_path / "set.npz"
    path.write_bytes(b"garbage")
    with pytest.raises(DataError) as info:
        load_arrays(path)
    msg = str(info.value)
    assert msg.startswith(f"data file {path}: ") and "\n" not in msg and "rerun" in msg


@pytest.mark.parametrize("cls", [DataError, MissingDataError])
def test_errors_pickle(tmp_path, cls):
    err = cls("data file x: broken; rerun `y`", path=tmp_path / "x")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls and str(back) == str(err) and back.path == err.path
