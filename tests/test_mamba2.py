"""Mamba2 backbone: the chunked SSD scan against a step-by-step recurrence, causality, padding, init,
chunk-size independence, autocast, and (on a CUDA machine with mamba_ssm) kernels vs pure PyTorch.

No test here touches the global RNG: inputs come from local generators, and parameter initialisation
runs inside `seeded_init` (the global state is forked and restored)."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

from pipeline.models.mamba2 import Mamba2, Mixer, kernels_available, ssd_chunked

C_EMBD = 32  # width of the small test models: d_inner 64, headdim 16 -> 4 heads


@contextlib.contextmanager
def seeded_init(seed: int = 0, cuda: bool = False):
    """Module construction with a fixed parameter initialisation, isolated from the global RNG."""
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
        torch.manual_seed(seed)
        yield


def randn(*shape, seed: int, dtype=torch.float64, device="cpu") -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype, device=device)


def small(bidirectional: bool = False, chunk_size: int = 8, dtype=torch.float64, **kw) -> Mamba2:
    with seeded_init(0):
        return Mamba2(n_layer=2, n_embd=C_EMBD, headdim=16, chunk_size=chunk_size, bidirectional=bidirectional,
                      kernels="torch", **kw).to(dtype)


def lengths_mask(lengths: list[int], N: int) -> torch.Tensor:
    return torch.arange(N)[None] < torch.tensor(lengths)[:, None]


def ssd_recurrence(x, dt, A, B, C):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T ; y_t = h_t C_t, per head, one step at a time."""
    b, l, nh, p = x.shape
    state = x.new_zeros(b, nh, p, B.shape[-1])
    ys = []
    for t in range(l):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]  # (b, h, 1, 1)
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, None, None, :]
        ys.append(torch.einsum("bhpn,bn->bhp", state, C[:, t]))
    return torch.stack(ys, 1)


def random_ssd_inputs(l=37, b=2, nh=3, p=4, n=5, dt_max=0.5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, nh, p, generator=g, dtype=dtype)
    dt = torch.rand(b, l, nh, generator=g, dtype=dtype) * dt_max
    A = -torch.empty(nh, dtype=dtype).uniform_(0.5, 16, generator=g)
    B = torch.randn(b, l, n, generator=g, dtype=dtype)
    C = torch.randn(b, l, n, generator=g, dtype=dtype)
    return x, dt, A, B, C


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 7, 8, 37, 64])
@pytest.mark.parametrize("dt_max", [0.5, 3.0])  # 3.0: decays down to exp(-48) per step
def test_ssd_chunked_matches_recurrence(chunk_size, dt_max):
    args = random_ssd_inputs(dt_max=dt_max)
    y = ssd_chunked(*args, chunk_size=chunk_size)
    assert y.shape == args[0].shape and y.dtype == torch.float64
    assert (y - ssd_recurrence(*args)).abs().max() <= 1e-10


def test_ssd_chunked_float32_and_autocast():
    args64 = random_ssd_inputs()
    ref = ssd_recurrence(*args64)
    args = [t.float() for t in args64]
    y = ssd_chunked(*args, chunk_size=8)
    assert y.dtype == torch.float32 and (y.double() - ref).abs().max() < 1e-4
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the scan must not drop to bf16 matmuls
        y_ac = ssd_chunked(*args, chunk_size=8)
    assert y_ac.dtype == torch.float32 and (y_ac - y).abs().max() < 1e-5


def test_causal_model_is_causal():
    m, t = small(), 10
    h = randn(2, 24, C_EMBD, seed=1)
    mask = torch.ones(2, 24, dtype=torch.bool)
    h2 = h.clone()
    h2[:, t + 1:] = randn(2, 24 - t - 1, C_EMBD, seed=2)
    out, out2 = m(h, mask)[0], m(h2, mask)[0]
    assert (out[:, :t + 1] - out2[:, :t + 1]).abs().max() <= 1e-12
    assert (out[:, t + 1:] - out2[:, t + 1:]).abs().max() > 1e-3


def test_bidirectional_sees_future_but_not_padding():
    m, t = small(bidirectional=True), 10
    mask = lengths_mask([24, 15], 24)
    h = randn(2, 24, C_EMBD, seed=3)
    h_future = h.clone()
    h_future[:, t + 1:] = randn(2, 24 - t - 1, C_EMBD, seed=4)
    out, out_future = m(h, mask)[0], m(h_future, mask)[0]
    assert (out[:, :t + 1] - out_future[:, :t + 1]).abs().max() > 1e-3  # not causal
    h_pad = h.clone()
    h_pad[1, 15:] = 100 * randn(9, C_EMBD, seed=5)  # change only padding content
    out_pad = m(h_pad, mask)[0]
    assert (out - out_pad)[mask].abs().max() <= 1e-12


@pytest.mark.parametrize("bidirectional", [False, True])
def test_padding_matches_truncation(bidirectional):
    m = small(bidirectional=bidirectional)
    mask = lengths_mask([24, 15], 24)
    h = randn(2, 24, C_EMBD, seed=6)
    out, _ = m(h, mask)
    out_trunc, _ = m(h[1:, :15], torch.ones(1, 15, dtype=torch.bool))
    assert (out[1, :15] - out_trunc[0]).abs().max() <= 1e-10
    out_full, _ = m(h[:1], mask[:1])
    assert (out[0] - out_full[0]).abs().max() <= 1e-10


