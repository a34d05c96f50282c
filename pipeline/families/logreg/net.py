"""Read-in and read-out of in-context logistic regression (Giannou et al. 2024), from models/heads.py.

Read-in: one token per example, [x_i, y_i, 0], and a last read-out token [0, 0, 1], each
Linear(d + 2 -> width). Read-out: Linear(width -> d) at the read-out token: the network's w. (The
anchor reads w at the last example with its label zeroed, although the target uses that label;
a separate read-out token keeps every example whole.)
"""
from __future__ import annotations

from pipeline.models.heads import LabelledReadIn as ReadIn  # noqa: F401
from pipeline.models.heads import LastTokensHead
from pipeline.models.heads import labelled_tokens as tokens  # noqa: F401


def ReadOut(n_embd: int, d: int) -> LastTokensHead:  # noqa: N802 (a module factory)
    return LastTokensHead(n_embd, d)
