"""Making a teacher-output cache: ``kdray cache CONFIG`` runs the teacher over the training set once, students
train from it (the format, its checks and the readers: :mod:`kdray.orchestrator.cache_store`).

Writing: Ray Data runs the teacher in a fixed-size actor pool (``map_batches`` with a callable class,
``compute=ActorPoolStrategy(size=n)``, the current form of ``concurrency=n``: one actor per GPU, or per
CPU slot without GPUs) over blocks of sample indices. The training split and the teacher's state_dict reach
the actors through the object store (a split that cannot be pickled is rebuilt by each actor and checked
against the driver's fingerprint). Each actor builds its teacher once and returns a pyarrow table per
batch: sample index, view key and augmentation parameters,
and the full logits or the top-k logits with their logsumexp, float32 or float16. The driver writes them
as one Parquet file with pyarrow, sorted by index, with the cache's identity in the schema metadata
(key ``kdray.cache``) and in a small ``manifest.json`` beside it, which also records the Parquet file's size and
SHA-256. Every reader verifies both before it trusts the file: Parquet itself reads a data page whose bytes were
flipped without complaint (its footer is intact), and a student would train on the wrong logits. The hash costs
15-21 ms for a CIFAR-100-sized 20 MiB float32 cache here, 0.15-0.2x of reading it (``bench/cache.py``).
"""
from __future__ import annotations

import math
import os
import time

from kdray.config import Config, ConfigError, load_config

from kdray.orchestrator.cache_store import (CACHE_FILE, FORMAT_VERSION, MANIFEST, VIEW_KEY, check_cache, check_view_keys,
                                           read_manifest, save_cache, state_dict_hash, teacher_spec, teacher_state,
                                           train_transform)


# --- writing ----------------------------------------------------------------------------------
def _fixed_list(values: np.ndarray):
    import numpy as np
    import pyarrow as pa

    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(values).reshape(-1)), values.shape[1])


def outputs_table(indices: np.ndarray, logits: torch.Tensor, topk: int | None, float16: bool,
                  views: np.ndarray | None = None, keys: np.ndarray | None = None):
    """One batch of cache rows as a pyarrow table: sample index, view (fixed views: 0), augmentation key (the
    generator seed the view was made with; fixed views: -1), and the full or top-k logits."""
    import numpy as np
    import torch

    import pyarrow as pa

    n = len(indices)
    dtype = np.float16 if float16 else np.float32
    views = np.zeros(n, dtype=np.int32) if views is None else np.asarray(views, dtype=np.int32)
    keys = np.full(n, -1, dtype=np.int64) if keys is None else np.asarray(keys, dtype=np.int64)
    cols = {"index": pa.array(np.asarray(indices, dtype=np.int64)), "view": pa.array(views),
            "aug_key": pa.array(keys)}
    logits = logits.float()
    if topk:
        values, classes = logits.topk(topk, dim=1)
        cols["topk_values"] = _fixed_list(values.numpy().astype(dtype))
        cols["topk_indices"] = _fixed_list(classes.numpy().astype(np.int32))
        cols["lse"] = pa.array(torch.logsumexp(logits, dim=1).numpy().astype(np.float32))
        stored = values.numpy().astype(dtype)
    else:
        stored = logits.numpy().astype(dtype)
        cols["logits"] = _fixed_list(stored)
    if not np.isfinite(stored).all():
        raise ValueError("teacher logits overflow float16; write the cache without --float16")
    return pa.table(cols)


