"""TaskBatch: the shared behaviour of a family's batch of B problem instances.

A family's batch is a dataclass of tensors with a leading task axis (B, ...), named in REQUIRED
(what its evaluation-set files store), plus `index` (B,): each task's row in its set, which
`slice` keeps so that a classical solver's per-task random start does not depend on chunking.
Subclasses declare the fields and REQUIRED, and `check_shapes` for what from_numpy verifies;
the moving, slicing and (de)serialising is here, once.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import Tensor


class TaskBatch:
    REQUIRED: tuple[str, ...] = ()
    KIND = "task"  # how errors name the arrays, e.g. "PCA"

    @property
    def B(self) -> int:
        return getattr(self, self.REQUIRED[0]).shape[0]

    @property
    def device(self) -> torch.device:
        return getattr(self, self.REQUIRED[0]).device

    def task_index(self) -> Tensor:
        return self.index if self.index is not None else torch.arange(self.B, device=self.device)

    def _extra(self) -> dict:
        """Fields besides REQUIRED and index (non-tensor settings), copied as they are."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in self.REQUIRED and f.name != "index"}

    def to(self, device, dtype: torch.dtype | None = None):
        def mv(t):
            return t.to(device=device, dtype=dtype) if dtype is not None and t.is_floating_point() else t.to(device)

        return type(self)(**{k: mv(getattr(self, k)) for k in self.REQUIRED}, **self._extra(),
                          index=None if self.index is None else self.index.to(device))

    def slice(self, start: int, stop: int):
        return type(self)(**{k: getattr(self, k)[start:stop] for k in self.REQUIRED}, **self._extra(),
                          index=self.task_index()[start:stop])

    def to_numpy(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k).cpu().numpy() for k in self.REQUIRED}

    @classmethod
    def check_shapes(cls, a: dict[str, np.ndarray]) -> bool:
        """Whether the arrays of a stored set fit together (subclasses check their shapes)."""
        B = {v.shape[0] if v.ndim else None for v in a.values()}
        return len(B) == 1 and None not in B

    @classmethod
    def from_numpy(cls, arrays: dict, where: str = "arrays"):
        a = {k: np.asarray(arrays[k]) for k in cls.REQUIRED}
        if not (TaskBatch.check_shapes.__func__(cls, a) and cls.check_shapes(a)):
            raise ValueError(f"{where}: inconsistent {cls.KIND} arrays ("
                             + ", ".join(f"{k} {a[k].shape}" for k in cls.REQUIRED) + ")")
        return cls(**{k: torch.from_numpy(a[k]) for k in cls.REQUIRED})


class PromptBatch(TaskBatch):
    """A TaskBatch whose first array is `xs` (B, n, d): n points or examples per task in d dimensions."""

    @property
    def n(self) -> int:
        return self.xs.shape[1]

    @property
    def d(self) -> int:
        return self.xs.shape[2]
