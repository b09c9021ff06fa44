"""Down-sampled slices of the shared Mooncake-format traces (for tests/eviction/test_kv_families.py).

A slice keeps whole requests, in order, so chains and their reuse stay intact:

* ``window``: a contiguous run of requests (conversation, synthetic: one shared root, so
  sessions cannot be told apart);
* ``sessions``: every request of the sessions whose root id falls in one residue class,
  with ``coarsen`` consecutive 512-token blocks merged into one (a request keeps every
  ``coarsen``-th id, named by its last, as the trace's own conversion does from 64-token
  hashes): the agentic trace's requests are ~260 blocks long, too long for a fast test.

The shipped files in ``data/`` were written by :func:`write_shipped` from the shared traces
(sha256 in ``../shared/traces/README.md``). Reading is O(file); no state.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

DATA = Path(__file__).parent / "data"

#: name -> (shared file, how it is sliced for the shipped copy, a second slice used when the
#: shared file is present)
SLICES: dict[str, tuple[str, dict, dict]] = {
    "conversation": ("conversation_trace.jsonl", {"window": (0, 1500)}, {"window": (6000, 7500)}),
    "synthetic": ("synthetic_trace.jsonl", {"window": (0, 1000)}, {"window": (2000, 3000)}),
    "agentic": ("agentic_trace.jsonl", {"sessions": (4, 0), "coarsen": 8},
                {"sessions": (4, 2), "coarsen": 8}),
}


def slice_requests(lines, window: tuple[int, int] | None = None,
                   sessions: tuple[int, int] | None = None, coarsen: int = 1) -> list[list[int]]:
    """The ``hash_ids`` of the requests a slice keeps (see the module docstring)."""
    out = []
    for i, line in enumerate(lines):
        if window is not None and not window[0] <= i < window[1]:
            continue
        ids = json.loads(line)["hash_ids"]
        if sessions is not None:
            mod, rest = sessions
            if (ids[0] // 10**7) % mod != rest:  # agentic roots: session * 10**7 + block
                continue
        ids = ids[coarsen - 1::coarsen]
        if ids:
            out.append(ids)
    return out


def write_jsonl(path: Path, reqs: list[list[int]]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for ids in reqs:
            f.write(json.dumps({"hash_ids": ids}) + "\n")
    return path


def shipped(name: str, tmp: Path) -> Path:
    """The shipped slice ``name`` unpacked to a JSONL file under ``tmp``."""
    with gzip.open(DATA / f"{name}.jsonl.gz", "rt", encoding="utf-8") as f:
        return write_jsonl(tmp / f"{name}.jsonl", [json.loads(line)["hash_ids"] for line in f])


def write_shipped(traces: Path) -> None:
    """Regenerate ``data/*.jsonl.gz`` from the shared traces (run by hand)."""
    for name, (file, spec, _) in SLICES.items():
        with open(traces / file, encoding="utf-8") as f:
            reqs = slice_requests(f, **spec)
        with gzip.open(DATA / f"{name}.jsonl.gz", "wt", encoding="utf-8", compresslevel=9) as g:
            g.writelines(json.dumps({"hash_ids": ids}, separators=(",", ":")) + "\n" for ids in reqs)


if __name__ == "__main__":
    import sys

    from eviction.traces import traces_dir

    write_shipped(Path(sys.argv[1]) if len(sys.argv) > 1 else traces_dir())
