"""Trace readers: Mooncake JSONL, libCacheSim oracleGeneral binary, CSV ``key[,size]``.

Every reader returns a :class:`Trace`: a flat list of block/object accesses plus request
boundaries (a Mooncake request is a run of chained blocks; in the other formats every
access is its own request). Parents are derived from the chain (the previous block of the
same request) so prefix-aware policies see the structure.
"""

from __future__ import annotations

import csv
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

#: next-access value for "never again"
NEVER = -1

ORACLE_RECORD = struct.Struct("<IQIq")  # time, obj_id, obj_size, next_access_vtime


@dataclass
class Trace:
    """A trace flattened to accesses. ``starts[i]`` is the index of request i's first access
    (``starts`` ends with ``len(keys)``). ``sizes`` is None for unit-size (block) traces."""

    name: str
    keys: list
    starts: list[int]
    sizes: list[int] | None = None
    parents: list | None = None
    unit: str = "blocks"
    _next: list[int] | None = field(default=None, repr=False)

    @property
    def n_accesses(self) -> int:
        return len(self.keys)

    @property
    def n_requests(self) -> int:
        return len(self.starts) - 1

    def next_access(self) -> list[int]:
        """Index of each access's next access of the same key (``NEVER`` if none). O(n)."""
        if self._next is None:
            nxt = [NEVER] * len(self.keys)
            last: dict = {}
            keys = self.keys
            for i in range(len(keys) - 1, -1, -1):
                k = keys[i]
                nxt[i] = last.get(k, NEVER)
                last[k] = i
            self._next = nxt
        return self._next

    def working_set(self) -> tuple[int, int]:
        """(distinct keys, their total size)."""
        if self.sizes is None:
            n = len(set(self.keys))
            return n, n
        seen: dict = {}
        for k, s in zip(self.keys, self.sizes):
            seen[k] = s
        return len(seen), sum(seen.values())


def read_mooncake(path: str | os.PathLike, limit: int | None = None) -> Trace:
    """Mooncake JSONL: one request per line with ``hash_ids`` (chained 512-token blocks)."""
    keys: list = []
    parents: list = []
    starts: list[int] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if limit is not None and n >= limit:
                break
            line = line.strip()
            if not line:
                continue
            ids = json.loads(line)["hash_ids"]
            starts.append(len(keys))
            parent = None
            for h in ids:
                keys.append(h)
                parents.append(parent)
                parent = h
    starts.append(len(keys))
    return Trace(Path(path).name, keys, starts, None, parents, "blocks")


def read_oracle_general(path: str | os.PathLike, limit: int | None = None) -> Trace:
    """libCacheSim oracleGeneral: little-endian 24-byte records (sizes in bytes)."""
    data = Path(path).read_bytes()
    n = len(data) // ORACLE_RECORD.size
    if limit is not None:
        n = min(n, limit)
    keys: list = []
    sizes: list[int] = []
    for _t, obj, size, _nxt in ORACLE_RECORD.iter_unpack(data[: n * ORACLE_RECORD.size]):
        keys.append(obj)
        sizes.append(size if size > 0 else 1)
    return Trace(Path(path).name, keys, list(range(n + 1)), sizes, None, "bytes")


def read_csv(path: str | os.PathLike, limit: int | None = None) -> Trace:
    """CSV ``key[,size]`` (a header line is skipped if its size column is not a number)."""
    keys: list = []
    sizes: list[int] = []
    sized = False
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.reader(f):
            if not row or row[0].startswith("#"):
                continue
            key = row[0].strip()
            size = 1
            if len(row) > 1 and row[1].strip():
                try:
                    size = int(row[1])
                except ValueError:
                    if not keys:
                        continue  # header
                    raise
                sized = True
            elif not keys and key.lower() in ("key", "id", "obj_id"):
                continue
            keys.append(int(key) if key.lstrip("-").isdigit() else key)
            sizes.append(max(size, 1))
            if limit is not None and len(keys) >= limit:
                break
    return Trace(Path(path).name, keys, list(range(len(keys) + 1)),
                 sizes if sized else None, None, "bytes" if sized else "blocks")


def read_trace(path: str | os.PathLike, fmt: str = "auto", limit: int | None = None) -> Trace:
    """Read by format name (``mooncake``, ``oracle``, ``csv``) or guess from the file name."""
    p = str(path)
    if fmt == "auto":
        if p.endswith((".jsonl", ".json")):
            fmt = "mooncake"
        elif ".oracleGeneral" in p or p.endswith(".bin"):
            fmt = "oracle"
        elif p.endswith((".csv", ".txt")):
            fmt = "csv"
        else:
            raise ValueError(f"cannot guess the format of {p!r}; pass --format")
    readers = {"mooncake": read_mooncake, "oracle": read_oracle_general, "csv": read_csv}
    try:
        return readers[fmt](path, limit)
    except KeyError:
        raise ValueError(f"unknown trace format {fmt!r}; choose one of {sorted(readers)}") from None


def traces_dir() -> Path:
    """Where the shared public traces live: ``$KVSTORE_TRACES`` or ``<repo>/../shared/traces``."""
    env = os.environ.get("KVSTORE_TRACES")
    if env:
        return Path(env)
    return (Path(__file__).resolve().parents[1] / ".." / "shared" / "traces").resolve()
