"""The one interface that joins trained networks and classical algorithms."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from pipeline.tasks.gmm import GMMBatch, GMMEstimate


@runtime_checkable
class Solver(Protocol):
    """Anything that reads a batch of problem instances and answers in the task's own format.

    A trained TGMM network, EM and the spectral method are all solvers, so a study evaluates a
    list of them on the same sets with the same metrics. `name` is the column in tables/plots.
    """

    name: str

    def __call__(self, batch: GMMBatch) -> GMMEstimate: ...
