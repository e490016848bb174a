"""Per-token divergences between a teacher and a student next-token distribution, on log-probabilities.

Every function takes ``log_t`` and ``log_s`` of shape ``(..., V)`` (log-probabilities over the same buckets:
the full vocabulary, or the teacher's top-k plus one "rest" bucket, see :mod:`kdray.algorithms.lm.topk`) and
returns the divergence per position, shape ``(...)``, in the dtype given (callers pass fp32).
Buckets with zero probability contribute zero (``0 log 0 = 0``) without producing NaN gradients: log-probs
of ``-inf`` are replaced by 0 where the matching probability is 0 before any product is formed.

Names follow the LM-distillation papers, with the teacher as ``P`` and the student as ``Q``:

* ``forward_kl``: ``KL(P || Q)``, mode-covering (Hinton's KD per token; MiniLLM / GKD call it forward KL);
* ``reverse_kl``: ``KL(Q || P)``, mode-seeking (MiniLLM, Gu et al. ICLR 2024);
* ``jsd``: the generalized JSD of GKD (Agarwal et al. ICLR 2024, eq. 1) with the mixture
  ``M = beta P + (1 - beta) Q`` and ``beta KL(P || M) + (1 - beta) KL(Q || M)``. The paper's formula tends
  to 0 at both ends (``JSD(beta) / beta -> KL(P || Q)`` as ``beta -> 0`` and ``JSD(beta) / (1 - beta) ->
  KL(Q || P)`` as ``beta -> 1``). kdray follows TRL's ``GKDTrainer.generalized_jsd_loss``, which uses the same
  mixture and special-cases the ends: ``beta = 0`` **is** forward KL ``KL(P || Q)`` and ``beta = 1`` **is**
  reverse KL ``KL(Q || P)`` (tests/test_lm_divergence.py checks both ends and the limit);
* ``total_variation``: ``0.5 * sum |P - Q|`` (bounded in [0, 1]; Wen et al. 2023, f-divergence KD);
* ``skew_kl``: DistiLLM's skew KL (Ko et al. ICML 2024), ``KL(P || alpha P + (1 - alpha) Q)``; ``alpha = 0``
  is forward KL; ``skew_reverse_kl`` is ``KL(Q || alpha Q + (1 - alpha) P)``. DistiLLM's default is 0.1.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

Divergence = Callable[..., torch.Tensor]


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``sum_v p (log p - log q)`` with ``0 log 0 = 0`` and finite gradients where ``p = 0``."""
    p = log_p.exp()
    present = p > 0
    safe_log_p = torch.where(present, log_p, torch.zeros_like(log_p))
    safe_log_q = torch.where(present, log_q, torch.zeros_like(log_q))
    return (p * (safe_log_p - safe_log_q)).sum(-1)


def _log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, weight_p: float) -> torch.Tensor:
    """``log(weight_p * p + (1 - weight_p) * q)`` in log space, for ``0 < weight_p < 1``."""
    return torch.logaddexp(log_p + math.log(weight_p), log_q + math.log1p(-weight_p))


def forward_kl(log_t: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
    """``KL(teacher || student)`` per position."""
    return _kl(log_t, log_s)


def reverse_kl(log_t: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
    """``KL(student || teacher)`` per position."""
    return _kl(log_s, log_t)


def jsd(log_t: torch.Tensor, log_s: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """GKD's generalized JSD; ``beta = 0`` is forward KL, ``beta = 1`` reverse KL (as TRL), see the module doc."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1] (0: forward KL, 1: reverse KL), got {beta}")
    if beta == 0.0:
        return forward_kl(log_t, log_s)
    if beta == 1.0:
        return reverse_kl(log_t, log_s)
    log_m = _log_mixture(log_t, log_s, beta)
    return beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)


def total_variation(log_t: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
    """``0.5 * sum_v |p_t - p_s|`` per position."""
    return 0.5 * (log_t.exp() - log_s.exp()).abs().sum(-1)


def skew_kl(log_t: torch.Tensor, log_s: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """DistiLLM's skew (forward) KL ``KL(P || alpha P + (1 - alpha) Q)``; ``alpha = 0`` is forward KL."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"skew_kl alpha must be in [0, 1) (0: forward KL), got {alpha}")
    if alpha == 0.0:
        return forward_kl(log_t, log_s)
    return _kl(log_t, _log_mixture(log_t, log_s, alpha))


def skew_reverse_kl(log_t: torch.Tensor, log_s: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """DistiLLM's skew reverse KL ``KL(Q || alpha Q + (1 - alpha) P)``; ``alpha = 0`` is reverse KL."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"skew_reverse_kl alpha must be in [0, 1) (0: reverse KL), got {alpha}")
    if alpha == 0.0:
        return reverse_kl(log_t, log_s)
    return _kl(log_s, _log_mixture(log_s, log_t, alpha))


DIVERGENCES: dict[str, Divergence] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "total_variation": total_variation,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
}


def get_divergence(name: str) -> Divergence:
    """The divergence called ``name``; an unknown name fails in one line listing the known ones."""
    if name not in DIVERGENCES:
        raise ValueError(f"unknown LM divergence {name!r}; known: {', '.join(sorted(DIVERGENCES))}")
    return DIVERGENCES[name]
