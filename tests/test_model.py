"""The backbone's symmetry (set: permutation-equivariant; gpt2: causal), the GMM network (core/network.py
with the gmm read-in/read-outs), the matched loss, model IO.

No test here touches the global RNG: data come from local generators, and parameter initialisation
(which PyTorch draws from the global generator) runs inside `seeded_init`, which forks the global
state and restores it, so results never depend on which tests ran before."""
import contextlib
import itertools
import json

import numpy as np
import pytest
import torch

from pipeline.core.network import Network, NetworkSolver, count_parameters, load_network, save_network
from pipeline.families.gmm.data import GMMBatch, make_generator, sample_gmm
from pipeline.families.gmm.loss import _perms, matched_loss
from pipeline.families.gmm.metrics import l2_error
from pipeline.models.transformer import Transformer
from tests.conftest import make_run


@contextlib.contextmanager
def seeded_init(seed: int):
    """Module construction with a fixed parameter initialisation, isolated from the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _run(position="set", d=3, ks=(2, 3, 4), anisotropic=False):
    return make_run("gmm", task={"d": d, "ks": list(ks), "n0": 20, "anisotropic": anisotropic},
                    model={"n_layer": 2, "n_head": 2, "n_embd": 16, "position": position, "max_len": 64})


def _net(position="set", d=3, ks=(2, 3, 4), anisotropic=False, seed=0):
    with seeded_init(seed):
        return Network(_run(position, d, ks, anisotropic)).double().eval()


def _permuted_points(b: GMMBatch, perm: torch.Tensor) -> GMMBatch:
    return GMMBatch(x=b.x[:, perm], mask=b.mask[:, perm], weights=b.weights, means=b.means,
                    labels=b.labels[:, perm], scales=b.scales)


def test_set_backbone_is_permutation_equivariant_with_padding():
    with seeded_init(0):
        bb = Transformer(n_layer=3, n_embd=16, n_head=4, position="set").double().eval()
    g = torch.Generator().manual_seed(1)
    B, N = 3, 12
    h = torch.randn(B, N, 16, generator=g, dtype=torch.float64)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 9:] = False  # task 1 has 9 real points
    out, hidden = bb(h, mask, return_hidden=True)
    assert len(hidden) == 4 and all(t.shape == (B, N, 16) for t in hidden)
    for b in range(B):
        n = int(mask[b].sum())
        perm = torch.randperm(n, generator=g)
        hp = h[b:b + 1].clone()
        hp[0, :n] = h[b, perm]
        outp, _ = bb(hp, mask[b:b + 1])
        torch.testing.assert_close(outp[0, :n], out[b, perm], rtol=0, atol=1e-10)
    # padded positions do not influence real ones
    h2 = h.clone()
    h2[1, 9:] = 1e3 * torch.randn(3, 16, generator=g, dtype=torch.float64)
    out2, _ = bb(h2, mask)
    torch.testing.assert_close(out2[1, :9], out[1, :9], rtol=0, atol=1e-10)


def test_tgmm_estimate_is_invariant_to_sample_order_and_padding():
    net = _net("set")
    b = sample_gmm(4, 3, 3, 14, 20, make_generator(0, 1)).to("cpu", torch.float64)
    logits, means, scales = net(b, 3)
    assert logits.shape == (4, 3) and means.shape == (4, 3, 3) and scales is None
    g = torch.Generator().manual_seed(2)
    logits2, means2, _ = net(_permuted_points(b, torch.randperm(20, generator=g)), 3)  # padding moves too
    torch.testing.assert_close(logits2, logits, rtol=0, atol=1e-10)
    torch.testing.assert_close(means2, means, rtol=0, atol=1e-10)
    x = b.x.clone()
    x[~b.mask] = 1e3 * torch.randn(int((~b.mask).sum()), 3, generator=g, dtype=torch.float64)
    logits3, means3, _ = net(GMMBatch(x=x, mask=b.mask, weights=b.weights, means=b.means, labels=b.labels), 3)
    torch.testing.assert_close(means3, means, rtol=0, atol=1e-10)
    torch.testing.assert_close(logits3, logits, rtol=0, atol=1e-10)


def test_gpt2_mode_is_causal_and_order_dependent():
    with seeded_init(0):
        bb = Transformer(n_layer=2, n_embd=16, n_head=2, position="gpt2", max_len=32).double().eval()
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 10, 16, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 10, dtype=torch.bool)
    out, _ = bb(h, mask)
    h2 = h.clone()
    h2[:, 6:] = torch.randn(2, 4, 16, generator=g, dtype=torch.float64)  # change later inputs only
    out2, _ = bb(h2, mask)
    torch.testing.assert_close(out2[:, :6], out[:, :6], rtol=0, atol=1e-12)
    assert not torch.allclose(out2[:, 6:], out[:, 6:])
    out3, _ = bb(h.flip(1), mask)  # positions make it order-dependent
    assert not torch.allclose(out3.flip(1), out)


def test_network_groups_forward_many_and_encode():
    net = _net("set", ks=(2, 3))
    assert list(net.read_out) == ["2", "3"] and net.groups == [2, 3]
    b2 = sample_gmm(3, 3, 2, 20, 20, make_generator(0, 4)).to("cpu", torch.float64)
    b3 = sample_gmm(5, 3, 3, 10, 20, make_generator(0, 5)).to("cpu", torch.float64)
    one = {2: net(b2, 2), 3: net(b3, 3)}
    many = net.forward_many({2: b2, 3: b3})  # same N: one backbone pass over the concatenation
    for k in (2, 3):
        for a, c in zip(many[k][:2], one[k][:2]):
            torch.testing.assert_close(a, c, rtol=0, atol=1e-10)
    short = sample_gmm(2, 3, 3, 8, 8, make_generator(0, 6)).to("cpu", torch.float64)
    many = net.forward_many({2: b2, 3: short})  # different N: separate passes
    torch.testing.assert_close(many[3][1], net(short, 3)[1], rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="groups"):
        net(b2, 5)
    h, mask, hidden = net.encode(b3, return_hidden=True)
    assert h.shape == (5, 20, 16) and torch.equal(mask, b3.mask)
    assert len(hidden) == 3 and all(t.shape == (5, 20, 16) for t in hidden)
    assert net.encode(b3)[2] == []
    run = _run("set", ks=(2, 3))
    assert count_parameters(run) == sum(p.numel() for p in net.parameters())


def _pairing_cost(logits, means, batch, sigma):
    """The matched loss's cost of one pairing, by hand: prediction sigma[k] <-> true component k."""
    pm, pl = means[:, sigma], torch.log_softmax(logits, -1)[:, sigma]
    mse = (pm - batch.means).pow(2).mean(dim=(-1, -2))
    kl = (batch.weights * (torch.log(batch.weights) - pl)).sum(-1)
    return mse + kl  # (B,)