class TeacherActor:
    """Ray Data callable class: one frozen teacher per actor; maps a batch of sample ids to cache rows."""

    def __init__(self, data, teacher: dict, state, num_classes: int, topk: int | None, float16: bool,
                 use_gpu: bool, threads: int = 1, views: int | None = None, view_seed: int = 0):
        import ray
        import torch

        from kdray.models import create_model
        from kdray.orchestrator.weights import load_weights

        torch.set_num_threads(max(1, threads))
        state, data = (ray.get(v) if isinstance(v, ray.ObjectRef) else v for v in (state, data))
        if isinstance(data, dict):  # the split could not be shipped: rebuild it here, check it is the same
            from kdray.data import build_datasets

            splits = build_datasets(data["name"], root=data["root"], **data["options"])
            if splits.fingerprint != data["fingerprint"]:
                raise RuntimeError(f"the dataset on this node has fingerprint {splits.fingerprint}, the driver's "
                                   f"has {data['fingerprint']}")
            data = splits.train
        self.train = data
        self.views = None
        if views is not None:  # recorded augmentations: rows are i * views + v, rebuilt from their keys
            from kdray.data.views import ViewDataset

            self.views = ViewDataset(data, views, view_seed)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        model = create_model(teacher["model"], num_classes, **teacher["args"])
        self.model = load_weights(model, state, "teacher", num_classes).eval().to(self.device)
        self.topk, self.float16 = topk, float16

    def __call__(self, batch: dict):
        import numpy as np
        import torch

        ids = np.asarray(batch["index"], dtype=np.int64)
        if self.views is None:
            x = torch.stack([self.train[int(i)][0] for i in ids]).to(self.device)
            index, view, keys = ids, None, None
        else:
            from kdray.data.views import view_key

            x = torch.stack([self.views[int(r)][0] for r in ids]).to(self.device)
            index, view = np.divmod(ids, self.views.views)
            keys = view_key(self.views.seed, index, view)
        with torch.no_grad():
            logits = self.model(x).float().cpu()
        return outputs_table(index, logits, self.topk, self.float16, view, keys)


def write_cache(config, output: str | None = None, *, overrides: list[str] | None = None, topk: int | None = None,
                float16: bool = False, views: int | None = None, view_seed: int = 0, actors: int | None = None,
                batch_size: int = 256, overwrite: bool = False, log=print) -> dict:
    """Run the config's teacher over its training set with Ray Data and write the cache; return the manifest.

    ``views`` (default ``teacher.cache_views``): record N augmentations per sample, keyed by ``view_seed``;
    ``None``: fixed views (the training transform must be deterministic)."""
    import numpy as np
    import pyarrow as pa
    import ray

    from kdray.orchestrator.build import build_splits
    from kdray.orchestrator.runtime import ensure_ray
    from kdray.orchestrator.tracking import tracking_uri_for

    start = time.perf_counter()
    cfg = load_config(config, overrides)
    if cfg.scheme == "lm":
        return write_lm_cache(cfg, output, topk=topk, actors=actors, batch_size=batch_size, overwrite=overwrite,
                              log=log)
    spec = teacher_spec(cfg)
    output = output or spec.cache
    if output is None:
        raise ConfigError("kdray cache needs --output DIR (or teacher.cache in the config)")
    output = os.path.abspath(os.path.expanduser(output))
    if os.path.exists(os.path.join(output, MANIFEST)) and not overwrite:
        raise ConfigError(f"{output} already holds a teacher cache; pass --overwrite to replace it")
    views = views if views is not None else spec.cache_views
    if views is not None and views < 1:
        raise ConfigError(f"--views must be >= 1 (recorded augmentations per sample), got {views}")
    splits = build_splits(cfg)
    if splits.check_files is not None:  # a bad file fails here, not in the middle of the teacher pass
        splits.check_files()
    transform = train_transform(splits.train)
    if transform["random"] and views is None:
        raise ConfigError(f"the training transform of {cfg.data.name!r} is random ({', '.join(transform['random'])}): "
                          f"a fixed-view cache would not match the augmented inputs; make it deterministic "
                          f"(e.g. data.options.augment=false) or record N augmentations with --views N")
    if views is not None and not transform["random"]:
        raise ConfigError(f"--views {views}: the training transform of {cfg.data.name!r} is deterministic, so every "
                          f"view would be the same; cache fixed views (drop --views / teacher.cache_views)")
    if topk is not None and not 0 < topk <= splits.num_classes:
        raise ConfigError(f"--topk must be in [1, {splits.num_classes}] (the class count), got {topk}")
    state, source_kind, source = teacher_state(spec, tracking_uri_for(cfg))
    n = len(splits.train)
    rows = n * (views or 1)

    ensure_ray(cfg.ray.address)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = bool(gpus) if cfg.ray.use_gpu == "auto" else bool(cfg.ray.use_gpu)
    slots = gpus if use_gpu else int(ray.available_resources().get("CPU", 1))
    n_batches = math.ceil(rows / batch_size)
    size = max(1, min(actors or slots, n_batches))
    try:  # actors get the driver's training split (no data files needed on other nodes) ...
        data = ray.put(splits.train)
    except Exception:  # noqa: BLE001  ... unless it cannot be pickled: then each actor rebuilds it
        data = {"name": cfg.data.name, "root": cfg.data.root, "options": cfg.data.builder_options(),
                "fingerprint": splits.fingerprint}
    blocks = np.array_split(np.arange(rows, dtype=np.int64), max(size, min(n_batches, 4 * size)))
    ds = ray.data.from_numpy([b for b in blocks if len(b)]).rename_columns({"data": "index"})
    ds = ds.map_batches(
        TeacherActor, batch_size=batch_size, batch_format="numpy",
        fn_constructor_kwargs={
            "data": data, "teacher": {"model": spec.model, "args": dict(spec.args)}, "state": ray.put(state),
            "num_classes": splits.num_classes, "topk": topk, "float16": float16, "use_gpu": use_gpu,
            "threads": int(cfg.ray.cpus_per_worker), "views": views, "view_seed": int(view_seed)},
        compute=ray.data.ActorPoolStrategy(size=size), num_gpus=1 if use_gpu else 0, num_cpus=cfg.ray.cpus_per_worker)
    table = pa.concat_tables(ray.get(ds.to_arrow_refs())).sort_by([("index", "ascending"), ("view", "ascending")])
    row = table.column("index").to_numpy() * (views or 1) + table.column("view").to_numpy()
    if len(row) != rows or not np.array_equal(row, np.arange(rows)):
        raise RuntimeError(f"the teacher pass returned {len(row)} rows for {n} samples x {views or 1} views")
    manifest = {
        "format": FORMAT_VERSION,
        "file": CACHE_FILE,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "teacher": {"model": spec.model, "args": dict(spec.args), "source_kind": source_kind, "source": source,
                    "state_sha256": state_dict_hash(state)},
        "dataset": {"name": cfg.data.name, "options": cfg.data.builder_options(), "split": "train", "size": n,
                    "num_classes": splits.num_classes, "fingerprint": splits.fingerprint},
        "transform": {"fingerprint": transform["fingerprint"], "description": transform["description"]},
        "views": ({"kind": "fixed", "count": 1} if views is None else
                  {"kind": "recorded", "count": int(views), "seed": int(view_seed), "key": VIEW_KEY}),
        "logits": {"stored": "topk" if topk else "full", "topk": topk,
                   "dtype": "float16" if float16 else "float32"},
        "features": [],
    }
    manifest = save_cache(output, table, manifest)
    size_mb = os.path.getsize(os.path.join(output, CACHE_FILE)) / 2**20
    what = f"top-{topk}" if topk else "full"
    kind = f"{views} recorded views per sample" if views else "fixed views"
    log(f"cached {what} {manifest['logits']['dtype']} logits of {spec.model} for {n} x {splits.num_classes} "
        f"({cfg.data.name}, {kind}) with {size} actor(s) in {time.perf_counter() - start:.1f}s: "
        f"{output} ({size_mb:.2f} MiB); train students with teacher.cache={output}")
    return manifest


