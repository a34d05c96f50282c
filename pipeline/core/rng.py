"""Seeded random streams: every random draw in the pipeline comes from make_generator(seed, *words).

The words name the stream, e.g. (seed, TRAIN, global_step, rank) for a training batch or
(seed, EVAL, d, K) for an evaluation set, so a run is reproducible, a resumed run sees exactly the
data it would have seen, and two streams never overlap by accident.
"""
from __future__ import annotations

import numpy as np
import torch

# The named streams (the first word after the seed). Families and studies share these numbers;
# a family that needs a private stream uses words after them, e.g. (seed, EVAL, d, K).
TRAIN, VAL, EVAL, SOLVER, STUDY = 0, 1, 2, 3, 4


def make_generator(seed: int, *stream: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on `device` seeded from (seed, *stream), e.g. (seed, TRAIN, global_step, rank).

    SeedSequence mixes the words so that neighbouring steps or ranks give unrelated streams.
    """
    words = [int(seed)] + [int(s) for s in stream]
    if any(w < 0 for w in words):
        raise ValueError(f"seed words must be non-negative, got {words}")
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    g = torch.Generator(device=device)
    g.manual_seed(int(state[0]) << 31 ^ int(state[1]))
    return g


def per_task_draws(seed: int, index: torch.Tensor, draw, *stream: int, device=None) -> torch.Tensor:
    """Stack draw(generator) over tasks, one generator per task seeded by (seed, *stream, task index).

    A classical solver's random start for task i then depends on i only, never on how the
    evaluation is chunked. index (B,) long -> (B, *draw's shape).
    """
    device = device if device is not None else index.device
    gens = [make_generator(seed, *stream, int(i), device=device) for i in index.tolist()]
    return torch.stack([draw(g) for g in gens])
