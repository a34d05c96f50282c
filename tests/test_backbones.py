"""The backbone registry: one contract for every backbone (per-layer states, padding, symmetry or
causality), the attention variants against an explicit reference, and a few real training steps
of every backbone through the one train() function."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from pipeline.config import BACKBONES, ConfigError, ModelConfig, deep_merge, from_dict
from pipeline.models.backbone import build_backbone, describe, is_causal, reverse_within_length
from pipeline.models.transformer import ATTENTIONS, SelfAttention

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


def _backbone(m: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    return build_backbone(m).double().eval()


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
    h2[~mask] = 1e3 * torch.randn(int((~mask).sum()), C, dtype=torch.float64)
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
        h2[:, t + 1:] = torch.randn_like(h2[:, t + 1:])
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
    h2[:, -1] = torch.randn_like(h2[:, -1])  # change only the last point
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
    torch.manual_seed(0)
    n_head, N = 2, 7
    att = SelfAttention(C, n_head, 0.0, causal, attention).double().eval()
    x = torch.randn(2, N, C, dtype=torch.float64)
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
    tiny_params["ablation"] = {"variants": variants}
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


@pytest.mark.parametrize("name", list(TRAIN_CASES))
def test_every_backbone_trains_through_the_one_train_function(tiny_params, tmp_path, name):
    from pipeline.training.train import train

    tiny_params["model"].update(TRAIN_CASES[name])
    cfg = from_dict(tiny_params)
    torch.manual_seed(0)
    res = train(cfg, 2, tmp_path / name, track=False, progress_bar=False)
    assert res.metrics["global_step"] == cfg.train.steps
    assert math.isfinite(res.metrics["val/l2"]) and all(math.isfinite(v) for v in res.metrics.values())
    import pytorch_lightning as pl

    from pipeline.models.tgmm import load_network
    from pipeline.training.module import TGMMModule

    pl.seed_everything(cfg.seed, verbose=False)  # what train() does before building the network
    init = TGMMModule(cfg.to_dict(), 2).net
    trained = load_network(res.model_path)
    assert type(trained.backbone) is type(init.backbone)
    named = dict(init.backbone.named_parameters())
    unchanged = [n for n, p in trained.backbone.named_parameters() if torch.equal(p, named[n])]
    assert not unchanged, f"not updated by training: {unchanged}"
    x = torch.randn(3, 10, 2)
    mask = torch.ones(3, 10, dtype=torch.bool)
    _, hidden = trained.encode(x, mask, torch.full((3,), 2), return_hidden=True)
    assert len(hidden) == cfg.model.n_layer + 1 and all(t.shape == (3, 10, cfg.model.n_embd) for t in hidden)
