"""The backbone's symmetry (set: permutation-equivariant; gpt2: causal), the matched loss, model IO."""
import torch

from pipeline.config import ModelConfig
from pipeline.models.tgmm import NetworkSolver, TGMMNet, load_network, matched_loss, save_network, _perms
from pipeline.models.transformer import Transformer
from pipeline.tasks.gmm import make_generator, sample_gmm



def _net(position="set", d=3, ks=(2, 3, 4)):
    torch.manual_seed(0)
    return TGMMNet(d, list(ks), ModelConfig(n_layer=2, n_head=2, n_embd=16, k_embd=4, position=position,
                                            max_len=64)).double().eval()


def test_set_backbone_is_permutation_equivariant_with_padding():
    torch.manual_seed(0)
    bb = Transformer(n_layer=3, n_embd=16, n_head=4, position="set").double().eval()
    B, N = 3, 12
    h = torch.randn(B, N, 16, dtype=torch.float64)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 9:] = False  # task 1 has 9 real points
    out, hidden = bb(h, mask, return_hidden=True)
    assert len(hidden) == 4 and all(t.shape == (B, N, 16) for t in hidden)
    for b in range(B):
        n = int(mask[b].sum())
        perm = torch.randperm(n)
        hp = h[b:b + 1].clone()
        hp[0, :n] = h[b, perm]
        outp, _ = bb(hp, mask[b:b + 1])
        torch.testing.assert_close(outp[0, :n], out[b, perm], rtol=0, atol=1e-10)
    # padded positions do not influence real ones
    h2 = h.clone()
    h2[1, 9:] = 1e3 * torch.randn(3, 16, dtype=torch.float64)
    out2, _ = bb(h2, mask)
    torch.testing.assert_close(out2[1, :9], out[1, :9], rtol=0, atol=1e-10)


def test_tgmm_estimate_is_invariant_to_sample_order():
    net = _net("set")
    b = sample_gmm(4, 3, 3, 20, 20, make_generator(0, 1))
    b = b.to("cpu", torch.float64)
    logits, means, _ = net(b.x, b.mask, 3)
    perm = torch.randperm(20)
    logits2, means2, _ = net(b.x[:, perm], b.mask[:, perm], 3)
    torch.testing.assert_close(logits2, logits, rtol=0, atol=1e-10)
    torch.testing.assert_close(means2, means, rtol=0, atol=1e-10)


def test_gpt2_mode_is_causal_and_order_dependent():
    torch.manual_seed(0)
    bb = Transformer(n_layer=2, n_embd=16, n_head=2, position="gpt2", max_len=32).double().eval()
    h = torch.randn(2, 10, 16, dtype=torch.float64)
    mask = torch.ones(2, 10, dtype=torch.bool)
    out, _ = bb(h, mask)
    h2 = h.clone()
    h2[:, 6:] = torch.randn(2, 4, 16, dtype=torch.float64)  # change later inputs only
    out2, _ = bb(h2, mask)
    torch.testing.assert_close(out2[:, :6], out[:, :6], rtol=0, atol=1e-12)
    assert not torch.allclose(out2[:, 6:], out[:, 6:])
    out3, _ = bb(h.flip(1), mask)  # positions make it order-dependent
    assert not torch.allclose(out3.flip(1), out)


def test_matched_loss_zero_at_truth_and_invariant_to_component_order():
    b = sample_gmm(5, 2, 4, 10, 10, make_generator(0, 2)).to("cpu", torch.float64)
    logits = torch.log(b.weights)
    out = matched_loss(logits, b.means, b)
    assert float(out["loss"]) < 1e-12 and float(out["l2"]) < 1e-12
    noisy_means = b.means + 0.3 * torch.randn_like(b.means)
    noisy_logits = logits + 0.2 * torch.randn_like(logits)
    ref = matched_loss(noisy_logits, noisy_means, b)
    for p in _perms(4):  # every relabelling of the prediction, 3-cycles included
        out = matched_loss(noisy_logits[:, p], noisy_means[:, p], b)
        torch.testing.assert_close(out["loss"], ref["loss"])
        torch.testing.assert_close(out["l2"], ref["l2"])
    # sorting by weight (the anchor's pairing) can only be worse than the best matching
    order_pred, order_true = noisy_logits.argsort(1), b.weights.argsort(1)
    sorted_mse = (torch.gather(noisy_means, 1, order_pred[..., None].expand(-1, -1, 2))
                  - torch.gather(b.means, 1, order_true[..., None].expand(-1, -1, 2))).pow(2).mean()
    assert float(ref["mse"]) <= float(sorted_mse) + 1e-12


def test_network_solver_and_safetensors_roundtrip(tmp_path):
    net = _net("set").float()
    path = tmp_path / "m.safetensors"
    save_network(net, path, meta={"global_step": 7})
    net2 = load_network(path)
    b = sample_gmm(3, 3, 2, 8, 16, make_generator(0, 3))
    e1, e2 = NetworkSolver(net)(b), NetworkSolver(net2)(b)
    torch.testing.assert_close(e1.means, e2.means, rtol=0, atol=0)
    assert e1.weights.shape == (3, 2) and torch.allclose(e1.weights.sum(1), torch.ones(3))
    assert not any(f.suffix in (".pt", ".pkl") for f in tmp_path.iterdir())
