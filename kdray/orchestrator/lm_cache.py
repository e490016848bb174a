"""Writing the offline LM top-k cache with Ray Data: the teacher runs once over the token-id sequences in a pool
of actors, students then train from the file without loading it (the format, its reader and its fingerprint:
:mod:`kdray.data.lm_topk_cache`).

How (:func:`write_lm_cache_with_ray`):

* The sequences ``(N, L)`` become a Ray Dataset of Arrow blocks, one row per sequence: its row id
  (``sequence``) and its ``input_ids``.
* ``map_batches`` with :class:`LMTopKActor` (a callable class in a fixed-size actor pool,
  ``ActorPoolStrategy(size=concurrency)``, as :mod:`kdray.orchestrator.teacher_cache` runs image teachers). Each
  actor builds its teacher once from a spec (a registered causal LM's name and its knobs, built with
  ``create_model`` as image teachers are) and the teacher's state dict, shipped through the object store as
  tensors: no pickled module crosses. Per batch it takes the top-k of the fp32 log-softmax of the logits at the
  cache's temperature (:func:`kdray.algorithms.lm.topk.teacher_topk`) and returns one Arrow row per token:
  ``sequence``, ``position``, k int32 ids, k float16 log-probs, the columns of
  :func:`~kdray.data.lm_topk_cache.write_lm_topk_parquet`.
* ``write_parquet`` streams the actors' rows to part files in a staging folder beside the cache, so the object
  store never holds the whole cache. The driver then reads the parts, checks that every (sequence, position)
  came back exactly once, puts them in the original order and writes the one cache file with
  ``write_lm_topk_parquet`` (atomically, the schema metadata and fingerprint included): the result is the
  file the in-process writer makes, read by ``read_lm_topk_parquet`` unchanged. The staging folder is removed
  whatever happens.

The fingerprint is :func:`~kdray.data.lm_topk_cache.lm_cache_fingerprint` of the teacher's state dict as
given, without building the teacher on the driver: the in-process writer's fingerprint of a teacher whose
``state_dict()`` that is. Bad input (a model that is not a causal LM,
another vocabulary, a state dict that does not fit the teacher, token ids outside the vocabulary, sequences
longer than the teacher takes, k out of range, an existing cache) fails in one line before Ray starts (the
driver builds the teacher on the meta device only: shapes, no memory).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings

import torch
import torch.nn as nn

from kdray.algorithms.lm.generation import causal_logits
from kdray.algorithms.lm.topk import teacher_topk
from kdray.algorithms.lm.vocabulary import lm_vocab_size
from kdray.data.lm_topk_cache import bytes_per_token, lm_cache_fingerprint, write_lm_topk_parquet
from kdray.models import create_model, list_models, model_family
from kdray.orchestrator.weights import load_weights

# --- the teacher, from a spec and a state dict -----------------------------------------------------------------
def lm_models() -> list[str]:
    """The registered causal LMs (model family ``lm``): the names an LM teacher spec may give."""
    return [name for name in list_models() if model_family(name) == "lm"]


def build_lm_teacher(teacher_spec: dict, vocab_size: int, state: dict | None = None,
                     device: str | torch.device = "cpu") -> nn.Module:
    """The spec's teacher (``{"model": a registered causal LM, "args": {its knobs}}``, built as
    ``create_model(model, vocab_size, **args)``, an LM's classes being its tokens) on ``device`` (``"meta"``:
    shapes only, no memory), with ``state`` loaded strictly. A name that is not a causal LM, a bad knob, another
    vocabulary or a missing, unexpected or differently shaped tensor is a one-line ValueError."""
    if not isinstance(teacher_spec, dict) or "model" not in teacher_spec:
        raise ValueError(f"LM teacher spec must be a dict {{'model': name, 'args': {{...}}}}, got {teacher_spec!r}")
    name, args = teacher_spec["model"], dict(teacher_spec.get("args", {}))
    if name not in lm_models():
        raise ValueError(f"LM teacher spec model {name!r} is not a registered causal LM; allowed: "
                         f"{', '.join(lm_models())}")
    try:
        with torch.device(device):
            model = create_model(name, vocab_size, **args)
    except (TypeError, ValueError) as err:
        raise ValueError(f"LM teacher spec {name} {args}: {str(err).splitlines()[0]}") from None
    if lm_vocab_size(model) != vocab_size:
        raise ValueError(f"LM teacher {name} {args} has a vocabulary of {lm_vocab_size(model)} tokens, the cache's "
                         f"token ids {vocab_size}; the teacher must share the tokenizer")
    if state is not None:  # the checks every teacher's weights get; on the meta device loading copies nothing
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
            load_weights(model, state, f"LM teacher state for {name} {args}", vocab_size)
    return model.eval().requires_grad_(False)


# --- one batch: token ids -> top-k rows ------------------------------------------------------------------------
def topk_rows_table(sequence_ids, indices: torch.Tensor, logprobs: torch.Tensor):
    """The cache rows of B sequences as a pyarrow table: ``sequence`` and ``position`` per token, then the
    ``(B, L, k)`` top-k as k int32 ids and k float16 log-probs (the columns of ``write_lm_topk_parquet``)."""
    import numpy as np
    import pyarrow as pa

    b, length, k = indices.shape
    return pa.table({
        "sequence": pa.array(np.repeat(np.asarray(sequence_ids, dtype=np.int64), length)),
        "position": pa.array(np.tile(np.arange(length, dtype=np.int32), b)),
        "indices": pa.FixedSizeListArray.from_arrays(pa.array(indices.to(torch.int32).reshape(-1).numpy()), k),
        "logprobs": pa.FixedSizeListArray.from_arrays(
            pa.array(logprobs.to(torch.float16).reshape(-1).numpy(), pa.float16()), k),
    })


def fixed_lists(column, shape: tuple) -> torch.Tensor:
    """A column of fixed-size lists (a pyarrow array or chunked array) as a tensor of ``shape`` (a copy: Arrow's
    buffers are read-only)."""
    values = column.combine_chunks().flatten().to_numpy(zero_copy_only=False, writable=True)
    return torch.from_numpy(values.reshape(shape))


class LMTopKActor:
    """Ray Data callable class: one frozen LM teacher per actor; a pyarrow batch of sequences (``sequence``,
    ``input_ids``) to its tokens' top-k rows (:func:`topk_rows_table`)."""

    def __init__(self, teacher_spec: dict, state, k: int, temperature: float, vocab_size: int,
                 threads: int = 1, use_gpu: bool = False):
        import ray

        torch.set_num_threads(max(1, threads))
        state = ray.get(state) if isinstance(state, ray.ObjectRef) else state
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = build_lm_teacher(teacher_spec, vocab_size, state, self.device)
        self.k, self.temperature, self.vocab_size = k, temperature, vocab_size

    def __call__(self, batch):
        rows = batch["sequence"].to_numpy()
        ids = fixed_lists(batch["input_ids"], (len(rows), -1))
        with torch.no_grad():
            logits = causal_logits(self.model, ids.to(self.device))
        if logits.shape[-1] != self.vocab_size:
            raise RuntimeError(f"the teacher gave {logits.shape[-1]} logits per token, its vocab_size says "
                               f"{self.vocab_size}")
        topk = teacher_topk(logits.float(), self.k, self.temperature)
        return topk_rows_table(rows, topk.indices.cpu(), topk.logprobs.cpu())