def write_lm_cache(cfg: Config, output: str | None = None, *, topk: int | None = None, actors: int | None = None,
                   batch_size: int = 64, overwrite: bool = False, log=print) -> dict:
    """``kdray cache`` of an ``lm`` job: its teacher's top-k (``--topk``, else ``lm.top_k``) at ``lm.temperature``
    on every training window, with Ray Data (:func:`~kdray.orchestrator.lm_cache.write_lm_cache_with_ray`), to
    ``--output`` (else ``lm.topk_cache``); students then train with ``lm.topk_cache`` set. Returns a summary."""
    from kdray.data.lm_topk_cache import bytes_per_token, read_lm_topk_parquet
    from kdray.orchestrator.build import build_splits
    from kdray.orchestrator.lm_cache import write_lm_cache_with_ray
    from kdray.orchestrator.tracking import tracking_uri_for

    if cfg.teacher is None or cfg.teachers:
        raise ConfigError("kdray cache of an lm job caches one teacher: give teacher: (with checkpoint or mlflow_uri)")
    path = output or cfg.lm.topk_cache
    if path is None:
        raise ConfigError("kdray cache of an lm job needs --output FILE.parquet (or lm.topk_cache in the config)")
    k = topk if topk is not None else cfg.lm.top_k
    if k is None:
        raise ConfigError("kdray cache of an lm job stores the teacher's top-k: pass --topk K (or set lm.top_k)")
    state, _, source = teacher_state(cfg.teacher, tracking_uri_for(cfg))
    splits = build_splits(cfg)
    path = os.path.abspath(os.path.expanduser(path))
    write_lm_cache_with_ray({"model": cfg.teacher.model, "args": dict(cfg.teacher.args)}, state,
                            splits.train.windows, vocab_size=splits.num_classes, k=k,
                            temperature=cfg.lm.temperature, path=path, tokenizer=lm_tokenizer_id(cfg),
                            batch_size=batch_size, concurrency=actors or 1, overwrite=overwrite, log=log)
    cache = read_lm_topk_parquet(path)
    summary = {"path": path, "k": cache.k, "temperature": cache.temperature, "sequences": len(cache.indices),
               "tokens": int(cache.indices.shape[0] * cache.indices.shape[1]), "bytes_per_token": bytes_per_token(path),
               "fingerprint": cache.fingerprint, "teacher": source}
    log(f"cached the top-{cache.k} of {cfg.teacher.model} on {summary['tokens']:,} tokens: {path} "
        f"({summary['bytes_per_token']:.1f} bytes/token); train students with lm.topk_cache={path}")
    return summary


