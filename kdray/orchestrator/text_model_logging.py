"""A trained transformers text student as an MLflow ``transformers`` model, with its tokenizer.

Why not ``mlflow.pytorch`` as for every other model: a text student is a Hugging Face model inside kdray's
:class:`~kdray.models.text.TextModel` (identity taps for feature hooks). Logged with the ``transformers`` flavour,
its weights, config and the teacher's tokenizer are saved with ``save_pretrained`` (no pickle), and
``mlflow.transformers.load_model("models:/<id>")`` returns a working pipeline (``return_type="components"``:
the model and tokenizer) outside kdray, ``mlflow.pyfunc`` serves it. The pipeline task follows the head:
``classification`` -> ``text-classification`` (the model's logits), ``masked_lm`` -> ``fill-mask``,
``embedding`` -> ``feature-extraction`` (per-token hidden states: kdray's embedding is their mean over the
attention mask, see :func:`~kdray.models.text.mean_pool`).
"""
from __future__ import annotations

import logging

from kdray.hf_local import load_tokenizer
from kdray.orchestrator.mlflow_internals import fluent_store, quiet_logger

PIPELINE_TASKS = {"classification": "text-classification", "masked_lm": "fill-mask",
                  "embedding": "feature-extraction"}


def is_transformers_text(model) -> bool:
    """Whether ``model`` is a transformers text model (kdray's ``hf_text``), which this flavour logs; other text
    models (``text_bilstm``) are plain modules for ``mlflow.pytorch``."""
    from kdray.models.text import TextModel

    return isinstance(model, TextModel)


def log_text_model(model, *, name: str, model_id: str, run_id: str, uri: str, requirements: list[str]) -> None:
    """Log ``model`` (a :class:`~kdray.models.text.TextModel`, on the CPU, without training hooks) and its
    tokenizer as the MLflow logged model ``model_id`` of run ``run_id`` in the store ``uri``."""
    import mlflow

    if not getattr(model, "tokenizer_dir", None):
        raise ValueError(f"text model {name} has no tokenizer directory (built from size knobs without "
                         f"'teacher'), so it cannot be logged with mlflow.transformers; "
                         f"give the student teacher: <dir>")
    tokenizer = load_tokenizer(model.tokenizer_dir)
    # quiet: the model-card lookup on the hub (kdray never reaches it; the model is local) and the licence notice
    with fluent_store(uri), quiet_logger("mlflow.transformers", logging.ERROR):
        mlflow.transformers.log_model({"model": model.hf, "tokenizer": tokenizer}, name=name, model_id=model_id,
                                      run_id=run_id, task=PIPELINE_TASKS[model.head], pip_requirements=requirements)
