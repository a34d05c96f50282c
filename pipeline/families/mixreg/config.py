"""Parameters of the mixture-of-linear-regressions family: params.yaml `task.mixreg`, `baselines.mixreg`."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.config import ConfigError, _f


@dataclass
class MixRegTask:
    d: int = _f(5, "input dimension", min=1)
    n_points: int = _f(32, "labelled examples per prompt", min=2)
    snr: float = _f(2.0, "signal-to-noise ratio ||beta|| / sigma of the training prompts (||beta|| = 1): "
                         "y_i = c_i <beta, x_i> + sigma eps_i, c_i = +-1 equiprobable", gt=0)
    snr_max: float = _f(2.0, "upper end of a per-prompt SNR range, log-uniform (= snr: one value)", gt=0)
    components: int = _f(2, "regressors K: 2 = the symmetric mixture beta, -beta (the paper's default); >= 3 = K "
                            "independent unit regressors (the paper's K-component mixture, at high SNR)", min=2, max=8)


@dataclass
class MixRegSolvers:
    em_iters: int = _f(20, "EM iterations from a random unit start", min=1)
    gd_steps: int = _f(5, "EM with a gradient M step: gradient steps per M step (Jin et al.'s construction)", min=1)
    gd_lr: float = _f(1.0, "EM with a gradient M step: step size in units of 1 / lambda_max(X'X / n) of the prompt "
                           "(< 2 is stable)", gt=0)


def validate(t: MixRegTask, model, where: str) -> None:
    if t.snr_max < t.snr:
        raise ConfigError(f"{where}.snr_max: must be >= snr = {t.snr}, got {t.snr_max}")
    if model.backbone == "transformer" and model.position != "set":
        raise ConfigError(f"model.position: prompts are sets of examples; use set, got {model.position!r}")
    if model.backbone != "transformer" and model.bidirectional:
        raise ConfigError("model.bidirectional: the read-out token is last (set it false)")
