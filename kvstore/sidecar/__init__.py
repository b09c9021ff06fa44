"""The sidecar: one process that owns the tiers and serves many engines.

Owns: the server (``server``: bind and the ZeroMQ ROUTER loop), the op table
(``dispatch``), the handlers by what they serve (``session_ops``, ``store_ops``, the
shared-memory data plane ``shm_plane``, the engines' GPU pools ``gpu_pool``), what a
handler sees (``context``), the namespaces and their shared arenas (``namespaces``), the
claims clients hold and their reaper (``claims``), counters and Prometheus (``metrics``),
the knobs (``options``), the wire protocol (``protocol``: msgpack frames, versioned headers,
error codes), security (``security``: bind checks, CurveZMQ keys and allow-lists), bounds
(``limits``) and the identity of a client process (``procinfo``).

Sits above the store: it may import the store core, ``kvstore.restore`` and ``allocator``;
never the command line, the benchmarks or the clients. Inside it nothing imports ``server``
(only the command line and the benchmarks do) and the modules import each other downwards
only (``tests/test_imports.py``: ``SIDECAR_LAYERS``).
"""
