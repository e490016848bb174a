"""Online distillation: peers learn together, each taught by the others (no pre-trained teacher).

- DML (Zhang et al., CVPR 2018, "Deep Mutual Learning"): peer i minimises
  ``CE(p_i, y) + 1/(K-1) * sum_{j != i} KL(p_j || p_i)`` with the other peers' predictions held fixed.
  The paper updates peers one after another within a step; like most implementations we update them
  simultaneously from one forward pass, which is what lets peers live on different workers.
- Peer-ensemble teacher (ONE, Lan et al. NeurIPS 2018; KDCL, Guo et al. CVPR 2020): the mean of the peer
  logits (detached) teaches every peer with ``T^2 * KL(softmax(mean/T) || softmax(z_i/T))``.
- Any feature / relation term of the catalogue can be added between peers: peer i gets its own instance
  of each term (own connectors) for every other peer j, with j's features (detached) as the teacher's,
  averaged over j like the DML term. Peers of different architectures resolve their feature points
  (``stages`` / ``embedding``) against their own models.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput
from kdray.algorithms.distiller import expand_points, forward_with_features, select_points
from kdray.algorithms.packing import OutputLayout
from kdray.algorithms.precision import autocast_off, full_precision
from kdray.algorithms.response.kd import kl_div_with_temperature
from kdray.models.features import FeatureTap, resolve_points

ONLINE_MODES = ("dml", "ensemble")
TermFactory = Callable[[], list[KnowledgeTerm]]


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
    return {"ce": F.cross_entropy(full_precision(own), targets), mode: weight * soft}


def _links(models: list[nn.Module], index: int, make_terms: TermFactory | None) -> nn.ModuleDict:
    """Peer ``index``'s terms per other peer ``j`` (key ``str(j)``), feature points resolved per model."""
    links = nn.ModuleDict()
    if make_terms is None:
        return links
    for j, other in enumerate(models):
        if j == index:
            continue
        terms = make_terms()
        for term in terms:
            if term.provides_ce:
                raise ValueError(f"method {term.name!r} includes the hard-label CE; between peers the logit "
                                 f"loss is online.mode/weight/temperature: list feature or relation methods")
            term.student_points = expand_points(models[index], term.student_points or term.default_student_points,
                                                f"peer {index}")
            term.teacher_points = expand_points(other, term.teacher_points or term.default_teacher_points,
                                                f"peer {j}")
            resolve_points(models[index], term.student_points, f"peer {index} (student of peer {j}, {term.name})")
            resolve_points(other, term.teacher_points, f"peer {j} (teacher of peer {index}, {term.name})")
        links[str(j)] = nn.ModuleList(terms)
    return links


class PeerPlan:
    """Which features each peer computes (``capture``) and hands to the others (``export``), learned from
    the term instances of every peer; the same on every rank, so ranks can size their exchanges."""

    def __init__(self, links: list[nn.ModuleDict]):
        k = len(links)
        self.export: list[list[str]] = [[] for _ in range(k)]
        self.capture: list[list[str]] = [[] for _ in range(k)]
        for i, row in enumerate(links):
            for j, terms in row.items():
                for term in terms:
                    self.capture[i] += term.student_points
                    self.export[int(j)] += term.teacher_points
        self.export = [list(dict.fromkeys(e)) for e in self.export]
        self.capture = [list(dict.fromkeys(c + e)) for c, e in zip(self.capture, self.export)]


class PeerLearner(nn.Module):
    """One peer and what it learns: the mutual logit loss plus its terms towards each other peer."""

    def __init__(self, peer: nn.Module, index: int, links: nn.ModuleDict, capture: list[str], mode: str,
                 weight: float, temperature: float):
        super().__init__()
        self.peer, self.index, self.links = peer, index, links
        self.mode, self.weight, self.temperature = mode, weight, temperature
        self._tap = FeatureTap(peer, capture, role=f"peer {index}") if capture else None

    def run(self, inputs: torch.Tensor) -> ModelOutput:
        return forward_with_features(self.peer, self._tap, inputs)

    def set_epoch(self, epoch: int) -> None:
        for terms in self.links.values():
            for term in terms:
                term.set_epoch(epoch)

    @torch.no_grad()
    def build(self, outs: list[ModelOutput], num_samples: int, seed: int = 0) -> None:
        """Create this peer's connectors; their initialisation depends on ``(seed, index)`` only, so a
        peer gets the same connectors in one process and on its own worker."""
        outs = [o.in_full_precision() for o in outs]  # connectors in the features' dtype, never bf16 / fp16
        with torch.random.fork_rng(devices=[]), autocast_off(outs[self.index].logits):
            torch.manual_seed(7919 * seed + self.index)
            for j, terms in self.links.items():
                for term in terms:
                    term.build(select_points(outs[self.index], term.student_points),
                               select_points(outs[int(j)], term.teacher_points), num_samples)

    def losses(self, outs: list[ModelOutput], batch: Batch) -> dict[str, torch.Tensor]:
        """Named losses of this peer; ``outs[self.index]`` carries the graph, the others are detached."""
        losses = peer_loss(self.index, [o.logits for o in outs], batch.targets, self.mode, self.weight,
                           self.temperature)
        hard = all(t.uses_hard_labels() for terms in self.links.values() for t in terms)
        if not hard:  # a term's pre-training phase (FitNet hints): only the term trains, as in Distiller
            losses = {}
        share = 1.0 / max(len(self.links), 1)
        for j, terms in self.links.items():
            teacher = _detached(outs[int(j)])
            for term in terms:
                out = term(select_points(outs[self.index], term.student_points),
                           select_points(teacher, term.teacher_points), batch)
                for key, value in out.items():
                    losses[key] = losses[key] + share * value if key in losses else share * value
        return {f"peer{self.index}_{k}": v for k, v in losses.items()}


