"""The teacher-output cache as stored: its format, identity checks and readers (``teacher.cache=DIR``).

Identity: the teacher (model, args and a SHA-256 of its state_dict bytes), the dataset
(``DatasetSplits.fingerprint``, size, class count) and the training transform (a fingerprint of its repr).
A run whose teacher weights, data or transform differ is refused with a one-line :class:`ConfigError`.

Views: a cache covers either *fixed* views (a deterministic training transform: digits, fake, CIFAR with
``augment: false``; row = sample index) or ``--views N`` *recorded augmentations* per sample (the FKD idea):
view ``v`` of sample ``i`` is the split's own random transform run with every generator seeded by
``view_key(view_seed, i, v)`` (:mod:`kdray.data.views`), and each row stores index, view and that key. A
student then rebuilds exactly those views (epoch ``e`` uses view ``(e + offset_i) % N``) and its batches carry
the row id ``i * N + v``. A fixed-view cache with a random training transform is refused (Beyer et al. 2022:
a cache is sound only for the exact view), and so is a run asking for more views than cached
(``teacher.cache_views``).

Reading: in-process (and on a single worker) the Parquet file is read with pyarrow into one row-addressed
``[rows, C]`` tensor (:class:`~kdray.algorithms.cached_teacher.CachedTeacher`). A data-parallel Ray Train run
(``ray.num_workers > 1``) passes the cache to the trainer as one Ray Dataset per rank (``datasets=``, not split
by Train: each is the Parquet file filtered to the samples ``i % world == rank``); each worker materialises
only its dataset shard (``ray.train.get_dataset_shard``), so it holds 1/world of the rows, and trains on
exactly those samples (:class:`~kdray.data.views.ShardSampler`, reshuffled per epoch by seed + epoch, so a
resumed run sees the same batches). Caches hold logits only: a feature or relation method asked to train
from one gets a one-line error.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

from kdray.config import Config, ConfigError

CACHE_FILE = "teacher_outputs.parquet"
MANIFEST = "manifest.json"
META_KEY = b"kdray.cache"
FORMAT_VERSION = 2  # 2: manifest.json records each file's size and SHA-256
VIEW_KEY = "splitmix64(splitmix64(splitmix64(seed) ^ index) ^ view) >> 1"  # kdray.data.views.view_key
CACHE_DATASET = "kdray_teacher_cache_rank{rank}"  # one Ray Dataset per Train worker rank
# Transform classes that draw random numbers per call (besides every ``Random*`` class).
RANDOM_TRANSFORMS = {"ColorJitter", "AutoAugment", "RandAugment", "TrivialAugmentWide", "AugMix", "GaussianBlur",
                     "ElasticTransform", "GaussianNoise", "MixUp", "CutMix", "ScaleJitter"}


# --- identities -------------------------------------------------------------------------------
def state_dict_hash(state: dict) -> str:
    """SHA-256 over the state_dict's keys (sorted), dtypes, shapes and raw tensor bytes."""
    import torch

    h = hashlib.sha256()
    for key in sorted(state):
        value = state[key]
        if not isinstance(value, torch.Tensor):
            h.update(f"{key}={value!r};".encode())
            continue
        t = value.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _transforms_of(dataset) -> list:
    """The transforms applied along a dataset's wrapper chain (IndexedDataset -> Subset -> ... -> base)."""
    found, stack, seen = [], [dataset], set()
    while stack:
        ds = stack.pop()
        if ds is None or id(ds) in seen:
            continue
        seen.add(id(ds))
        for attr in ("transform", "target_transform"):
            t = getattr(ds, attr, None)
            if t is not None:
                found.append(t)
        stack += [getattr(ds, "base", None), getattr(ds, "dataset", None), *getattr(ds, "datasets", [])]
    return found


def _random_parts(transform) -> list[str]:
    import torch

    name = type(transform).__name__
    parts = [name] if name.startswith("Random") or name in RANDOM_TRANSFORMS else []
    for child in getattr(transform, "transforms", None) or []:
        parts += _random_parts(child)
    if isinstance(transform, torch.nn.Module):
        for child in transform.children():
            parts += _random_parts(child)
    return list(dict.fromkeys(parts))


def train_transform(dataset) -> dict:
    """``{"description", "fingerprint", "random": [random transform names]}`` of a training split."""
    found = _transforms_of(dataset)
    text = " | ".join(re.sub(r" at 0x[0-9a-fA-F]+", "", repr(t)) for t in found) or "none"
    random_parts = [p for t in found for p in _random_parts(t)]
    return {"description": " ".join(text.split()), "fingerprint": hashlib.sha256(text.encode()).hexdigest()[:16],
            "random": list(dict.fromkeys(random_parts))}


