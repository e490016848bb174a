"""The feature-point contract every text term reads, and the base class that resolves it from layer maps.

A text model (kdray's Hugging Face wrapper, or any encoder) exposes identity taps at these module paths,
captured by the ordinary :class:`~kdray.models.features.FeatureTap`:

- ``hidden_states.{i}`` (B, L, H) for ``i = 0..num_layers`` (0 = embedding output, ``i`` = output of layer ``i``);
- ``attentions.{i}`` (B, heads, L, L): softmax attention probabilities of layer ``i`` (0-based);
- ``queries.{i}`` / ``keys.{i}`` / ``values.{i}`` (B, L, H): layer ``i``'s linear projections before the head split;
- ``embedding`` (B, H): the pooled sentence embedding;

and the attributes ``num_layers``, ``num_attention_heads``, ``hidden_size``. The padding mask is
``batch.inputs["attention_mask"]`` (inputs are a mapping of tensors for text).

Layers in layer maps are numbered as the papers number them: ``1..num_layers`` for transformer layers and
``0`` for the embedding output, so ``hidden_states.{m}`` is layer ``m``'s output and layer ``m``'s attention
taps are ``attentions.{m-1}`` / ``queries.{m-1}``.

Which points a text term needs depends on both models' depths (TinyBERT's ``g(m) = m N / M``), so a
:class:`TextTerm` hands the distiller callables as its default points: the distiller calls them with the bare
student (at construction) and each teacher (when it resolves teacher points), so a layer map naming a layer the
model lacks is refused there, in one line, before any batch runs.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn

from kdray.algorithms.base import Batch, KnowledgeTerm


class LayerMapError(ValueError):
    """A layer map (or a layer index) naming a layer the model does not have."""


@dataclass(frozen=True)
class Geometry:
    """The sizes a text term needs from one model."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int


def geometry(model: nn.Module, role: str) -> Geometry:
    """``model``'s ``num_layers`` / ``hidden_size`` / ``num_attention_heads``, or a one-line error."""
    missing = [a for a in ("num_layers", "hidden_size", "num_attention_heads") if not isinstance(
        getattr(model, a, None), int)]
    if missing:
        raise ValueError(f"{role} ({type(model).__name__}) has no integer {', '.join(missing)}: text terms need a "
                         f"model following the text feature-point contract (kdray.algorithms.text.contract)")
    return Geometry(model.num_layers, model.hidden_size, model.num_attention_heads)


def hidden_state(layer: int) -> str:
    """Point of layer ``layer``'s output (0 = embedding output)."""
    return f"hidden_states.{layer}"


def attention_point(which: str, layer: int) -> str:
    """Point of 1-based layer ``layer``'s ``attentions`` / ``queries`` / ``keys`` / ``values`` tap."""
    return f"{which}.{layer - 1}"


def check_layer(term: str, key: str, layer: int, geom: Geometry, role: str, lowest: int = 1) -> int:
    """``layer`` if ``lowest <= layer <= num_layers``, else a :class:`LayerMapError` naming the key and range."""
    if not isinstance(layer, int) or isinstance(layer, bool) or not lowest <= layer <= geom.num_layers:
        raise LayerMapError(f"{term}.{key} names {role} layer {layer!r}, but the {role} has {geom.num_layers} "
                            f"layers (allowed {lowest}..{geom.num_layers})")
    return layer


def token_mask(batch: Batch, like: torch.Tensor, term: str) -> torch.Tensor:
    """The (B, L) boolean padding mask (``True`` = real token) for features shaped like ``like`` (B, L, ...);
    all ``True`` when the inputs carry no ``attention_mask``."""
    if not isinstance(batch.inputs, Mapping):
        raise ValueError(f"{term}: batch.inputs is a {type(batch.inputs).__name__}; text terms need a mapping of "
                         f"tensors (input_ids, attention_mask)")
    mask = batch.inputs.get("attention_mask")
    if mask is None:
        return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
    if tuple(mask.shape) != tuple(like.shape[:2]):
        raise ValueError(f"{term}: attention_mask has shape {tuple(mask.shape)} but the features are "
                         f"{tuple(like.shape)}: the mask must be (batch, sequence length) of the same batch")
    return mask.to(device=like.device).bool()