def test_bidirectional_reversal_symmetry():
    """Reversing each row's real part and swapping the two mixers of every layer reverses the output."""
    m = small(bidirectional=True)
    m_swap = copy.deepcopy(m)
    for blk in m_swap.blocks:
        blk.mixer, blk.mixer_rev = blk.mixer_rev, blk.mixer
    lengths, N = [20, 13, 1], 20
    mask = lengths_mask(lengths, N)
    h = randn(3, N, C_EMBD, seed=7)
    h_rev = h.clone()
    for i, n in enumerate(lengths):
        h_rev[i, :n] = h[i, :n].flip(0)
    out, out_rev = m(h, mask)[0], m_swap(h_rev, mask)[0]
    for i, n in enumerate(lengths):
        assert (out[i, :n].flip(0) - out_rev[i, :n]).abs().max() <= 1e-10
    assert (out - m_swap(h, mask)[0])[mask].abs().max() > 1e-3  # the swap is not a no-op


@pytest.mark.parametrize("bidirectional", [False, True])
def test_shapes_hidden_and_gradients(bidirectional):
    n_layer, B, N = 3, 3, 19
    with seeded_init(0):
        m = Mamba2(n_layer=n_layer, n_embd=C_EMBD, headdim=16, chunk_size=8, bidirectional=bidirectional)
    mask = lengths_mask([19, 11, 4], N)
    h = randn(B, N, C_EMBD, seed=8, dtype=torch.float32)
    out, hidden = m(h, mask, return_hidden=True)
    assert out.shape == (B, N, C_EMBD) and torch.isfinite(out).all()
    assert len(hidden) == n_layer + 1 and all(t.shape == (B, N, C_EMBD) for t in hidden)
    assert hidden[0] is h and torch.allclose(out, m.norm_f(hidden[-1]))
    assert m(h, mask)[1] == []
    loss = (out * randn(*out.shape, seed=9, dtype=out.dtype))[mask].sum()
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def test_init():
    with seeded_init(0):
        m = Mamba2(n_layer=3, n_embd=64, headdim=8, bidirectional=True)  # 16 heads per mixer, 6 mixers
    mixers = [mod for mod in m.modules() if isinstance(mod, Mixer)]
    assert len(mixers) == 6
    for mix in mixers:
        dt = F.softplus(mix.dt_bias)
        assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)  # floor 1e-4 never binds
        minus_A = torch.exp(mix.A_log)
        assert minus_A.min() >= 1 - 1e-6 and minus_A.max() <= 16 + 1e-5
        assert torch.equal(mix.D, torch.ones(16))
        assert all(getattr(p, "_no_weight_decay", False) for p in (mix.dt_bias, mix.A_log, mix.D))
    dts = torch.cat([F.softplus(mix.dt_bias) for mix in mixers])
    assert dts.log().std() > 0.5  # spread log-uniformly over [1e-3, 0.1], not a constant


def test_chunk_size_independence():
    m8 = small(chunk_size=8, dtype=torch.float32)
    m64 = copy.deepcopy(m8)
    for mix in m64.modules():
        if isinstance(mix, Mixer):
            mix.chunk_size = 64
    mask = lengths_mask([50, 33], 50)
    h = randn(2, 50, C_EMBD, seed=10, dtype=torch.float32)
    out8, out64 = m8(h, mask)[0], m64(h, mask)[0]
    assert (out8 - out64)[mask].abs().max() <= 1e-5


def test_autocast_bf16_runs_close_to_fp32():
    m = small(dtype=torch.float32)
    mask = lengths_mask([20, 9], 20)
    h = randn(2, 20, C_EMBD, seed=11, dtype=torch.float32)
    ref = m(h, mask)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(h, mask)[0]
    assert torch.isfinite(out).all()
    assert (out.float() - ref)[mask].abs().max() < 0.1


def test_argument_errors():
    with pytest.raises(ValueError, match="headdim"):
        Mamba2(n_layer=1, n_embd=24, headdim=32)
    with pytest.raises(ValueError, match="kernels"):
        Mamba2(n_layer=1, n_embd=32, headdim=16, kernels="triton")
    m = Mamba2(n_layer=1, n_embd=32, headdim=16, kernels="cuda")
    with pytest.raises(RuntimeError, match="kernels='cuda'"):
        m(torch.zeros(1, 4, 32), torch.ones(1, 4, dtype=torch.bool))


@pytest.mark.skipif(not (torch.cuda.is_available() and kernels_available()), reason="needs CUDA and mamba_ssm")
@pytest.mark.parametrize("bidirectional", [False, True])
def test_cuda_kernels_match_torch(bidirectional):
    with seeded_init(0):
        m = Mamba2(n_layer=2, n_embd=64, headdim=32, chunk_size=64, bidirectional=bidirectional).cuda()
    mask = lengths_mask([100, 77, 3, 64], 100).cuda()
    h = randn(4, 100, 64, seed=12, dtype=torch.float32, device="cuda")
    results = {}
    for mode in ("cuda", "torch"):
        m.kernels = mode
        m.zero_grad()
        out = m(h, mask)[0]
        (out * torch.linspace(-1, 1, 64, device="cuda"))[mask].sum().backward()
        results[mode] = out.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}
    (out_k, grads_k), (out_t, grads_t) = results["cuda"], results["torch"]
    # Triton runs fp32 dots in tf32, hence a relative tolerance of a few 1e-3
    assert (out_k - out_t)[mask].abs().max() <= 3e-3 * out_t[mask].abs().max()
    for name, g in grads_t.items():
        assert (grads_k[name] - g).norm() <= 2e-2 * g.norm(), name
