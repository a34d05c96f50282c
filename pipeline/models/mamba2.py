"""Mamba2 backbone (state-spaces/mamba `Mamba2`, one B/C group) in plain PyTorch, with the mamba-ssm
Triton kernels used when they are installed and the input is on CUDA.

Each layer is a pre-norm residual block h = h + Mixer(RMSNorm(h)) with no MLP (the official Mamba2 LM
with d_intermediate=0), and a final RMSNorm norm_f. The mixer is the selective SSM with one scalar decay
per head:
    in_proj(u) -> z, xBC, dt;  xBC -> causal depthwise conv -> SiLU -> x, B, C;  dt = softplus(dt + dt_bias)
    y = SSD(x, dt, A, B, C) + D x;  y = RMSNorm(y * silu(z));  out = out_proj(y)
SSD is the chunked state-space-duality scan (`ssd_chunked`): an attention-like quadratic form inside
chunks and a linear recurrence over chunk states between them, with no Python loop over time steps.

Order and causality. Mamba2 reads the sample in the order given. The sampler emits i.i.d. points in a
random order, so the order carries no information. But the backbone is causal, unlike the `set`
transformer: token t sees only tokens <= t, so only the last real token has seen the whole sample.
The read-out head attends over all positions, so it can still use every token. Padding is always at the
end of a row, so real positions never read it and the mixer needs no mask (the mask is used only to
find each row's real length in bidirectional mode). Padded positions compute values that nothing real reads.

bidirectional=True gives each layer a second mixer with its own parameters. It runs on each row reversed
within its real length (the padding stays at the end, so it is still never read), and its output,
reversed back, is added to the forward mixer's. Every token then sees the whole sample, and the model is
no longer causal. The paper's Mamba2 is causal (the default).

kernels: "torch" forces the pure path. "cuda" uses mamba_ssm's `mamba_chunk_scan_combined` (plus
`causal_conv1d_fn` when installed) and raises if they are missing. "auto" uses them when the input is on
CUDA (float32/16) and mamba_ssm imports. Both paths compute the same function.

Init follows the official code: dt log-uniform in [1e-3, 0.1] (via dt_bias), A ~ -U(1, 16), D = 1, and
out_proj scaled by 1/sqrt(number of residual branches), as in the Mamba LM's prenorm-residual rescale.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.backbone import reverse_within_length

KERNEL_MODES = ("auto", "torch", "cuda")


@functools.cache
def _load_kernels():
    """(mamba_chunk_scan_combined, causal_conv1d_fn or None), or None if mamba_ssm does not import."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:  # not installed, or installed but broken (no CUDA, triton mismatch, ...)
        return None
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:
        causal_conv1d_fn = None
    return mamba_chunk_scan_combined, causal_conv1d_fn


def kernels_available() -> bool:
    """True when the mamba-ssm Triton scan imports (it still needs a CUDA input to run)."""
    return _load_kernels() is not None


def _segsum(a: Tensor) -> Tensor:
    """a (..., T) -> S (..., T, T): S[i, j] = a[j+1] + ... + a[i] for j <= i (0 on the diagonal), -inf above.
    Summed directly rather than as a difference of cumsums, so it stays exact over long spans."""
    T = a.shape[-1]
    tril = torch.ones(T, T, dtype=torch.bool, device=a.device).tril()
    s = a[..., None].expand(*a.shape, T).masked_fill(~tril.tril(-1), 0).cumsum(-2)  # row i: sum a[j+1..i]
    return s.masked_fill(~tril, -math.inf)


