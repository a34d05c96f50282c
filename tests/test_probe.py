"""Probing (pipeline.core.probe): the read-outs recover planted linear read-outs, and probing a
hand-built "network" whose layer l outputs step l of an algorithm finds the diagonal."""
import numpy as np
import pytest
import torch

from pipeline.core import probe
from pipeline.core.config import ModelConfig
from pipeline.families.linreg import FAMILY
from pipeline.families.linreg.config import LinRegSolvers, LinRegTask
from pipeline.families.linreg.data import sample_linreg

PARAMS = {"gd_lr": 0.02, "newton_alpha": "spectral", "online_lr": 0.05}


def _prompts(B, seed, noise=0.5):
    return sample_linreg(B, 5, 11, torch.Generator().manual_seed(seed), noise_std=noise)


def test_ridge_fit_recovers_a_planted_linear_map_with_bias():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(500, 8, generator=g, dtype=torch.float64)
    w = torch.randn(8, generator=g, dtype=torch.float64)
    y = X @ w + 0.7
    got = probe.ridge_fit(X, y)
    torch.testing.assert_close(got, torch.cat([w, torch.tensor([0.7], dtype=torch.float64)]), rtol=0, atol=1e-5)
    torch.testing.assert_close(probe.ridge_predict(X, got), y, rtol=0, atol=1e-5)


def _planted_states(batch, n_layers=3, C=16, seed=1):
    """Random hidden states in which y_i is an exact linear function (a per-layer planted v, c) at x_i."""
    g = torch.Generator().manual_seed(seed + batch.B)
    states = []
    for layer in range(n_layers):
        gm = torch.Generator().manual_seed(100 + layer)  # the layer's map: the same for every batch
        v, c = torch.randn(C, generator=gm, dtype=torch.float64), float(torch.randn(1, generator=gm))
        h = torch.randn(batch.B, 2 * batch.n, C, generator=g, dtype=torch.float64)
        x_pos = h[:, 0::2]
        x_pos[..., 0] = (batch.ys.double() - c - x_pos[..., 1:] @ v[1:]) / v[0]
        states.append(h.float())
    return states


def test_probe_recovers_a_planted_linear_readout_at_every_layer():
    fit, held = _prompts(256, 1), _prompts(128, 2)

    def states_fn(batch):
        return _planted_states(batch), torch.ones(batch.B, 2 * batch.n, dtype=torch.bool)

    res = probe.run_probe(FAMILY, LinRegTask(), ModelConfig(), None, states_fn, fit, held,
                          {"newton": [0, 1]}, PARAMS)
    assert res.layer_error.shape == (3, 128)
    assert res.layer_error.max() < 1e-6, res.layer_error.max(1)


def _algorithm_network(steps, kind, noise_channels=6, seed=3):
    """A hand-built stand-in for a network: layer l's state at x_i holds step steps[l] of `kind`'s
    prediction for y_i in channel 0 (noise elsewhere, and at the y tokens)."""
    def states_fn(batch):
        preds = FAMILY.probe_targets[kind].fn(batch, steps, PARAMS)
        g = torch.Generator().manual_seed(seed + batch.B)
        out = []
        for est in preds:
            h = torch.randn(batch.B, 2 * batch.n, 1 + noise_channels, generator=g)
            h[:, 0::2, 0] = est.preds.float()
            out.append(h)
        return out, torch.ones(batch.B, 2 * batch.n, dtype=torch.bool)

    return states_fn


@pytest.mark.parametrize("kind,steps", [("newton", [0, 1, 2, 3]), ("gd", [8, 32, 128, 512]),
                                        ("online_gd", [0, 4, 16, 64])])
def test_probing_exact_algorithm_layers_finds_the_diagonal(kind, steps):
    fit, held = _prompts(512, 4), _prompts(256, 5)
    res = probe.run_probe(FAMILY, LinRegTask(), ModelConfig(), None, _algorithm_network(steps, kind), fit, held,
                          {kind: steps}, PARAMS)
    assert res.best_steps(kind) == steps
    matched = res.error_matched_steps(kind)  # each layer is as accurate as its step (GD 128 and 512 are
    assert matched[:-1] == steps[:-1] and matched[-1] in steps[-2:]  # both converged below the probe's noise)
    sim = res.similarity(kind)
    assert np.diagonal(sim).min() > 0.95, sim  # the probe may rescale a layer (GD step 8 reads as 0.97)
    rows = probe.result_rows(probe.Probe("p", "net", "main", {}, {kind: steps}), "run-x", res)
    best = {r["point"]["layer"]: r["mean"] for r in rows if r["metric"] == "best_step"}
    assert best == {i: float(s) for i, s in enumerate(steps)}
    assert {r["grid"] for r in rows} == {"probe:p"}


