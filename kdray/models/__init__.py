"""Models by name: the CIFAR KD zoo, small digits networks, and any torchvision classifier.

Every model exposes two attributes the knowledge terms use as defaults:
``kd_stages`` (module paths of the output of each stage, shallow to deep) and
``kd_embedding`` (module path whose output is the penultimate, pre-classifier feature).
"""
from kdray.models.registry import (
    UnknownModelError,
    create_model,
    is_known_model,
    list_models,
    model_family,
    model_knobs,
    register_model,
)
from kdray.models import digits as _digits  # noqa: F401  (registers digits models)
from kdray.models import deit as _deit  # noqa: F401  (registers deit_vit, the ViT with a distillation token)
from kdray.models import cifar as _cifar  # noqa: F401  (registers the CIFAR zoo)
from kdray.models import graph as _graph  # noqa: F401  (registers the graph models)
from kdray.models import blockwise as _blockwise  # noqa: F401  (registers the block-wise searched student)
from kdray.models import text as _text  # noqa: F401  (registers the transformers text models; imports them lazily)
from kdray.models import bilstm as _bilstm  # noqa: F401  (registers the distilled BiLSTM text student)
from kdray.models import causal_lm as _causal_lm  # noqa: F401  (registers causal_lm, the small GPT-style LM)
from kdray.models import hf_causal as _hf_causal  # noqa: F401  (registers hf_causal_lm; imports transformers lazily)

__all__ = [
    "UnknownModelError",
    "create_model",
    "is_known_model",
    "list_models",
    "model_family",
    "model_knobs",
    "register_model",
]