class PeerCohort(nn.Module):
    """All K peers in one process: one forward per peer, each peer's loss from the others' outputs.

    ``forward`` returns peer 0's logits and the summed, per-peer-named losses; since each peer's loss
    only reaches its own parameters (and connectors), one optimizer over the cohort equals K optimizers.
    """

    def __init__(self, peers: list[nn.Module], mode: str = "dml", weight: float = 1.0, temperature: float = 1.0,
                 make_terms: TermFactory | None = None):
        super().__init__()
        if len(peers) < 2:
            raise ValueError(f"online distillation needs at least 2 peers, got {len(peers)}")
        links = [_links(peers, i, make_terms) for i in range(len(peers))]
        self.plan = PeerPlan(links)
        self.learners = nn.ModuleList([PeerLearner(p, i, links[i], self.plan.capture[i], mode, weight, temperature)
                                       for i, p in enumerate(peers)])
        self.peers = [learner.peer for learner in self.learners]

    def set_epoch(self, epoch: int) -> None:
        for learner in self.learners:
            learner.set_epoch(epoch)

    @torch.no_grad()
    def build(self, example: torch.Tensor, num_samples: int = 0, seed: int = 0) -> None:
        """Create the terms' connectors from one example batch; call before making the optimizer."""
        modes = [lr.peer.training for lr in self.learners]
        for learner in self.learners:
            learner.peer.eval()
        outs = [learner.run(example) for learner in self.learners]
        for learner, mode in zip(self.learners, modes):
            learner.build(outs, num_samples, seed)
            learner.peer.train(mode)

    def forward(self, batch: Batch, teacher_out=None):
        outs = [learner.run(batch.inputs) for learner in self.learners]
        losses: dict[str, torch.Tensor] = {}
        for learner in self.learners:
            losses.update(learner.losses(outs, batch))
        return outs[0].logits, losses


class PeerReplica(nn.Module):
    """One peer of a cohort whose peers sit on different workers (one peer per rank of a cohort group).

    Every rank of the cohort reads the same batch. Each step the peer packs its logits and the features
    the other peers' terms read from it into one ``(batch, width)`` tensor, ``gather`` (supplied by the
    orchestrator: an ``all_gather`` in the cohort's process group) returns every peer's packed tensor,
    padded to the widest, in peer order, and they are unpacked by the shapes learned at :meth:`build`.
    ``models`` are all peers' models (to resolve their feature points); only ``models[index]`` is kept.
    """

    def __init__(self, models: list[nn.Module], index: int, gather: Callable[[torch.Tensor], list[torch.Tensor]],
                 mode: str = "dml", weight: float = 1.0, temperature: float = 1.0,
                 make_terms: TermFactory | None = None):
        super().__init__()
        if len(models) < 2:
            raise ValueError(f"online distillation needs at least 2 peers, got {len(models)}")
        self.index, self.gather, self.num_peers = index, gather, len(models)
        links = [_links(models, i, make_terms) for i in range(len(models))]
        self.plan = PeerPlan(links)
        self.learner = PeerLearner(models[index], index, links[index], self.plan.capture[index], mode, weight,
                                   temperature)
        self.peer = self.learner.peer
        self._others = models  # dropped after build; only needed to learn the others' feature shapes
        self.layouts: list[OutputLayout] = []  # each peer's packed output, learned at build

    def set_epoch(self, epoch: int) -> None:
        self.learner.set_epoch(epoch)

    @torch.no_grad()
    def build(self, example: torch.Tensor, num_samples: int = 0, seed: int = 0) -> None:
        """Learn every peer's export layout from one example batch, create this peer's connectors."""
        outs = []
        for i, model in enumerate(self._others):
            mode = model.training
            model.eval()
            tap = FeatureTap(model, self.plan.capture[i], role=f"peer {i}") if self.plan.capture[i] else None
            outs.append(forward_with_features(model, tap, example))
            if tap is not None:
                tap.remove()
            model.train(mode)
        self.layouts = [OutputLayout.of(o, self.plan.export[i]) for i, o in enumerate(outs)]
        self.learner.build(outs, num_samples, seed)
        self._others = None

    def forward(self, batch: Batch, teacher_out=None):
        if self._others is not None:
            raise RuntimeError("PeerReplica.build(example) must run before training")
        own = self.learner.run(batch.inputs)
        packed = self.layouts[self.index].pack(own)
        padded = F.pad(packed, (0, max(lay.width for lay in self.layouts) - packed.shape[1]))
        outs = [lay.unpack(flat) for lay, flat in zip(self.layouts, self.gather(padded))]
        outs[self.index] = own
        return own.logits, self.learner.losses(outs, batch)


def _detached(out: ModelOutput) -> ModelOutput:
    return ModelOutput(out.logits.detach(), {k: v.detach() for k, v in out.features.items()})
