"""`bench --vs-anchor`: the project's TGMM train step against a model built the anchor's way.

The anchor (Chen, Wu, Fang 2025, public TGMM code) builds its network from Hugging Face's
`GPT2Model` (causal, learned positions, Conv1D projections, tanh-GELU), a linear read-in of
[x_i ; embed(K)] and one attentive-pooling head per K (learned queries; k/v projections; the
weight logits are the mean over the queries of their first K outputs). `AnchorStyle` rebuilds that
model for timing only (written here, not copied), with the pooling mask applied to the padding.

Both models get the same tasks (the family's sampler, same seed and step), the same loss (the
family's permutation-matched loss), AdamW, and gradient clipping at train.grad_clip. Steps
alternate between the two models in one process, so drift in the machine's speed hits both alike.
`transformers` is a bench extra (`pip install -e ".[bench]"`), never a runtime dependency.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The TGMM paper's model and batch: 12 layers, 4 heads, width 128; d = 8, N0 = 128; 64 tasks per K.
PAPER_SIZE = {"model": {"backbone": "transformer", "n_layer": 12, "n_head": 4, "n_embd": 128},
              "task": {"d": 8, "n0": 128, "ks": [2, 3, 4, 5]}, "train": {"batch_size": 64}}


class AttentivePooling(nn.Module):
    """n_out learned queries attend over the sample (k/v projections); output (B, n_out, d_out)."""

    def __init__(self, d_in: int, d_out: int, n_out: int):
        super().__init__()
        self.q = nn.Parameter(torch.randn(n_out, d_out))
        self.k_proj = nn.Linear(d_in, d_out, bias=False)
        self.v_proj = nn.Linear(d_in, d_out, bias=False)

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        k, v = self.k_proj(h), self.v_proj(h)  # (B, N, d_out)
        scores = (k @ self.q.T).masked_fill(~mask[..., None], float("-inf"))  # (B, N, n_out)
        w = F.softmax(scores, dim=1)
        return torch.einsum("bld,bln->bldn", v, w).sum(dim=1).permute(0, 2, 1)  # (B, n_out, d_out)


class AnchorStyle(nn.Module):
    def __init__(self, d: int, ks: list[int], n_layer: int, n_embd: int, n_head: int, n_positions: int,
                 k_embd: int):
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        cfg = GPT2Config(n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
        self.d = d
        self.k_embed = nn.Embedding(max(ks) + 1, k_embd)
        self.read_in = nn.Linear(d + k_embd, n_embd)
        self.gpt2 = GPT2Model(cfg)
        self.heads = nn.ModuleDict({str(K): AttentivePooling(n_embd, K + d, K) for K in ks})

    def forward_many(self, batches: dict) -> dict:
        """{K: GMMBatch} -> {K: (logits (B, K), means (B, K, d), None)}: one backbone pass over all K."""
        xs, ks, masks = [], [], []
        for K, b in batches.items():
            xs.append(b.x)
            ks.append(torch.full((b.B,), K, dtype=torch.long, device=b.x.device))
            masks.append(b.mask)
        x, k, mask = torch.cat(xs), torch.cat(ks), torch.cat(masks)
        feats = torch.cat([x, self.k_embed(k)[:, None].expand(-1, x.shape[1], -1)], -1)
        h = self.gpt2(inputs_embeds=self.read_in(feats), attention_mask=mask.long()).last_hidden_state
        out, start = {}, 0
        for K, b in batches.items():
            sl = slice(start, start + b.B)
            o = self.heads[str(K)](h[sl], mask[sl])  # (B, K, K + d)
            out[K] = (o[..., :K].mean(1), o[..., K:], None)
            start += b.B
        return out


def paper_size_run(run):
    """The TGMM paper's model and batch on top of a resolved gmm run (seed, task distribution kept)."""
    from pipeline.core.config import RunConfig, deep_merge

    return RunConfig.from_dict(deep_merge(run.to_dict(), PAPER_SIZE), where="bench --vs-anchor")