def lm_tokenizer_id(cfg: Config) -> str:
    """What an LM cache's fingerprint records of the tokenizer: the data's tokenizer option (``chars``: the
    corpus's own characters, which the token ids' fingerprint covers)."""
    return f"lm_text:{cfg.data.options.get('tokenizer', 'chars')}"


def preflight_cache(cfg: Config, splits, tracking_uri: str | None) -> None:
    """The driver-side checks of a job that trains from a cache: student and methods build, the cache matches.
    Builds no teacher."""
    import torch

    from kdray.algorithms.cached_teacher import CachedTeacher
    from kdray.orchestrator.build import build_distiller, create_spec_model, example_batch

    teacher_spec(cfg)
    student = create_spec_model(cfg.student, "student", splits.num_classes)
    try:
        distiller = build_distiller(cfg, student)
    except (ValueError, TypeError, RuntimeError) as err:
        raise ConfigError(str(err).splitlines()[0]) from None
    manifest = read_manifest(cfg.teacher.cache)  # checked here; the logits are read by the workers (or shards)
    check_cache(manifest, cfg, splits, distiller, tracking_uri)
    check_view_keys(cfg.teacher.cache, manifest)
    example = example_batch(splits.train)
    count = len(example)
    shape_only = CachedTeacher(torch.zeros(count, manifest["dataset"]["num_classes"]), source=cfg.teacher.cache)
    distiller.build(example, shape_only.bind(range(count)), len(splits.train))


# --- command line -----------------------------------------------------------------------------
def _cmd_cache(args) -> int:
    write_cache(args.config, args.output, overrides=args.overrides, topk=args.topk, float16=args.float16,
                views=args.views, view_seed=args.view_seed, actors=args.actors, batch_size=args.batch_size,
                overwrite=args.overwrite)
    return 0


def add_parser(subparsers) -> None:
    """Register ``kdray cache CONFIG [overrides] --output DIR [--topk K] [--float16] [--views N]``."""
    p = subparsers.add_parser("cache", help="run the teacher over the training set once and cache its logits "
                                            "(Parquet); students then train with teacher.cache=DIR")
    p.add_argument("config", help="job YAML (or packaged example); its teacher needs checkpoint or mlflow_uri")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. teacher.checkpoint=t.pt")
    p.add_argument("--output", default=None, help="cache directory (default: teacher.cache from the config)")
    p.add_argument("--topk", type=int, default=None, help="store only the top-k logits (+ logsumexp)")
    p.add_argument("--float16", action="store_true", help="store logits as float16 (half the size)")
    p.add_argument("--views", type=int, default=None,
                   help="record N augmentations per sample (random training transforms; default: "
                        "teacher.cache_views, else fixed views)")
    p.add_argument("--view-seed", type=int, default=0, help="seed of the recorded views' keys")
    p.add_argument("--actors", type=int, default=None, help="teacher actors (default: one per GPU or CPU slot)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache in --output")
    p.set_defaults(func=_cmd_cache)
