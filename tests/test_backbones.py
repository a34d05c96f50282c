"""The backbone registry: one contract for every backbone (per-layer states, padding, symmetry or
causality), the attention variants against an explicit reference, and a few real training steps
of every backbone through the one train() function.

No test here touches the global RNG: data come from local generators, and parameter initialisation
runs inside `seeded_init` (the global state is forked and restored)."""
from __future__ import annotations

import contextlib
import math
from dataclasses import replace

import pytest
import pytorch_lightning as pl
import torch

from pipeline.core.config import BACKBONES, ConfigError, ModelConfig, deep_merge, from_dict
from pipeline.models.backbone import build_backbone, describe, is_causal, reverse_within_length
from pipeline.models.transformer import ATTENTIONS, SelfAttention
from tests.conftest import make_run

C = 16
CASES = {  # name -> ModelConfig of a small backbone
    **{f"set-{a}": ModelConfig(n_layer=2, n_head=2, n_embd=C, attention=a) for a in ATTENTIONS},
    **{f"gpt2-{a}": ModelConfig(n_layer=2, n_head=2, n_embd=C, attention=a, position="gpt2", max_len=32)
       for a in ATTENTIONS},
    "mamba2": ModelConfig(backbone="mamba2", n_layer=2, n_head=2, n_embd=C, headdim=8, d_state=4, chunk_size=4),
    "mamba2-bi": ModelConfig(backbone="mamba2", n_layer=2, n_head=2, n_embd=C, headdim=8, d_state=4,
                             bidirectional=True),
    "lstm": ModelConfig(backbone="lstm", n_layer=2, n_head=2, n_embd=C),
    "lstm-bi": ModelConfig(backbone="lstm", n_layer=2, n_head=2, n_embd=C, bidirectional=True),
}