def _step_fn(forward_many, loss_fn, params, lr: float, clip: float, autocast: bool):
    opt = torch.optim.AdamW(params, lr=lr)

    def step(batches_fn, i):
        batches = batches_fn(i)
        with torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", dtype=torch.bfloat16,
                            enabled=autocast):
            outs = forward_many(batches)
        loss = torch.stack([loss_fn(o, batches[g])["loss"] for g, o in outs.items()]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        return loss

    return step


def run(run_cfg, steps: int = 6, warmup: int = 2, device: str = "cpu", precision: str | None = None) -> dict:
    """Time `steps` alternating train steps of the project's network and the anchor-style model."""
    from pipeline.core.module import TaskModule
    from pipeline.core.network import count_parameters

    try:
        import transformers  # noqa: F401
    except ImportError:
        raise SystemExit("error: bench --vs-anchor needs the `transformers` package "
                         "(pip install -e \".[bench]\"); it is a bench extra, not a runtime dependency")
    r = paper_size_run(run_cfg)
    dev = torch.device(device)
    ours = TaskModule(r.to_dict()).to(dev)
    ours_prec = precision or ours.resolved_precision()
    t = r.task
    anchor = AnchorStyle(t.d, list(t.ks), r.model.n_layer, r.model.n_embd, r.model.n_head, t.n0, t.k_embd).to(dev)
    fam = ours.family
    loss_fn = lambda out, b: fam.loss(out, b, t)  # noqa: E731
    step_ours = _step_fn(ours.net.forward_many, loss_fn, list(ours.parameters()), r.train.lr, r.train.grad_clip,
                         ours_prec.startswith("bf16"))
    step_anchor = _step_fn(anchor.forward_many, loss_fn, list(anchor.parameters()), r.train.lr, r.train.grad_clip,
                           False)
    n_tasks = r.train.batch_size * len(ours.net.groups)
    print(f"paper size: {r.model.n_layer} layers x {r.model.n_head} heads x width {r.model.n_embd}; d = {t.d}, "
          f"N ~ U[{t.n0 // 2}, {t.n0}]; {r.train.batch_size} tasks per K x {len(ours.net.groups)} K = {n_tasks} "
          f"tasks per step | threads {torch.get_num_threads()}")
    print(f"  project  {count_parameters(r):>10,} params  precision {ours_prec}")
    unused = anchor.gpt2.wte.weight.numel()  # GPT2Model's token embedding: inputs_embeds bypass it
    print(f"  anchor   {sum(p.numel() for p in anchor.parameters()) - unused:>10,} params  precision 32-true "
          f"(HF GPT2Model, as the anchor trains; its unused {unused:,}-parameter token embedding not counted)")
    times = {"project": [], "anchor": []}
    sample = lambda i: ours.training_tasks(i, 0, 1)  # noqa: E731  (the same tasks for both, sampled in the step)
    for i in range(warmup + steps):
        for name, fn in (("project", step_ours), ("anchor", step_anchor)):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            fn(sample, i)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k in ("project", "anchor"):
        print(f"  {k:<8} {med[k]:7.3f} s/step (median of {steps})  {n_tasks / med[k]:7.1f} tasks/s")
    # Paired: both models run the same step's tasks (the same sample size N, drawn per step) back to
    # back, so the per-step ratio cancels N and the machine's drift; its median is the figure.
    ratios = sorted(a / p for p, a in zip(times["project"], times["anchor"]))
    ratio = statistics.median(ratios)
    print(f"  speed-up of the project's step over the anchor-style step: {ratio:.2f}x (median of the {steps} "
          f"per-step ratios, range {ratios[0]:.2f}-{ratios[-1]:.2f}; ratio of the medians "
          f"{med['anchor'] / med['project']:.2f}x)")
    return {"project_s": med["project"], "anchor_s": med["anchor"], "speedup": ratio, "precision": ours_prec,
            "ratios": ratios}