# --- the cache -------------------------------------------------------------------------------------------------
def _check_sequences(sequences, vocab_size: int) -> torch.Tensor:
    ids = torch.as_tensor(sequences)
    if ids.dim() != 2 or ids.numel() == 0 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"LM cache sequences must be a non-empty 2-D integer tensor (N sequences, L tokens), "
                         f"got {ids.dtype} of shape {tuple(ids.shape)}")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"LM cache sequences hold token ids in [{low}, {high}] but the teacher's vocabulary is "
                         f"[0, {vocab_size - 1}]; tokenize with the teacher's tokenizer")
    return ids.long()


def _sequence_blocks(ids: torch.Tensor, blocks: int) -> list:
    """The sequences as ``blocks`` Arrow tables of rows ``sequence`` (row id), ``input_ids`` (L int64)."""
    import numpy as np
    import pyarrow as pa

    array = ids.numpy()
    tables = []
    for rows in np.array_split(np.arange(len(array), dtype=np.int64), blocks):
        if len(rows):
            tables.append(pa.table({"sequence": pa.array(rows), "input_ids": pa.FixedSizeListArray.from_arrays(
                pa.array(array[rows].reshape(-1)), array.shape[1])}))
    return tables


def _read_parts(staging: str, n: int, length: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The staged rows in (sequence, position) order as ``(N, L, k)`` ids and log-probs; every position exactly once."""
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(staging).sort_by([("sequence", "ascending"), ("position", "ascending")])
    sequence, position = table["sequence"].to_numpy(), table["position"].to_numpy()
    if (len(sequence) != n * length or not np.array_equal(sequence, np.repeat(np.arange(n), length))
            or not np.array_equal(position, np.tile(np.arange(length), n))):
        raise RuntimeError(f"the teacher pass returned {len(sequence)} token rows for {n} sequences x {length} "
                           f"positions (each exactly once expected)")
    return fixed_lists(table["indices"], (n, length, k)), fixed_lists(table["logprobs"], (n, length, k))


def write_lm_cache_with_ray(teacher_spec: dict, teacher_state: dict, sequences, *, vocab_size: int, k: int,
                            temperature: float, path: str, tokenizer, batch_size: int = 64, concurrency: int = 1,
                            use_gpu: bool = False, threads_per_actor: int = 1, overwrite: bool = False,
                            log=print) -> str:
    """Write the LM top-k cache of ``sequences`` ``(N, L)`` under the teacher ``teacher_spec`` +
    ``teacher_state`` to the Parquet file ``path`` with Ray Data (see the module doc); returns ``path``.

    ``teacher_spec``: ``{"model": a registered causal LM (:func:`lm_models`), "args": {its knobs}}``, built
    with ``vocab_size`` tokens (the tokenizer's, which the sequences' ids come from); ``teacher_state``: the
    teacher's state dict (tensors only, e.g. read with ``torch.load(..., weights_only=True)``); ``tokenizer``:
    the tokenizer or its identity string, for the fingerprint; ``concurrency``: teacher actors (one GPU each
    with ``use_gpu``); ``batch_size``: sequences per teacher forward. Starts a local Ray if none is up."""
    import ray

    from kdray.orchestrator.runtime import ensure_ray

    start = time.perf_counter()
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        raise ValueError(f"LM cache path {path} is a folder; give the cache's file name, e.g. {path}/topk.parquet")
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"{path} already exists; pass overwrite=True to replace it")
    if batch_size < 1 or concurrency < 1:
        raise ValueError(f"LM cache needs batch_size >= 1 and concurrency >= 1, got {batch_size} and {concurrency}")
    shapes_only = build_lm_teacher(teacher_spec, vocab_size, teacher_state, device="meta")
    if not 1 <= k <= vocab_size:
        raise ValueError(f"LM cache k must be in [1, vocabulary size {vocab_size}], got {k}")
    if temperature <= 0:
        raise ValueError(f"LM cache temperature must be > 0, got {temperature}")
    ids = _check_sequences(sequences, vocab_size)
    n, length = ids.shape
    longest = getattr(shapes_only, "max_length", None) or getattr(
        getattr(shapes_only, "config", None), "max_position_embeddings", None)
    if longest is not None and length > longest:
        raise ValueError(f"LM cache sequences have {length} tokens but the teacher takes at most {longest}; pack "
                         f"shorter sequences or give the spec a larger max_length")
    fingerprint = lm_cache_fingerprint(teacher_state, tokenizer, ids, k, temperature)

    ensure_ray()
    n_batches = -(-n // batch_size)
    size = max(1, min(concurrency, n_batches))
    resource, each = ("GPU", 1) if use_gpu else ("CPU", threads_per_actor)
    have = ray.cluster_resources().get(resource, 0)
    if size * each > have:
        raise ValueError(f"LM cache: {size} teacher actor(s) x {each} {resource} > the cluster's {have:g} {resource}s; "
                         f"lower concurrency (or threads_per_actor)")
    ds = ray.data.from_arrow(_sequence_blocks(ids, max(size, min(n_batches, 4 * size))))
    ds = ds.map_batches(
        LMTopKActor, batch_size=batch_size, batch_format="pyarrow",
        fn_constructor_kwargs={"teacher_spec": {"model": teacher_spec["model"],
                                                "args": dict(teacher_spec.get("args", {}))},
                               "state": ray.put(teacher_state), "k": k, "temperature": float(temperature),
                               "vocab_size": vocab_size, "threads": threads_per_actor, "use_gpu": use_gpu},
        compute=ray.data.ActorPoolStrategy(size=size), num_cpus=threads_per_actor, num_gpus=1 if use_gpu else 0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.parts-", dir=os.path.dirname(path))
    try:
        ds.write_parquet(staging, ray_remote_args={"num_cpus": 0})  # writes never wait for the actors' CPUs
        indices, logprobs = _read_parts(staging, n, length, k)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_lm_topk_parquet(path, indices, logprobs, temperature=temperature, vocab_size=vocab_size,
                          fingerprint=fingerprint)
    seconds = time.perf_counter() - start
    log(f"cached the top-{k} of {teacher_spec['model']} at T={temperature} for {n} x {length} tokens with {size} "
        f"actor(s) in {seconds:.1f}s ({n * length / seconds:.0f} tokens/s, {bytes_per_token(path):.1f} bytes/token): "
        f"{path} (fingerprint {fingerprint[:12]})")
    return path


__all__ = ["LMTopKActor", "build_lm_teacher", "fixed_lists", "lm_models",
           "topk_rows_table", "write_lm_cache_with_ray"]
