"""Parameters of the in-context linear-regression family: params.yaml `task.linreg`, `baselines.linreg`."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.config import ConfigError, _f


@dataclass
class LinRegTask:
    d: int = _f(5, "input dimension (Garg et al.: 20)", min=1)
    n_points: int = _f(11, "examples per prompt; the network predicts y_i at every x_i (Garg: 41 for d = 20)", min=1)
    noise_std: float = _f(0.0, "y = w.x + noise_std * N(0, 1) (Garg trains noiseless)", min=0)
    condition: float = _f(1.0, "condition number of Cov(x): eigenvalues c on the first floor(d/2) coordinates and "
                               "1 on the rest, a fresh random rotation per task, trace d (1 = isotropic)", min=1)
    curriculum_every: int = _f(0, "curriculum: raise active dims and points every this many steps (0 = off)", min=0)
    dims_start: int = _f(2, "curriculum: active dimensions at step 0 (inactive coordinates of x are 0)", min=1)
    dims_inc: int = _f(1, "curriculum: active dimensions added per stage", min=0)
    points_start: int = _f(5, "curriculum: examples per prompt at step 0", min=1)
    points_inc: int = _f(2, "curriculum: examples added per stage", min=0)


@dataclass
class LinRegSolvers:
    ridge_lambda: float = _f(0.1, "ridge: penalty lambda in (X^T X + lambda I) w = X^T y", min=0)
    knn: int = _f(3, "nearest neighbours: number of neighbours (Garg: 3)", min=1)
    gd_steps: int = _f(10, "gradient descent: steps from w = 0 (Fu et al.'s anchor: a grid up to thousands)", min=0)
    gd_lr: float = _f(0.02, "gradient descent: step size on sum_i (y_i - w.x_i)^2 / 2 (anchor: 0.01)", gt=0)
    newton_steps: int = _f(3, "iterative Newton: Newton-Schulz steps (Fu et al.: ~3 per middle layer)", min=0)
    online_passes: int = _f(1, "online GD: passes over the prefix's examples, one example per update (1 = the "
                               "classical online learner)", min=0)
    online_lr: float = _f(0.05, "online GD: step size of w <- w - lr (w.x_i - y_i) x_i (stable below 2 / ||x_i||^2 "
                               "~ 2 / d)", gt=0)
    newton_alpha: str = _f("spectral", "iterative Newton start M0 = a S: spectral a = 1/||SS^T||_2 (the midpoint of "
                                       "the convergent range (0, 2/||SS^T||_2); the paper's 2/||SS^T||_2 is its edge) "
                                       "| frobenius a = 1/||SS^T||_F (anchor code)", choices=("spectral", "frobenius"))


def validate(t: LinRegTask, model, where: str) -> None:
    if model.position == "gpt2" and 2 * t.n_points > model.max_len:
        raise ConfigError(f"model.max_len: {model.max_len} is shorter than the prompt's 2 * {where}.n_points = "
                          f"{2 * t.n_points} tokens (raise it to at least that)")
    if model.backbone == "transformer" and model.position != "gpt2":
        raise ConfigError(f"model.position: in-context regression reads prompts in order; use gpt2 (causal), "
                          f"got {model.position!r}")
    if model.backbone != "transformer" and model.bidirectional:
        raise ConfigError("model.bidirectional: in-context regression predicts y_i from the prefix only; "
                          "a reverse scan would see the answer (set it false)")
    if t.curriculum_every:
        if t.dims_start > t.d:
            raise ConfigError(f"{where}.dims_start: must be <= {where}.d={t.d}, got {t.dims_start}")
        if t.points_start > t.n_points:
            raise ConfigError(f"{where}.points_start: must be <= {where}.n_points={t.n_points}, got {t.points_start}")


def curriculum(t: LinRegTask, step: int | None) -> tuple[int, int]:
    """(active dimensions, examples per prompt) at `step`: a pure function of the step, so a resumed
    run sees exactly the curriculum it would have seen. step=None: the final distribution."""
    if step is None or not t.curriculum_every:
        return t.d, t.n_points
    stage = step // t.curriculum_every
    return min(t.d, t.dims_start + t.dims_inc * stage), min(t.n_points, t.points_start + t.points_inc * stage)
