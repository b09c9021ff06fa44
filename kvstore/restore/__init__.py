"""The restore engine: turns located blocks into a plan and runs it.

Owns: the cost model (``costmodel``: link and compute rates, predictions), the planner
(``planner``: per block, read KV, read activations and recompute, or leave to prefill),
the executor (``executor``: reads, copies and recompute overlapped, layer by layer), quick
profiles measured at the shapes planned for (``profiles``), the machine measurements
behind ``kvstore calibrate`` (``calibrate``), and a plan as plain data for the sidecar's and
the clients' ``plan`` (``summary``).

Sits beside the store core: it may import the core (layout, errors, arenas through
``allocator``) and the core's ``KVStore`` calls into it; it never imports the sidecar, the
command line, the benchmarks, the model adapters or the clients.
"""