def ssd_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int) -> Tensor:
    """Chunked SSD scan (the official `ssd_minimal_discrete`, one B/C group shared by all heads) of
        h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,   y_t = h_t C_t   (per head, h_0 = 0).
    x (b, l, h, p), dt (b, l, h), A (h,), B and C (b, l, n) -> y (b, l, h, p) in x's dtype.
    Computed in float32 at least, with autocast off. A length that is not a multiple of the chunk is
    padded at the end with dt = 0 (no decay, no input) and trimmed. Within a chunk the decays are
    exp(cumsum difference), as in the Triton kernels; between chunks they use the exact `_segsum`."""
    b, l, nh, p = x.shape
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in (x, dt, A, B, C)), torch.float32)
    q = min(chunk_size, l)  # chunk length
    pad = -l % q
    c = (l + pad) // q  # number of chunks
    with torch.autocast(x.device.type, enabled=False):
        dt = dt.to(dtype)
        X = x.to(dtype) * dt[..., None]  # discretized input
        dA = dt * A.to(dtype)  # (b, l, h) log decay per step
        B, C = B.to(dtype), C.to(dtype)
        if pad:
            X, dA, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (X, dA, B, C))
        X = X.view(b, c, q, nh, p).transpose(2, 3)  # (b, c, h, q, p)
        B, C = B.view(b, c, q, -1), C.view(b, c, q, -1)  # (b, c, q, n)
        cum = dA.view(b, c, q, nh).transpose(2, 3).cumsum(-1)  # (b, c, h, q)
        # 1. within chunks: y_l = sum_{s<=l} (C_l . B_s) exp(dA_{s+1} + ... + dA_l) X_s
        causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
        decay = torch.exp((cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, -math.inf))  # (b, c, h, q, q)
        y = ((C @ B.transpose(2, 3))[:, :, None] * decay) @ X  # (b, c, h, q, p)
        # 2. each chunk's own contribution to the state at its end
        X_end = X * torch.exp(cum[..., -1:] - cum)[..., None]  # inputs decayed to the chunk end
        states = X_end.transpose(3, 4) @ B[:, :, None]  # (b, c, h, p, n)
        # 3. recurrence over chunks: the state entering each chunk
        states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)  # (b, c+1, h, p, n)
        chunk_decay = torch.exp(_segsum(F.pad(cum[..., -1].transpose(1, 2), (1, 0))))  # (b, h, c+1, c+1)
        states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)[:, :-1]  # (b, c, h, p, n)
        # 4. entering state -> outputs, decayed to each position
        y = y + (C[:, :, None] @ states.transpose(3, 4)) * torch.exp(cum)[..., None]  # (b, c, h, q, p)
    return y.transpose(2, 3).reshape(b, c * q, nh, p)[:, :l].to(x.dtype)


def causal_depthwise_conv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x (B, N, C), weight (C, 1, w), bias (C,) -> (B, N, C): what Conv1d(groups=C, padding=w-1) computes
    on the first N positions, written as w shifted multiply-adds. On a CPU this is 10x faster than
    mkldnn's depthwise convolution backward, which took 16 % of the Mamba2 train step."""
    w = weight.shape[-1]
    xp = F.pad(x, (0, 0, w - 1, 0))  # (B, N + w - 1, C): w - 1 zeros before the first position
    N = x.shape[1]
    y = xp[:, 0:N] * weight[:, 0, 0]
    for j in range(1, w):
        y = y + xp[:, j:j + N] * weight[:, 0, j]
    return y if bias is None else y + bias


