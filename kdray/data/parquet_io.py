"""Writing a Parquet file so that a killed writer never leaves half of one: the one way kdray's data files
(image sets, graphs, LM top-k caches) reach disk."""
from __future__ import annotations

import json
import os


def write_parquet_atomically(table, path: str, meta_key: bytes | None = None, meta: dict | None = None) -> str:
    """Write the pyarrow ``table`` to ``path`` through a temporary file in the same folder and ``os.replace``
    (atomic on POSIX), with ``meta`` as JSON under the schema metadata key ``meta_key`` when given; readers see
    either the old file or the whole new one. Returns ``path``."""
    import pyarrow.parquet as pq

    if meta_key is not None:
        table = table.replace_schema_metadata({meta_key: json.dumps(meta).encode()})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path
