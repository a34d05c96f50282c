"""Parameters of the in-context logistic-regression family: params.yaml `task.logreg`, `baselines.logreg`."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.config import ConfigError, _f


@dataclass
class LogRegTask:
    d: int = _f(5, "input dimension (Giannou et al.: 5)", min=1)
    n_points: int = _f(26, "labelled examples per prompt (Giannou et al.: 26)", min=1)
    condition: float = _f(1.0, "condition number of Cov(x): 1 = N(0, I); > 1: eigenvalues s_max ~ U[1, 100], "
                               "s_min = s_max / condition, the rest ~ U[s_min, s_max], a fresh rotation per task "
                               "(the anchor draws one per batch)", min=1)
    mu: float = _f(0.01, "ridge penalty of the target: mean log(1 + exp(-y x.w)) + mu/2 ||w||^2 (paper: 0.01)", gt=0)
    target_steps: int = _f(30, "damped-Newton steps that compute the target w from w0 = 0.1 N(0, I) (paper: <= 30)",
                           min=1)
    test_points: int = _f(64, "fresh points per task for the test accuracy (not in the prompt)", min=1)


@dataclass
class LogRegSolvers:
    newton_steps: int = _f(3, "damped Newton: steps from w = 0", min=0)
    gd_steps: int = _f(10, "gradient descent with a grid line search (0.8^j): steps from w = 0", min=0)


def validate(t: LogRegTask, model, where: str) -> None:
    if model.backbone == "transformer" and model.position != "set":
        raise ConfigError(f"model.position: logistic-regression prompts are sets (the answer does not depend on the "
                          f"order of the examples); use set, got {model.position!r}")
    if model.backbone != "transformer" and model.bidirectional:
        raise ConfigError("model.bidirectional: the read-out token is last, so a causal scan sees the whole prompt "
                          "(set it false)")