@pytest.mark.parametrize("K", [2, 3, 4])
def test_matched_loss_zero_at_truth_and_invariant_to_component_order(K):
    g = torch.Generator().manual_seed(K)
    b = sample_gmm(6, 2, K, 10, 10, make_generator(0, 2, K)).to("cpu", torch.float64)
    logits = torch.log(b.weights)
    truth = matched_loss(logits, b.means, b)  # the loss works in float32: zero up to its rounding
    assert abs(float(truth["loss"])) < 1e-6 and float(truth["l2"]) < 1e-10
    assert float(truth["mse"]) < 1e-10 and abs(float(truth["kl"])) < 1e-6
    for p in _perms(K):  # the truth in any order is still matched to itself
        assert abs(float(matched_loss(logits[:, p], b.means[:, p], b)["loss"])) < 1e-6
    noisy_means = b.means + 0.8 * torch.randn(b.means.shape, generator=g, dtype=torch.float64)
    noisy_logits = logits + 0.5 * torch.randn(logits.shape, generator=g, dtype=torch.float64)
    ref = matched_loss(noisy_logits, noisy_means, b)
    assert float(ref["loss"]) > float(truth["loss"])  # minimal at the truth
    # the loss is the mean over tasks of the best pairing's cost, and splits into its parts
    costs = torch.stack([_pairing_cost(noisy_logits, noisy_means, b, s) for s in _perms(K)], 1)  # (B, P)
    torch.testing.assert_close(ref["loss"].double(), costs.min(1).values.mean(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ref["loss"], ref["mse"] + ref["kl"], rtol=1e-6, atol=1e-7)
    # every relabelling of the prediction, 3-cycles included, gives the same loss and l2
    for p in _perms(K):
        out = matched_loss(noisy_logits[:, p], noisy_means[:, p], b)
        for key in ("loss", "mse", "kl", "l2"):
            torch.testing.assert_close(out[key], ref[key], rtol=1e-6, atol=1e-7)
    # the monitored l2 is the paper's metric: the Hungarian l2 of metrics.l2_error
    hung = l2_error(torch.softmax(noisy_logits, -1), noisy_means, b.weights, b.means)[0]
    assert float(ref["l2"]) == pytest.approx(hung.mean(), rel=1e-5)
    hung0 = l2_error(b.weights, b.means, b.weights, b.means)[0]
    assert float(truth["l2"]) == pytest.approx(hung0.mean(), abs=1e-10)
    # per task: the batch loss is the mean of the tasks' losses
    singles = [matched_loss(noisy_logits[i:i + 1], noisy_means[i:i + 1], b.slice(i, i + 1))["loss"]
               for i in range(b.B)]
    torch.testing.assert_close(ref["loss"], torch.stack(singles).mean(), rtol=1e-6, atol=1e-7)


def test_matched_loss_with_scales():
    g = torch.Generator().manual_seed(7)
    b = sample_gmm(4, 3, 3, 10, 10, make_generator(0, 8), anisotropic=True).to("cpu", torch.float64)
    logits = torch.log(b.weights)
    assert abs(float(matched_loss(logits, b.means, b, b.scales)["loss"])) < 1e-6
    off = b.scales * torch.exp(0.3 * torch.randn(b.scales.shape, generator=g, dtype=torch.float64))
    with_scales = matched_loss(logits, b.means, b, off)
    assert float(with_scales["loss"]) > 1e-3  # wrong scales cost, right means and weights do not
    p = torch.tensor([2, 0, 1])
    torch.testing.assert_close(matched_loss(logits[:, p], b.means[:, p], b, off[:, p])["loss"], with_scales["loss"])


def test_network_solver_and_safetensors_roundtrip(tmp_path):
    net = _net("set", anisotropic=True).float()
    path = tmp_path / "m.safetensors"
    save_network(net, path, meta={"global_step": 7})
    spec = json.loads(path.with_suffix(".json").read_text())
    assert spec["global_step"] == 7 and spec["run"] == net.run.to_dict()
    net2 = load_network(path)
    assert net2.run.to_dict() == net.run.to_dict()
    for (k, v), (k2, v2) in zip(net.state_dict().items(), net2.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    b = sample_gmm(3, 3, 2, 8, 16, make_generator(0, 3), anisotropic=True)
    e1, e2 = NetworkSolver(net)(b), NetworkSolver(net2, name="tgmm")(b)
    torch.testing.assert_close(e1.means, e2.means, rtol=0, atol=0)
    assert e1.weights.shape == (3, 2) and torch.allclose(e1.weights.sum(1), torch.ones(3))
    assert e1.scales.shape == (3, 2, 3) and (e1.scales > 0).all()
    assert NetworkSolver(net2, name="tgmm").name == "tgmm"
    e3 = NetworkSolver(net)(sample_gmm(2, 3, 4, 8, 8, make_generator(0, 9), anisotropic=True))
    assert e3.means.shape == (2, 4, 3)  # the solver picks the read-out of the batch's K
    assert not any(f.suffix in (".pt", ".pkl") for f in tmp_path.iterdir())