def teacher_spec(cfg: Config):
    spec = getattr(cfg, "teacher", None)
    if spec is None or cfg.scheme != "offline":
        raise ConfigError(f"the teacher-output cache works with one teacher (scheme 'offline'), not scheme "
                          f"{cfg.scheme!r}")
    return spec


def teacher_state(spec, tracking_uri: str | None) -> tuple[dict, str, str]:
    """The teacher's raw state_dict (unwrapped, as loaded into the model), its source kind and its source."""
    from kdray.orchestrator.weights import read_weights, unwrap_state

    if spec.checkpoint is not None:
        state = read_weights(spec.checkpoint, "teacher.checkpoint")
        return unwrap_state(state), "checkpoint", spec.checkpoint
    if spec.mlflow_uri is not None:
        from kdray.orchestrator.tracking import download_model

        logged, state = download_model(spec.mlflow_uri, tracking_uri)
        if logged.get("model") != spec.model:
            raise ConfigError(f"teacher.mlflow_uri holds a {logged.get('model')!r}, config says {spec.model!r}")
        return unwrap_state(state), "mlflow_uri", spec.mlflow_uri
    if spec.train is not None:
        raise ConfigError("teacher.train: this teacher must be trained first (kdray run), then cached from its "
                          "weights via teacher.checkpoint or teacher.mlflow_uri")
    raise ConfigError("kdray cache needs the teacher's weights: set teacher.checkpoint or teacher.mlflow_uri")


