"""The one network: family read-in -> backbone (models/backbone.py) -> family read-out per group.

Every family's network is this class; only the read-in (tokens from a batch) and the read-out
heads (one per group, e.g. per K) come from the family. Several groups' batches share one
backbone pass when their token sequences have the same length.

Also the adaptor that makes a trained network a Solver, and safe save/load (safetensors + JSON).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from pipeline.core import family as F
from pipeline.core.config import RunConfig
from pipeline.models.backbone import build_backbone


def group_key(group) -> str:
    return "main" if group is None else str(group)


class Network(nn.Module):
    def __init__(self, run: RunConfig):
        super().__init__()
        self.run = run
        fam = F.get(run.family)
        self.family = fam
        self.groups = list(fam.groups(run.task))
        self.read_in = fam.read_in(run.task, run.model)
        self.backbone = build_backbone(run.model)  # transformer | mamba2 | lstm: (h, mask) -> (states, hidden)
        self.read_out = nn.ModuleDict({group_key(g): fam.read_out(run.task, run.model, g) for g in self.groups})

    def encode(self, batch, return_hidden: bool = False) -> tuple[Tensor, Tensor, list[Tensor]]:
        """batch -> states (B, T, C), mask (B, T), per-layer states (n_layer + 1 of them, if asked)."""
        feats, mask = self.read_in.features(batch)  # (B, T, F) raw token features, (B, T)
        h, hidden = self.backbone(self.read_in(feats), mask, return_hidden)
        return h, mask, hidden

    def forward(self, batch, group=None):
        if group_key(group) not in self.read_out:
            raise ValueError(f"this network has read-outs for groups {self.groups}, not {group!r}")
        h, mask, _ = self.encode(batch)
        return self.read_out[group_key(group)](h, mask, batch)

    def forward_many(self, batches: dict) -> dict:
        """{group: batch} -> {group: output}: the groups' tokens are concatenated for one read-in and
        one backbone pass when their shapes agree (they do when the family pads them alike)."""
        feats = {g: self.read_in.features(b) for g, b in batches.items()}
        if len({f.shape[1:] for f, _ in feats.values()}) != 1:
            out = {}
            for g, (f, m) in feats.items():
                h, _ = self.backbone(self.read_in(f), m)
                out[g] = self.read_out[group_key(g)](h, m, batches[g])
            return out
        gs = list(batches)
        f = torch.cat([feats[g][0] for g in gs])
        mask = torch.cat([feats[g][1] for g in gs])
        h, _ = self.backbone(self.read_in(f), mask)
        out, start = {}, 0
        for g in gs:
            stop = start + feats[g][0].shape[0]
            out[g] = self.read_out[group_key(g)](h[start:stop], mask[start:stop], batches[g])
            start = stop
        return out


def count_parameters(run: RunConfig) -> int:
    """Trainable parameters of Network(run), built on the CPU. (Not the meta device: its first use
    costs 1.5 s of lazy initialisation in every command that resolves the plan; these networks
    take milliseconds to build.)"""
    with torch.device("cpu"):
        net = Network(run)
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


class NetworkSolver:
    """A trained network answering through the Solver interface (the family decodes its output)."""

    def __init__(self, net: Network, name: str = "network"):
        self.net, self.name = net, name

    @torch.no_grad()
    def __call__(self, batch):
        self.net.eval()
        p = next(self.net.parameters())
        b = batch.to(p.device, p.dtype)
        group = self.net.family.group_of(b)
        return self.net.family.decode(self.net(b, group), b)


def save_network(net: Network, path: str | Path, meta: dict | None = None) -> None:
    """Weights as safetensors + the run as JSON next to it (no pickle anywhere)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps({"run": net.run.to_dict(), **(meta or {})}, indent=2) + "\n")


def load_network(path: str | Path, device: torch.device | str = "cpu", expect_fingerprint: str | None = None,
                 rerun: str = "run the train stage first") -> Network:
    """Load a trained network; with expect_fingerprint, refuse one trained with other params or code."""
    from safetensors.torch import load_file

    from pipeline.core.config import ConfigError

    path = Path(path)
    spec_path = path.with_suffix(".json")
    for p in (path, spec_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: trained network not found ({rerun})")
    try:
        spec = json.loads(spec_path.read_text())
        run = RunConfig.from_dict(spec["run"], where=str(spec_path))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{spec_path}: not a network description ({type(e).__name__}); {rerun}") from None
    if expect_fingerprint is not None and spec.get("fingerprint") != expect_fingerprint:
        raise ConfigError(f"{path}: was trained with other params or code (fingerprint {spec.get('fingerprint')}, "
                          f"the plan says {expect_fingerprint}); {rerun}")
    net = Network(run)
    try:
        net.load_state_dict(load_file(str(path), device="cpu"))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ConfigError(f"{path}: unreadable or mismatched weights ({type(e).__name__}); {rerun}") from None
    return net.to(device).eval()
