"""The sidecar: one process that owns the tiers and serves many engines.

Owns: the server (``server``: ZeroMQ ROUTER loop, namespaces, shared-memory data plane,
claims), the wire protocol (``protocol``: msgpack frames, versioned headers, error codes),
security (``security``: bind checks, CurveZMQ keys and allow-lists) and the identity of a
client process (``procinfo``).

Sits above the store: it may import the store core, ``kvstore.restore`` and ``allocator``;
never the command line, the benchmarks or the clients.
"""
