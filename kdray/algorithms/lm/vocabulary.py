"""Teachers and student must share one vocabulary: the same size and, where the models know their tokenizers,
the same token -> id map. Token-level distillation compares distributions id by id, so a teacher whose id 17
is another word than the student's id 17 would teach nonsense without any shape error; cross-tokenizer
distillation (aligning two vocabularies) is out of scope.

:func:`check_shared_vocabulary` runs before training and fails in one line naming both vocabularies (size and
tokenizer directory). The models describe themselves: ``vocab_size`` (kdray's LMs) or ``config.vocab_size``
(a bare transformers model); ``tokenizer_dir`` and ``tokenizer()`` where a tokenizer was saved with the
weights (:class:`kdray.models.hf_causal.HFCausalLM`). Reading the tokenizer files is the model's business;
this module only compares.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch.nn as nn


def lm_vocab_size(model: nn.Module) -> int:
    """A causal LM's vocabulary size: a ``vocab_size`` attribute or a transformers model's ``config.vocab_size``."""
    size = getattr(model, "vocab_size", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    if size is None:
        raise ValueError(f"{type(model).__name__} has no vocab_size (attribute or config.vocab_size); give LM "
                         f"teachers and students one so their vocabularies can be checked")
    return int(size)


def describe_vocabulary(model: nn.Module) -> str:
    """``'100 tokens, tokenizer /dir'`` (or without the tokenizer when the model does not know it)."""
    tokenizer_dir = getattr(model, "tokenizer_dir", None)
    where = f", tokenizer {tokenizer_dir}" if tokenizer_dir else ""
    return f"{lm_vocab_size(model)} tokens{where}"


def vocabulary_mismatch(student: nn.Module, teacher: nn.Module, teacher_name: str = "teacher") -> str | None:
    """Why ``teacher`` cannot teach ``student`` token by token (one line), or ``None``."""
    fix = "teachers must share the student's tokenizer (cross-tokenizer distillation is not supported)"
    if lm_vocab_size(teacher) != lm_vocab_size(student):
        return (f"LM {teacher_name} vocabulary ({describe_vocabulary(teacher)}) != student vocabulary "
                f"({describe_vocabulary(student)}); {fix}")
    dirs = [getattr(m, "tokenizer_dir", None) for m in (teacher, student)]
    if all(dirs) and Path(dirs[0]).resolve() != Path(dirs[1]).resolve():
        if teacher.tokenizer().get_vocab() != student.tokenizer().get_vocab():
            return (f"LM {teacher_name} tokenizer ({dirs[0]}) maps tokens to other ids than the student's "
                    f"({dirs[1]}), both {lm_vocab_size(student)} tokens; {fix}")
    return None


def check_shared_vocabulary(student: nn.Module, teachers: Sequence[nn.Module]) -> None:
    """Raise ``ValueError`` (one line naming both vocabularies) at the first teacher the student cannot learn
    from token by token."""
    for index, teacher in enumerate(teachers):
        name = "teacher" if len(teachers) == 1 else f"teacher {index}"
        problem = vocabulary_mismatch(student, teacher, name)
        if problem:
            raise ValueError(problem)
