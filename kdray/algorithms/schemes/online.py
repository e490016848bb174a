"""Online distillation: peers learn together, each taught by the others (no pre-trained teacher).

- DML (Zhang et al., CVPR 2018, "Deep Mutual Learning"): peer i minimises
  ``CE(p_i, y) + 1/(K-1) * sum_{j != i} KL(p_j || p_i)`` with the other peers' predictions held fixed.
  The paper updates peers one after another within a step; like most implementations we update them
  simultaneously from one forward pass, which is what lets peers live on different workers.
- Peer-ensemble teacher (ONE, Lan et al. NeurIPS 2018; KDCL, Guo et al. CVPR 2020): the mean of the peer
  logits (detached) teaches every peer with ``T^2 * KL(softmax(mean/T) || softmax(z_i/T))``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.algorithms.base import Batch
from kdray.algorithms.response.kd import kl_div_with_temperature

ONLINE_MODES = ("dml", "ensemble")


def peer_loss(index: int, all_logits: list[torch.Tensor], targets: torch.Tensor, mode: str = "dml",
              weight: float = 1.0, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """Losses of peer ``index`` given every peer's logits (others are used detached)."""
    own = all_logits[index]
    others = [z.detach() for j, z in enumerate(all_logits) if j != index]
    if not others:
        raise ValueError("online distillation needs at least 2 peers")
    if mode == "dml":
        soft = sum(kl_div_with_temperature(own, z, temperature) for z in others) / len(others)
    elif mode == "ensemble":
        ensemble = torch.stack([z.detach() for z in all_logits]).mean(0)
        soft = kl_div_with_temperature(own, ensemble, temperature)
    else:
        raise ValueError(f"unknown online mode {mode!r}; allowed: {', '.join(ONLINE_MODES)}")
    return {"ce": F.cross_entropy(own, targets), mode: weight * soft}


class PeerCohort(nn.Module):
    """All K peers in one process: one forward per peer, each peer's loss from the others' logits.

    ``forward`` returns peer 0's logits and the summed, per-peer-named losses; since each peer's loss
    only reaches its own parameters, one optimizer over the cohort equals K separate optimizers.
    """

    def __init__(self, peers: list[nn.Module], mode: str = "dml", weight: float = 1.0, temperature: float = 1.0):
        super().__init__()
        if len(peers) < 2:
            raise ValueError(f"online distillation needs at least 2 peers, got {len(peers)}")
        self.peers = nn.ModuleList(peers)
        self.mode, self.weight, self.temperature = mode, weight, temperature

    def set_epoch(self, epoch: int) -> None:
        pass

    def forward(self, batch: Batch, teacher_out=None):
        logits = [peer(batch.inputs) for peer in self.peers]
        losses: dict[str, torch.Tensor] = {}
        for i in range(len(self.peers)):
            for key, value in peer_loss(i, logits, batch.targets, self.mode, self.weight, self.temperature).items():
                losses[f"peer{i}_{key}"] = value
        return logits[0], losses


class PeerReplica(nn.Module):
    """One peer of a cohort whose peers sit on different workers (one peer per rank).

    Every rank reads the same batch; ``gather`` (supplied by the orchestrator, e.g. an ``all_gather``)
    returns all peers' logits in rank order, the own entry keeping its graph.
    """

    def __init__(self, peer: nn.Module, index: int, gather, mode: str = "dml", weight: float = 1.0,
                 temperature: float = 1.0):
        super().__init__()
        self.peer, self.index, self.gather = peer, index, gather
        self.mode, self.weight, self.temperature = mode, weight, temperature

    def set_epoch(self, epoch: int) -> None:
        pass

    def forward(self, batch: Batch, teacher_out=None):
        own = self.peer(batch.inputs)
        logits = self.gather(own)
        logits[self.index] = own
        losses = peer_loss(self.index, logits, batch.targets, self.mode, self.weight, self.temperature)
        return own, {f"peer{self.index}_{k}": v for k, v in losses.items()}