def file_sha256(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def save_cache(output: str, table, manifest: dict) -> dict:
    """Write a cache directory: the Parquet file (the manifest in its schema metadata), then ``manifest.json``,
    the manifest plus the file's size and SHA-256 (``files``), which :func:`read_manifest` verifies. Returns
    the manifest as written to ``manifest.json``."""
    import pyarrow.parquet as pq

    manifest = {k: v for k, v in manifest.items() if k != "files"}  # the file's own checksum lives beside it
    os.makedirs(output, exist_ok=True)
    file, tmp = os.path.join(output, CACHE_FILE), os.path.join(output, CACHE_FILE + ".tmp")
    pq.write_table(table.replace_schema_metadata({META_KEY: json.dumps(manifest).encode()}), tmp)
    os.replace(tmp, file)
    manifest = {**manifest, "files": {CACHE_FILE: {"bytes": os.path.getsize(file), "sha256": file_sha256(file)}}}
    with open(os.path.join(output, MANIFEST), "w") as fh:
        json.dump(manifest, fh, indent=2)
    return manifest


# --- reading and checking ---------------------------------------------------------------------
def verify_files(path: str, files: dict) -> None:
    """Each file the manifest lists has its recorded size and SHA-256; else a one-line :class:`ConfigError`
    naming the file and saying to rebuild the cache."""
    rebuild = f"rebuild it with `kdray cache CONFIG --output {path} --overwrite`"
    for name, want in files.items():
        file = os.path.join(path, name)
        size = os.path.getsize(file) if os.path.isfile(file) else None
        if size != want["bytes"]:
            state = "is missing" if size is None else f"is truncated or replaced ({size} bytes, {MANIFEST} records " \
                                                      f"{want['bytes']})"
            raise ConfigError(f"teacher.cache file {file} {state}; {rebuild}")
        if file_sha256(file) != want["sha256"]:
            raise ConfigError(f"teacher.cache file {file} is corrupt (its SHA-256 differs from the one in "
                              f"{MANIFEST}); {rebuild}")


def read_manifest(path: str) -> dict:
    """The cache's identity, from the Parquet schema metadata (authoritative), once the file's size and SHA-256
    match ``manifest.json`` (whose ``files`` entry is added to it); a one-line error if anything is off."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    file, listing = os.path.join(path, CACHE_FILE), os.path.join(path, MANIFEST)
    if not os.path.isfile(file) or not os.path.isfile(listing):
        raise ConfigError(f"teacher.cache {path} is not a teacher cache ({CACHE_FILE} and {MANIFEST} expected); "
                          f"write one with `kdray cache CONFIG --output {path}`")
    rebuild = f"rebuild it with `kdray cache CONFIG --output {path} --overwrite`"
    try:
        with open(listing) as fh:
            listed = json.load(fh)
    except (OSError, ValueError) as err:
        raise ConfigError(f"teacher.cache file {listing} is unreadable ({err}); {rebuild}") from None
    if not isinstance(listed, dict) or listed.get("format") != FORMAT_VERSION or not listed.get("files"):
        got = listed.get("format") if isinstance(listed, dict) else None
        raise ConfigError(f"teacher.cache {path} has format {got}, this kdray reads {FORMAT_VERSION} (with "
                          f"checksums); {rebuild}")
    verify_files(path, listed["files"])
    try:
        meta = (pq.read_schema(file).metadata or {}).get(META_KEY)
    except (pa.ArrowException, OSError) as err:
        raise ConfigError(f"teacher.cache file {file} is not readable Parquet ({err}); {rebuild}") from None
    if meta is None:
        raise ConfigError(f"teacher.cache {path}: {CACHE_FILE} carries no kdray.cache metadata; {rebuild}")
    manifest = json.loads(meta)
    if manifest.get("format") != FORMAT_VERSION:
        raise ConfigError(f"teacher.cache {path} has format {manifest.get('format')}, this kdray reads "
                          f"{FORMAT_VERSION}; {rebuild}")
    return {**manifest, "files": listed["files"]}


def _column(table, name: str, width: int) -> np.ndarray:
    import numpy as np

    return np.array(table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)).reshape(-1, width)


def _views(manifest: dict) -> tuple[int, int | None]:
    """(views per sample, key seed or None for fixed views) of a cache."""
    views = manifest.get("views", {"kind": "fixed", "count": 1})
    return int(views["count"]), (int(views["seed"]) if views["kind"] == "recorded" else None)


def logits_columns(manifest: dict) -> list[str]:
    """The Parquet columns a reader needs (no augmentation keys)."""
    stored = manifest["logits"]["stored"]
    return ["index", "view", *(["logits"] if stored == "full" else ["topk_values", "topk_indices", "lse"])]


def teacher_from_table(table, manifest: dict, source: str, shard: tuple[int, int] | None = None):
    """A :class:`CachedTeacher` from cache rows (a pyarrow table). ``shard=None``: the table is the whole cache,
    stored densely by row id; ``(rank, world)``: the table is that worker's shard (samples ``i % world ==
    rank``), kept with its sorted row ids."""
    import numpy as np
    import torch

    from kdray.algorithms.cached_teacher import CachedTeacher, logits_from_topk

    n, classes = manifest["dataset"]["size"], manifest["dataset"]["num_classes"]
    views, seed = _views(manifest)
    index = table.column("index").to_numpy().astype(np.int64)
    row = torch.from_numpy(index * views + table.column("view").to_numpy().astype(np.int64))
    if manifest["logits"]["stored"] == "full":
        values = torch.from_numpy(_column(table, "logits", classes).astype(np.float32))
    else:
        k = manifest["logits"]["topk"]
        values = logits_from_topk(torch.from_numpy(_column(table, "topk_values", k).astype(np.float32)),
                                  torch.from_numpy(_column(table, "topk_indices", k)),
                                  torch.from_numpy(np.array(table.column("lse").to_numpy())), classes)
    if shard is None:
        want = torch.arange(n * views)
    else:
        from kdray.data.views import shard_of

        want = (torch.from_numpy(shard_of(n, *shard))[:, None] * views + torch.arange(views)).reshape(-1)
    order = torch.argsort(row)
    row, values = row[order], values[order]
    if not torch.equal(row, want):
        where = "" if shard is None else f" (shard {shard[0]} of {shard[1]})"
        raise ConfigError(f"teacher.cache {source} holds {len(row)} rows{where} that do not cover its {n} samples x "
                          f"{views} views once each; rebuild it with `kdray cache`")
    return CachedTeacher(values, source=source, rows=None if shard is None else row, views=views, view_seed=seed,
                         num_samples=n)


def load_cached_teacher(path: str, manifest: dict | None = None):
    """Read the Parquet file into a row-addressed :class:`CachedTeacher` (dense float32 ``[rows, C]``)."""
    import pyarrow.parquet as pq

    manifest = manifest or read_manifest(path)
    table = pq.read_table(os.path.join(path, CACHE_FILE), columns=logits_columns(manifest))
    return teacher_from_table(table, manifest, path)


def keep_shard(table, rank: int, world: int):
    """Ray Data ``map_batches`` function: the rows of samples ``index % world == rank``."""
    import pyarrow as pa

    return table.filter(pa.array(table.column("index").to_numpy() % world == rank))


def shard_datasets(cfg: Config) -> dict:
    """``TorchTrainer`` keyword arguments that hand a data-parallel job its cache as Ray Data shards: one
    Dataset per rank (the Parquet file filtered to that rank's samples), none of them split again by Train
    (``DataConfig(datasets_to_split=[])``), so the sharding is fixed and a restarted worker gets the same rows.
    Empty when the job does not train from a cache or runs on one worker."""
    spec = getattr(cfg, "teacher", None)
    world = cfg.ray.num_workers
    if world <= 1 or cfg.scheme != "offline" or spec is None or spec.cache is None:
        return {}
    import ray.data
    from ray.train import DataConfig

    manifest = read_manifest(spec.cache)
    file = os.path.join(spec.cache, CACHE_FILE)
    datasets = {CACHE_DATASET.format(rank=r): ray.data.read_parquet(file, columns=logits_columns(manifest))
                .map_batches(keep_shard, batch_format="pyarrow", batch_size=None,
                             fn_kwargs={"rank": r, "world": world})
                for r in range(world)}
    return {"datasets": datasets, "dataset_config": DataConfig(datasets_to_split=[])}


def _read_shard(path: str, manifest: dict, rank: int, world: int):
    """This Train worker's shard of the cache from its Ray Dataset (``None`` when the trainer got none)."""
    try:
        import ray.train

        iterator = ray.train.get_dataset_shard(CACHE_DATASET.format(rank=rank))
    except (ImportError, KeyError, RuntimeError, AttributeError):
        return None
    if iterator is None:
        return None
    import pyarrow as pa

    batches = [b for b in iterator.iter_batches(batch_size=None, batch_format="pyarrow") if b.num_rows]
    table = pa.concat_tables(batches)
    teacher = teacher_from_table(table, manifest, path, shard=(rank, world))
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        counts = [None] * world
        dist.all_gather_object(counts, teacher.num_rows)
        teacher.rows_per_worker = counts
    return teacher


def _needs_features(distiller) -> list[str]:
    return [f"{t.name!r} ({t.kind})" for t in distiller.terms
            if t.kind in ("feature", "relation") or getattr(t, "teacher_points_request", None)]


def check_cache(manifest: dict, cfg: Config, splits, distiller=None, tracking_uri: str | None = None) -> None:
    """Refuse, in one line each, a cache that does not match this run's teacher, data, transform or methods."""
    spec = teacher_spec(cfg)
    path = spec.cache
    rebuild = f"rebuild it with `kdray cache CONFIG --output {path} --overwrite`"
    if distiller is not None and not manifest.get("features"):
        needs = _needs_features(distiller)
        if needs:
            raise ConfigError(f"method {needs[0]} needs teacher features, but teacher.cache {path} holds logits "
                              f"only; train it from a live teacher (teacher.checkpoint / teacher.mlflow_uri "
                              f"without teacher.cache) or use a response method (kd, dkd, lskd)")
    transform = train_transform(splits.train)
    views, seed = _views(manifest)
    if transform["random"] and seed is None:
        raise ConfigError(f"teacher.cache {path} holds fixed views, but this run's training transform is random "
                          f"({', '.join(transform['random'])}); make it deterministic (e.g. "
                          f"data.options.augment=false), record augmentations with `kdray cache CONFIG --views N` "
                          f"or train from a live teacher")
    mt, md = manifest["teacher"], manifest["dataset"]
    if (mt["model"], mt["args"]) != (spec.model, dict(spec.args)):
        raise ConfigError(f"teacher.cache {path} holds outputs of {mt['model']} {mt['args']}, but teacher is "
                          f"{spec.model} {dict(spec.args)}")
    if md["name"] != cfg.data.name or md["fingerprint"] != splits.fingerprint:
        raise ConfigError(f"teacher.cache {path} is stale: it covers dataset {md['name']} {md['options']} "
                          f"(fingerprint {md['fingerprint']}), this run uses {cfg.data.name} {cfg.data.builder_options()} "
                          f"(fingerprint {splits.fingerprint}); {rebuild}")
    if md["size"] != len(splits.train) or md["num_classes"] != splits.num_classes:
        raise ConfigError(f"teacher.cache {path} covers {md['size']} samples x {md['num_classes']} classes, this "
                          f"run's training set has {len(splits.train)} x {splits.num_classes}; {rebuild}")
    if transform["fingerprint"] != manifest["transform"]["fingerprint"]:
        raise ConfigError(f"teacher.cache {path} is stale: it was made with training transform "
                          f"{manifest['transform']['fingerprint']} ({manifest['transform']['description'][:60]}), "
                          f"this run's is {transform['fingerprint']} ({transform['description'][:60]}); {rebuild}")
    if spec.cache_views is not None and spec.cache_views > views:
        raise ConfigError(f"teacher.cache_views={spec.cache_views}, but teacher.cache {path} holds {views} "
                          f"{'recorded' if seed is not None else 'fixed'} view(s) per sample; lower "
                          f"teacher.cache_views or rebuild it with `kdray cache CONFIG --views {spec.cache_views} "
                          f"--output {path} --overwrite`")
    if seed is not None and manifest["views"].get("key") != VIEW_KEY:
        raise ConfigError(f"teacher.cache {path} keys its views with {manifest['views'].get('key')!r}, this kdray "
                          f"with {VIEW_KEY!r}: its views cannot be rebuilt; {rebuild}")
    _check_teacher_weights(manifest, spec, tracking_uri, rebuild)


def _check_teacher_weights(manifest: dict, spec, tracking_uri: str | None, rebuild: str) -> None:
    """Compare the cache's teacher hash with the weights the config names (hashed, never built into a model):
    ``teacher.checkpoint`` / ``teacher.mlflow_uri`` when given beside ``teacher.cache``, else the checkpoint
    file the cache was made from, if it still exists."""
    want = manifest["teacher"]["state_sha256"]
    if spec.checkpoint is not None or spec.mlflow_uri is not None:
        state, kind, source = teacher_state(spec, tracking_uri)
        where = f"teacher.{kind} {source}"
    elif manifest["teacher"]["source_kind"] == "checkpoint" and os.path.isfile(manifest["teacher"]["source"]):
        source = manifest["teacher"]["source"]
        state, _, _ = teacher_state(spec.model_copy(update={"checkpoint": source}), None)
        where = f"its source checkpoint {source} now"
    else:
        return
    got = state_dict_hash(state)
    if got != want:
        raise ConfigError(f"teacher.cache {spec.cache} is stale: it was made from teacher weights {want[:12]}, "
                          f"but {where} holds {got[:12]}; {rebuild}")


def check_view_keys(path: str, manifest: dict, sample: int = 64) -> None:
    """The first rows' stored augmentation keys must be the keys this kdray derives (else the views the student
    rebuilds would not be the ones the teacher saw)."""
    import numpy as np
    import pyarrow.parquet as pq

    from kdray.data.views import view_key

    views, seed = _views(manifest)
    if seed is None:
        return
    file = pq.ParquetFile(os.path.join(path, CACHE_FILE))
    head = next(file.iter_batches(batch_size=sample, columns=["index", "view", "aug_key"]))
    got = head.column("aug_key").to_numpy()
    want = view_key(seed, head.column("index").to_numpy(), head.column("view").to_numpy())
    if not np.array_equal(got, want):
        raise ConfigError(f"teacher.cache {path}: its stored augmentation keys differ from the keys of its manifest's "
                          f"seed {seed}; rebuild it with `kdray cache CONFIG --views {views} --output {path} "
                          f"--overwrite`")


def open_cache_for_run(cfg: Config, splits, distiller=None, tracking_uri: str | None = None, rank: int = 0,
                       world: int = 1):
    """Check the configured cache against this run and read it: the :class:`CachedTeacher` a stage uses.
    A data-parallel Train worker (``world > 1``) whose trainer got the cache as Ray Datasets
    (:func:`shard_datasets`) reads only its shard; otherwise the whole file is read."""
    manifest = read_manifest(cfg.teacher.cache)
    check_cache(manifest, cfg, splits, distiller, tracking_uri)
    check_view_keys(cfg.teacher.cache, manifest)
    teacher = _read_shard(cfg.teacher.cache, manifest, rank, world) if world > 1 else None
    if teacher is None:
        teacher = load_cached_teacher(cfg.teacher.cache, manifest)
    teacher.use_views = cfg.teacher.cache_views or teacher.views
    return teacher


def uses_cache(cfg: Config) -> bool:
    return any(getattr(spec, "cache", None) is not None for spec in _specs(cfg))


def _specs(cfg: Config) -> list:
    if hasattr(cfg, "teacher_specs"):
        return cfg.teacher_specs()
    return [cfg.teacher] if getattr(cfg, "teacher", None) is not None else []
