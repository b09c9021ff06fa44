"""Engines plugged into the store: adapters that engines load by name.

Owns ``kvstore.integrations.vllm`` (``KVStoreConnector``, the vLLM v1 KV connector vLLM
loads by module path). The only room that imports an engine (vLLM), and only in its own
modules, so nothing below it needs vLLM installed.

Imports: the clients (``clients.connect``: embedded, or the sidecar over ipc/tcp), the
store core (layout, paged pools, errors) and ``kvstore.restore`` (the cost model and
planner that decide load or prefill). Nothing of ours imports this room; the command line
and the benchmarks may.
"""