class GatedRMSNorm(nn.Module):
    """Official RMSNormGated with norm_before_gate=False: rmsnorm(y * silu(z)) * weight, in float32 or wider."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        dtype = torch.promote_types(z.dtype, torch.float32)
        g = y.to(dtype) * F.silu(z.to(dtype))
        return F.rms_norm(g, g.shape[-1:], self.weight.to(dtype), self.eps).to(z.dtype)


class Mixer(nn.Module):
    """The Mamba2 mixer (official `Mamba2Simple` with ngroups=1): (B, N, C) -> (B, N, C), causal."""

    def __init__(self, n_embd: int, d_state: int, d_conv: int, expand: int, headdim: int, chunk_size: int,
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4):
        super().__init__()
        d_inner = expand * n_embd
        if d_inner % headdim:
            raise ValueError(f"d_inner = expand * n_embd = {expand} * {n_embd} = {d_inner} "
                             f"is not divisible by headdim = {headdim}")
        self.d_inner, self.d_state, self.headdim, self.chunk_size = d_inner, d_state, headdim, chunk_size
        self.nheads = nh = d_inner // headdim
        self.in_proj = nn.Linear(n_embd, 2 * d_inner + 2 * d_state + nh, bias=False)  # -> z, xBC, dt
        conv_dim = d_inner + 2 * d_state
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1, bias=True)
        # official init: dt log-uniform in [dt_min, dt_max], dt_bias = softplus^-1(dt); A ~ U(1, 16); D = 1
        dt = torch.exp(torch.rand(nh) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.empty(nh).uniform_(1, 16).log())
        self.D = nn.Parameter(torch.ones(nh))
        for param in (self.dt_bias, self.A_log, self.D):
            param._no_weight_decay = True
        self.norm = GatedRMSNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, n_embd, bias=False)

    def forward(self, u: Tensor, kernels: tuple | None) -> Tensor:
        N = u.shape[1]
        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.d_inner + 2 * self.d_state, self.nheads], dim=-1)
        A = -torch.exp(self.A_log)  # (h,)
        conv_fn = kernels[1] if kernels is not None and self.conv1d.kernel_size[0] in (2, 3, 4) else None
        if conv_fn is not None:
            xBC = conv_fn(xBC.transpose(1, 2).contiguous(), self.conv1d.weight.squeeze(1), self.conv1d.bias,
                          activation="silu").transpose(1, 2)
        else:
            xBC = F.silu(causal_depthwise_conv(xBC, self.conv1d.weight, self.conv1d.bias))
        x, B, C = xBC.split([self.d_inner, self.d_state, self.d_state], dim=-1)  # (B, N, d_inner), (B, N, n) x2
        x = x.unflatten(-1, (self.nheads, self.headdim))  # (B, N, h, p)
        if kernels is not None:  # softplus(dt + dt_bias) and + D x happen inside the kernel
            y = kernels[0](x, dt, A.float(), B.unsqueeze(2), C.unsqueeze(2), chunk_size=self.chunk_size,
                           D=self.D, dt_bias=self.dt_bias, dt_softplus=True)
        else:
            dt = F.softplus(dt + self.dt_bias)  # (B, N, h)
            y = ssd_chunked(x, dt, A, B, C, self.chunk_size) + x * self.D[:, None]
        return self.out_proj(self.norm(y.flatten(2), z))


class Block(nn.Module):
    def __init__(self, n_embd: int, bidirectional: bool, **mixer_kw):
        super().__init__()
        self.norm = nn.RMSNorm(n_embd, eps=1e-5)
        self.mixer = Mixer(n_embd, **mixer_kw)
        self.mixer_rev = Mixer(n_embd, **mixer_kw) if bidirectional else None

    def forward(self, h: Tensor, mask: Tensor, kernels: tuple | None) -> Tensor:
        u = self.norm(h)
        y = self.mixer(u, kernels)
        if self.mixer_rev is not None:  # reverse each row's real points, scan, reverse back
            y = y + reverse_within_length(self.mixer_rev(reverse_within_length(u, mask), kernels), mask)
        return h + y


class Mamba2(nn.Module):
    """Token sequence (B, N, C) + mask (B, N) -> final states (B, N, C) and per-layer states."""

    def __init__(self, n_layer: int, n_embd: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 headdim: int = 32, chunk_size: int = 64, bidirectional: bool = False, kernels: str = "auto"):
        super().__init__()
        if kernels not in KERNEL_MODES:
            raise ValueError(f"kernels must be one of {KERNEL_MODES}, got {kernels!r}")
        self.kernels, self.bidirectional = kernels, bidirectional
        self.blocks = nn.ModuleList(
            Block(n_embd, bidirectional, d_state=d_state, d_conv=d_conv, expand=expand, headdim=headdim,
                  chunk_size=chunk_size) for _ in range(n_layer))
        self.norm_f = nn.RMSNorm(n_embd, eps=1e-5)
        # official prenorm-residual rescale: out_proj / sqrt(residual branches added to the stream)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, Mixer):
                    m.out_proj.weight /= math.sqrt((2 if bidirectional else 1) * n_layer)

    def _resolve_kernels(self, h: Tensor) -> tuple | None:
        if self.kernels == "torch" or (self.kernels == "auto" and (not h.is_cuda or h.dtype == torch.float64)):
            return None
        k = _load_kernels()
        if k is None or not h.is_cuda:
            if self.kernels == "cuda":
                raise RuntimeError("Mamba2(kernels='cuda') needs a CUDA input and an importable mamba_ssm "
                                   f"(input on {h.device}, mamba_ssm importable: {k is not None}); "
                                   "use kernels='torch' or 'auto' for the pure-PyTorch path")
            return None
        return k

    def forward(self, h: Tensor, mask: Tensor, return_hidden: bool = False) -> tuple[Tensor, list[Tensor]]:
        kernels = self._resolve_kernels(h)
        hidden = [h] if return_hidden else []
        for block in self.blocks:  # causal direction: padding (at the end) is never read
            h = block(h, mask, kernels)
            if return_hidden:
                hidden.append(h)
        return self.norm_f(h), hidden