def split_heads(x: torch.Tensor, heads: int, term: str, path: str) -> torch.Tensor:
    """(B, L, H) -> (B, heads, L, H / heads): the head split of a projection (the transformers layout)."""
    if x.dim() != 3 or x.shape[-1] % heads:
        raise ValueError(f"{term}: {path} has shape {tuple(x.shape)}; expected (batch, length, hidden) with hidden "
                         f"divisible by {heads} heads")
    b, n, h = x.shape
    return x.reshape(b, n, heads, h // heads).transpose(1, 2)


def check_shape(term: str, path: str, x: torch.Tensor, dims: int, role: str) -> torch.Tensor:
    if x.dim() != dims:
        raise ValueError(f"{term}: {role} feature {path} has shape {tuple(x.shape)}; the text contract gives it "
                         f"{dims} dimensions (see kdray.algorithms.text.contract)")
    return x


def check_pair(term: str, s_path: str, s: torch.Tensor, t_path: str, t: torch.Tensor, dims: int = 3):
    """Both features have ``dims`` dimensions and the same (batch, length) leading sizes, or a one-line error."""
    check_shape(term, s_path, s, dims, "student")
    check_shape(term, t_path, t, dims, "teacher")
    if s.shape[0] != t.shape[0] or s.shape[-2] != t.shape[-2]:
        raise ValueError(f"{term}: student {s_path} {tuple(s.shape)} and teacher {t_path} {tuple(t.shape)} differ "
                         f"in batch or sequence length; both models must read the same tokenised batch")
    return s, t


def masked_row_kl(p_teacher: torch.Tensor, log_p_student: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean over the ``rows`` (boolean, broadcast over the leading dims) of ``KL(p_t || p_s)`` along the last
    dimension, with ``0 log 0 = 0`` so padded keys (probability 0 in both) contribute nothing."""
    log_p_teacher = p_teacher.clamp_min(torch.finfo(p_teacher.dtype).tiny).log()
    safe_student = log_p_student.clamp_min(torch.finfo(log_p_student.dtype).min)
    kl = torch.where(p_teacher > 0, p_teacher * (log_p_teacher - safe_student), 0.0).sum(-1)
    rows = rows.expand_as(kl)
    return kl[rows].sum() / rows.sum().clamp_min(1)


def relation_log_probs(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``log softmax(x x^T / sqrt(d))`` over the real keys of (B, heads, L, d) vectors (MiniLM's value relation,
    MiniLMv2's Q-Q / K-K / V-V relations); padded keys get ``-inf``."""
    scores = x @ x.transpose(-1, -2) / x.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return scores.log_softmax(-1)


class TextTerm(KnowledgeTerm):
    """Base of the text terms: default points are resolved from each model's geometry by :meth:`points`.

    Subclasses implement ``points(side, student, teacher)`` returning the student (``side="student"``,
    ``teacher`` is ``None``) or teacher point list, validating their layer map against the geometries.
    """

    modality = "text"

    def __init__(self):
        super().__init__()
        self.student_geometry: Geometry | None = None
        self.teacher_geometry: Geometry | None = None
        self.default_student_points = self.resolve_student_points
        self.default_teacher_points = self.resolve_teacher_points

    def resolve_student_points(self, model: nn.Module, role: str) -> list[str]:
        self.student_geometry = geometry(model, role)
        return self.points("student", self.student_geometry, None)

    def resolve_teacher_points(self, model: nn.Module, role: str) -> list[str]:
        if self.student_geometry is None:
            raise ValueError(f"{self.name}: resolve the student's points first (the layer map needs both depths)")
        self.teacher_geometry = geometry(model, role)
        return self.points("teacher", self.student_geometry, self.teacher_geometry)

    def points(self, side: str, student: Geometry, teacher: Geometry | None) -> list[str]:
        raise NotImplementedError

    def geometries(self) -> tuple[Geometry, Geometry]:
        """(student, teacher) geometries; a one-line error when explicit points bypassed the layer map."""
        if self.student_geometry is None or self.teacher_geometry is None:
            raise ValueError(f"{self.name} picks its feature points from its layer map: drop student_points / "
                             f"teacher_points and set its layer parameters instead")
        return self.student_geometry, self.teacher_geometry