def test_trained_probe_also_finds_the_diagonal():
    steps = [0, 1, 3]
    fit, held = _prompts(512, 6), _prompts(128, 7)
    model = ModelConfig(n_embd=32)  # the head reads a fresh LayerNorm of the states: 31 noise channels
    res = probe.run_probe(FAMILY, LinRegTask(), model, None, _algorithm_network(steps, "online_gd", 31), fit, held,
                          {"online_gd": steps}, PARAMS, fit="trained", fit_steps=300)
    assert res.best_steps("online_gd") == steps
    assert np.diagonal(res.similarity("online_gd")).min() > 0.95


def test_bad_fit_is_rejected():
    with pytest.raises(ValueError, match="fit must be one of"):
        probe.run_probe(FAMILY, LinRegTask(), ModelConfig(), None, None, None, None, {}, PARAMS, fit="lasso")


def test_multi_output_probe_recovers_a_planted_readout():
    """logreg: the read-out is Linear(width -> d) at the read-out token (a multi-output ridge)."""
    from pipeline.families.logreg import FAMILY as LOGREG
    from pipeline.families.logreg.config import LogRegTask
    from pipeline.families.logreg.data import sample_logreg

    A = torch.randn(5, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # w -> state

    def states_fn(batch):
        g = torch.Generator().manual_seed(batch.B)
        h = torch.randn(batch.B, batch.n + 1, 12, generator=g, dtype=torch.float64)
        h[:, -1] = batch.w_target.double() @ A + 0.3  # the state is an invertible affine image of w_mu
        return [h.float(), (2 * h).float()], torch.ones(batch.B, batch.n + 1, dtype=torch.bool)

    fit = sample_logreg(256, 5, 26, torch.Generator().manual_seed(9))
    held = sample_logreg(128, 5, 26, torch.Generator().manual_seed(10))
    res = probe.run_probe(LOGREG, LogRegTask(), ModelConfig(), None, states_fn, fit, held, {"newton": [0, 5]}, {})
    assert res.layer_error.shape == (2, 128) and res.layer_error.max() < 1e-8
    assert res.step_error["newton"].shape == (2, 128)


def test_probe_best_steps_figure_spans_the_probed_steps(tmp_path, monkeypatch):
    """The best-step figure: one CSV row per (algorithm, probe, layer), and each panel's y-axis spans
    the probed step grid (a flat line of best steps must not fill the panel as if it were the range)."""
    import csv

    import matplotlib.pyplot as plt

    from pipeline.core import report

    results = {"meta": {"probes": {
        "transformer": {"algorithms": {"em": {"best_steps": [1, 1, 1], "log_steps": True, "steps": [1, 2, 4, 8, 16]},
                                       "newton": {"best_steps": [0, 2, 5], "log_steps": False,
                                                  "steps": list(range(13))}}},
        "lstm": {"algorithms": {"newton": {"best_steps": [0, 1, 1], "log_steps": False, "steps": list(range(13))}}}}}}
    figs = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))
    png = report.probe_best_steps_figure(results, tmp_path / "f.png", tmp_path / "f.csv")
    assert png.is_file() and png.stat().st_size > 0
    rows = list(csv.DictReader(open(tmp_path / "f.csv")))
    assert len(rows) == 3 + 3 + 3
    assert [r["value"] for r in rows if r["panel"] == "newton" and r["series"] == "transformer"] == ["0", "2", "5"]
    em, newton = figs[0].axes
    assert em.get_title() == "em" and em.get_yscale() == "symlog"
    lo, hi = em.get_ylim()
    assert lo == 0 and hi >= 16
    lo, hi = newton.get_ylim()
    assert lo == 0 and hi >= 12
    assert all(float(t).is_integer() for t in newton.get_xticks())
    assert figs[0].get_size_inches()[0] >= 6.4