@contextlib.contextmanager
def seeded_init(seed: int):
    """Module construction with a fixed parameter initialisation, isolated from the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _backbone(m: ModelConfig, seed: int = 0):
    with seeded_init(seed):
        return build_backbone(m).double().eval()


def _randn(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _inputs(B=3, N=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 9:] = False  # row 1: 9 real points, then padding
    mask[2, 5:] = False
    return h, mask


def test_registry_lists_every_configurable_backbone():
    assert set(BACKBONES) == {m.backbone for m in CASES.values()}
    with pytest.raises(ValueError, match="not registered"):
        build_backbone(replace(ModelConfig(), backbone="rnn"))


@pytest.mark.parametrize("name", list(CASES))
def test_contract_hidden_states_padding_and_gradients(name):
    m = CASES[name]
    bb = _backbone(m)
    h, mask = _inputs()
    out, hidden = bb(h, mask, return_hidden=True)
    assert out.shape == h.shape and bool(torch.isfinite(out).all())
    assert len(hidden) == m.n_layer + 1 and all(t.shape == h.shape for t in hidden)
    if m.position != "gpt2":  # hidden[0] is the first layer's input (gpt2 adds its positions first)
        torch.testing.assert_close(hidden[0], h)
    assert bb(h, mask)[1] == []  # no per-layer states unless asked
    # padding content never reaches real positions
    h2 = h.clone()
    h2[~mask] = 1e3 * _randn((int((~mask).sum()), C), 2)
    out2, _ = bb(h2, mask)
    torch.testing.assert_close(out2[mask], out[mask], rtol=0, atol=1e-9)
    # every parameter is used
    bb.train()
    (bb(h, mask)[0][mask].pow(2).sum()).backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in bb.parameters())


@pytest.mark.parametrize("name", [n for n, m in CASES.items() if is_causal(m)])
def test_causal_backbones_ignore_later_inputs(name):
    bb = _backbone(CASES[name])
    h, mask = _inputs(N=14)
    mask[:] = True
    out, _ = bb(h, mask)
    for t in (0, 5, 12):
        h2 = h.clone()
        h2[:, t + 1:] = _randn(h2[:, t + 1:].shape, 3 + t)
        out2, _ = bb(h2, mask)
        torch.testing.assert_close(out2[:, :t + 1], out[:, :t + 1], rtol=0, atol=1e-10)
        assert not torch.allclose(out2[:, t + 1:], out[:, t + 1:])


@pytest.mark.parametrize("name", [n for n, m in CASES.items() if not is_causal(m)])
def test_non_causal_backbones_see_the_whole_sample(name):
    bb = _backbone(CASES[name])
    h, mask = _inputs(N=10)
    mask[:] = True
    out, _ = bb(h, mask)
    h2 = h.clone()
    h2[:, -1] = _randn(h2[:, -1].shape, 4)  # change only the last point
    assert not torch.allclose(bb(h2, mask)[0][:, 0], out[:, 0])


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_set_transformer_is_permutation_equivariant(attention):
    bb = _backbone(CASES[f"set-{attention}"])
    h, mask = _inputs()
    out, _ = bb(h, mask)
    g = torch.Generator().manual_seed(5)
    for b in range(h.shape[0]):
        n = int(mask[b].sum())
        perm = torch.randperm(n, generator=g)
        hp = h[b:b + 1].clone()
        hp[0, :n] = h[b, perm]
        outp, _ = bb(hp, mask[b:b + 1])
        torch.testing.assert_close(outp[0, :n], out[b, perm], rtol=0, atol=1e-10)


@pytest.mark.parametrize("attention", ["relu", "linear"])
@pytest.mark.parametrize("causal", [False, True])
def test_normalised_attention_matches_the_formula(attention, causal):
    """y_i = (1/|S_i|) sum_{j in S_i} f(q_i.k_j / sqrt(hd)) v_j, S_i = real (and, causal, earlier) keys."""
    n_head, N = 2, 7
    with seeded_init(0):
        att = SelfAttention(C, n_head, 0.0, causal, attention).double().eval()
    x = _randn((2, N, C), 6)
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[1, 4:] = False
    y = att(x, mask)
    q, k, v = att.qkv(x).split(C, dim=2)
    hd = C // n_head
    f = torch.relu if attention == "relu" else (lambda s: s)
    ref = torch.zeros(2, N, C, dtype=torch.float64)
    for b in range(2):
        for i in range(N):
            keys = [j for j in range(N) if mask[b, j] and (not causal or j <= i)]
            for hh in range(n_head):
                sl = slice(hh * hd, (hh + 1) * hd)
                s = sum(f(q[b, i, sl] @ k[b, j, sl] / math.sqrt(hd)) * v[b, j, sl] for j in keys)
                ref[b, i, sl] = s / len(keys)
    ref = att.proj(ref)
    torch.testing.assert_close(y[mask], ref[mask], rtol=0, atol=1e-12)


def test_reverse_within_length_keeps_padding_last_and_is_an_involution():
    h = torch.arange(2 * 5, dtype=torch.float64).view(2, 5, 1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    r = reverse_within_length(h, mask)
    assert r[0, :, 0].tolist() == [2.0, 1.0, 0.0, 3.0, 4.0]
    assert r[1, :, 0].tolist() == [9.0, 8.0, 7.0, 6.0, 5.0]
    torch.testing.assert_close(reverse_within_length(r, mask), h)


# ----------------------------------------------------------------------------- params

@pytest.mark.parametrize("model, key", [
    ({"backbone": "lstm", "attention": "relu"}, "model.attention"),
    ({"backbone": "mamba2", "position": "gpt2"}, "model.position"),
    ({"bidirectional": True}, "model.bidirectional"),
    ({"backbone": "mamba2", "headdim": 48}, "model.headdim"),
    ({"backbone": "gru"}, "model.backbone"),
    ({"attention": "sigmoid"}, "model.attention"),
])
def test_bad_backbone_params_name_the_key(tiny_params, model, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        from_dict(deep_merge(tiny_params, {"model": model}))


@pytest.mark.parametrize("variants, key", [
    ({"m": {"backbone": "mamba2", "headdim": 7}}, "ablation.variants.m.headdim"),
    ({"m": {"widht": 3}}, "ablation.variants.m.widht"),
    ({"a/b": {}}, "ablation.variants.a/b"),
    ({"anisotropic": {}}, "ablation.variants.anisotropic"),
    ({"m": 3}, "ablation.variants"),
])
def test_bad_ablation_variants_name_the_key(tiny_params, variants, key):
    tiny_params["studies"] = [*tiny_params["studies"], "ablation"]  # a listed study's networks are resolved
    tiny_params["ablation"] = {**tiny_params["ablation"], "variants": variants}
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        from_dict(tiny_params)


def test_describe_names_backbone_and_mode():
    assert describe(CASES["set-relu"]) == "transformer(set, relu) L2 D16"
    assert describe(CASES["mamba2-bi"]) == "mamba2(bidirectional) L2 D16"


# ----------------------------------------------------------------------------- training

TRAIN_CASES = {"transformer-relu": {"attention": "relu"}, "transformer-linear-gpt2": {"attention": "linear",
                                                                                      "position": "gpt2"},
               "mamba2": {"backbone": "mamba2", "headdim": 8, "d_state": 8},
               "mamba2-bi": {"backbone": "mamba2", "headdim": 8, "bidirectional": True},
               "lstm": {"backbone": "lstm"}}


class _InitialWeights(pl.Callback):
    """Keeps a copy of the network's parameters as training starts (after train() initialised them)."""

    def on_train_start(self, trainer, module):
        self.params = {n: p.detach().clone() for n, p in module.net.named_parameters()}


@pytest.mark.parametrize("name", list(TRAIN_CASES))
def test_every_backbone_trains_through_the_one_train_function(tmp_path, name):
    from pipeline.core.network import load_network
    from pipeline.core.train import train
    from pipeline.families.gmm.data import make_generator, sample_gmm

    run = make_run("gmm", model=TRAIN_CASES[name])
    init = _InitialWeights()
    res = train(run, tmp_path / name, callbacks=[init], track=False, progress_bar=False)
    assert res.metrics["global_step"] == run.train.steps
    assert math.isfinite(res.metrics["val/l2"]) and all(math.isfinite(v) for v in res.metrics.values())
    trained = load_network(res.model_path)
    assert type(trained.backbone) is type(res.net.backbone) and trained.run.model == run.model
    named = {n: p for n, p in init.params.items() if n.startswith("backbone.")}
    assert named and set(named) == {"backbone." + n for n, _ in trained.backbone.named_parameters()}
    unchanged = [n for n, p in trained.named_parameters() if n in named and torch.equal(p, named[n])]
    assert not unchanged, f"not updated by training: {unchanged}"
    b = sample_gmm(3, run.task.d, 2, 10, 10, make_generator(0))
    _, mask, hidden = trained.encode(b, return_hidden=True)
    assert len(hidden) == run.model.n_layer + 1 and all(t.shape == (3, 10, run.model.n_embd) for t in hidden)
