"""kvstore as a vLLM KV connector (the v1 connector API of vLLM 0.32).

vLLM loads it by module path::

    KVTransferConfig(kv_connector="KVStoreConnector", kv_connector_module_path="kvstore.integrations.vllm",
                     kv_role="kv_both", kv_load_failure_policy="recompute",
                     kv_connector_extra_config={"endpoint": "ipc:///run/kvstore.sock", "namespace": "llama-8b"})

vLLM runs one connector object per role: the **scheduler** side (in the engine core) decides
how many prompt tokens to load from the store, the **worker** side (beside the model) moves
the bytes. They are separate processes, so ``endpoint`` is normally a sidecar (``kvstore
serve``) both reach; ``embedded://`` keeps one in-process store for an engine whose
scheduler and worker share a process (``distributed_executor_backend="uni"`` with
``VLLM_ENABLE_V1_MULTIPROCESSING=0``).

Scheduler side, per waiting request:

* ``get_num_new_matched_tokens`` asks the store, off the scheduler thread (a lookup, then the
  planner's verdict), and answers ``None`` until the reply is in, so the scheduler loop
  never waits on a round trip;
* the verdict is the restore planner's (``kvstore.restore``): with the tier of each cached
  block, the links' costs and this engine's prefill rate (``prefill_tokens_per_s``, else
  measured from the engine's own steps), the tokens whose load beats prefilling them; the
  rest is left to vLLM. Remote-tier (Redis) continuations count only when reading them
  beats prefilling them. The decision is logged (``kvstore-connector decision``) and
  counted in the connector stats;
* ``update_state_after_alloc`` / ``build_connector_meta`` carry the vLLM block ids to load
  into and, once a prompt's prefill is done, the ids of its full blocks to save;
* ``request_finished`` keeps a request's blocks until the worker reports its save done.

Worker side:

* ``register_kv_caches`` takes the engine's per-layer tensors and names their layout (a
  :class:`~kvstore.layout.PoolLayout`, recognised from the shapes; vLLM 0.32's CPU backend
  hands ``[num_blocks, kv_heads, block_size, 2 * head_dim]``);
* ``start_load_kv`` copies the planned blocks, from vLLM's first missing one on, straight
  into the pool before the forward pass (``load_into(..., start=k)``, verified; vLLM's own
  hit is neither read nor written; a strided pool such as the CPU backend's goes through
  the client's reusable bounce rows); a block that vanished or changed
  (checksum) since the lookup is reported by ``get_block_ids_with_load_errors``, and vLLM
  recomputes it: never wrong KV;
* ``wait_for_save`` hands the step's saves to a connector-owned thread (its own client), so
  the next forward pass runs while they are copied; ``get_finished`` reports a finished
  request once its saves are done.

A store that stops answering (sidecar killed, network gone) is skipped for
``retry_after_s`` (lookups answer 0, saves are dropped, loads fail to recompute); the engine
keeps serving. vLLM's block size must be a multiple of the store's ``block_tokens``
(default: equal).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from clients import connect
from kvstore.errors import BlockNotFoundError, ConfigError, InvalidInputError, KVStoreError
from kvstore.layout import ModelLayout, PoolLayout
from kvstore import paged
from kvstore.restore.costmodel import ComputeCost, CostProfile, default_profile, prefill_flops_per_token
from kvstore.restore.planner import remote_worth_reading

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

#: a child of vLLM's logger, so the decisions and load errors appear where vLLM logs
log = logging.getLogger("vllm.kvstore_connector")

#: a step that computed fewer tokens than this says little about the prefill rate
_MIN_RATE_TOKENS = 64


# -- options ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConnectorOptions:
    """``kv_connector_extra_config``, validated when the engine starts (both roles).

    ``endpoint``/``namespace``: the store; ``block_tokens``: the store's block size (a divisor
    of vLLM's, default vLLM's); ``timeout``/``connect_timeout``/``curve``: the sidecar
    client's; ``store``: ``StoreConfig`` fields for ``embedded://``; ``retry_after_s``: how
    long a store that failed is skipped; ``profile``: a cost profile (``kvstore calibrate``
    JSON file or dict; default: built-in defaults); ``prefill_tokens_per_s``: this engine's
    prefill rate (default: measured from its steps; until measured, every cached token is
    loaded); ``pool_layout``: a :class:`PoolLayout` name where the shapes are ambiguous;
    ``shm``: the sidecar client's (None: shared memory where the sidecar offers it, False:
    never); ``save``: False to only read; ``save_min_new``: save a prompt only when at least this
    fraction of its full blocks is new to the store (a save copies the whole prompt's KV:
    the store's keys chain from the first token, so a save cannot skip the known prefix);
    ``exact``: True never loads KV a lossy tier codec stored (such blocks count as not
    cached and are prefilled), False accepts it, None (default) follows the namespace's
    ``lossy_ok``.
    """

    endpoint: str
    namespace: str = "default"
    block_tokens: int | None = None
    timeout: float = 10.0
    connect_timeout: float = 10.0
    curve: dict | None = None
    store: dict = field(default_factory=dict)
    retry_after_s: float = 5.0
    profile: dict | str | None = None
    prefill_tokens_per_s: float | None = None
    pool_layout: str | None = None
    save: bool = True
    save_min_new: float = 0.25
    shm: bool | None = None
    exact: bool | None = None

    @classmethod
    def from_extra(cls, extra: dict | None) -> "ConnectorOptions":
        extra = dict(extra or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ConfigError(f"kv_connector_extra_config has unknown keys {unknown}; known: {sorted(known)}")
        if not isinstance(extra.get("endpoint"), str) or not extra["endpoint"]:
            raise ConfigError('kv_connector_extra_config needs "endpoint" (ipc:///path, tcp://host:port or embedded://)')
        opts = cls(**extra)
        for name in ("timeout", "connect_timeout", "retry_after_s"):
            v = getattr(opts, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"kv_connector_extra_config[{name!r}] must be a positive number, got {v!r}")
        if opts.prefill_tokens_per_s is not None and not (
                isinstance(opts.prefill_tokens_per_s, (int, float)) and opts.prefill_tokens_per_s > 0):
            raise ConfigError(f"prefill_tokens_per_s must be a positive number, got {opts.prefill_tokens_per_s!r}")
        if not isinstance(opts.save_min_new, (int, float)) or not 0 <= opts.save_min_new <= 1:
            raise ConfigError(f"save_min_new must be a fraction in [0, 1], got {opts.save_min_new!r}")
        if opts.block_tokens is not None and (not isinstance(opts.block_tokens, int) or opts.block_tokens <= 0):
            raise ConfigError(f"block_tokens must be a positive int, got {opts.block_tokens!r}")
        if opts.exact is not None and not isinstance(opts.exact, bool):
            raise ConfigError(f"exact must be true, false or null, got {opts.exact!r}")
        if opts.pool_layout is not None:
            try:
                PoolLayout(opts.pool_layout)
            except ValueError:
                raise ConfigError(f"pool_layout {opts.pool_layout!r} is not one of "
                                  f"{[p.value for p in PoolLayout]}") from None
        if not isinstance(opts.store, dict):
            raise ConfigError("kv_connector_extra_config['store'] must be a dict of StoreConfig fields")
        return opts

    def base_profile(self) -> CostProfile:
        if self.profile is None:
            return default_profile()
        try:
            data = self.profile
            if isinstance(data, str):
                with open(data) as f:
                    data = json.load(f)
            return CostProfile.from_dict(data)
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"kv_connector_extra_config['profile'] is not a cost profile: {exc}") from None

    def client_options(self) -> dict:
        if self.endpoint.startswith("embedded://"):
            return dict(self.store)
        out: dict[str, Any] = {"timeout": self.timeout, "connect_timeout": self.connect_timeout, "shm": self.shm}
        if self.curve is not None:
            out["curve"] = self.curve
        return out


def model_layout(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig") -> tuple[ModelLayout, list[str]]:
    """The store layout of this engine's KV (one full-attention group) and its layer names."""
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ConfigError(f"KVStoreConnector supports models with one KV cache group (full attention), "
                          f"this one has {len(groups)}")
    spec = groups[0].kv_cache_spec
    head_v = getattr(spec, "head_size_v", spec.head_size)
    if head_v != spec.head_size or not hasattr(spec, "num_kv_heads"):
        raise ConfigError(f"KVStoreConnector needs plain K/V heads of one size, got {type(spec).__name__}")
    names = list(groups[0].layer_names)
    layout = ModelLayout(num_layers=len(names), num_kv_heads=int(spec.num_kv_heads), head_dim=int(spec.head_size),
                         hidden_size=int(vllm_config.model_config.get_hidden_size()), dtype=spec.dtype)
    return layout, names


def detect_pool_layout(t: torch.Tensor, layout: ModelLayout, block_size: int,
                       told: str | None = None) -> PoolLayout:
    """Which :class:`PoolLayout` one layer's tensor is, from its shape (``told`` decides
    where two layouts share a shape). Raises :class:`ConfigError` when none fits."""
    H, D = layout.num_kv_heads, layout.head_dim
    fits = [k for k in PoolLayout if k.per_layer and t.dim() == len(k.layer_shape(1, block_size, H, D))
            and tuple(t.shape) == k.layer_shape(k.num_blocks(t), block_size, H, D)]
    if told is not None:
        kind = PoolLayout(told)
        if kind not in fits:
            raise ConfigError(f"pool_layout {told!r} does not fit the engine's KV tensor {tuple(t.shape)} "
                              f"({kind.shape_doc()})")
        return kind
    if len(fits) != 1:
        raise ConfigError(f"cannot tell the layout of the engine's KV tensor {tuple(t.shape)} "
                          f"(block_size {block_size}, {H} KV heads of {D}): "
                          + ("it fits " + ", ".join(k.value for k in fits) + "; set pool_layout" if fits
                             else "no known layout fits"))
    return fits[0]


# -- metadata (scheduler -> workers, each step) ----------------------------------------------------
@dataclass
class LoadSpec:
    """Load ``tokens``' cached prefix; its vLLM blocks ``first_block...`` go to ``block_ids``."""

    req_id: str
    tokens: list[int]
    first_block: int
    block_ids: list[int]


@dataclass
class SaveSpec:
    """Save the full blocks of ``tokens`` from vLLM blocks ``block_ids`` (from block 0)."""

    req_id: str
    tokens: list[int]
    block_ids: list[int]


@dataclass
class KVStoreConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


# -- stats -----------------------------------------------------------------------------------------
@dataclass
class KVStoreConnectorStats(KVConnectorStats):
    """Counters (sums) of both roles: the scheduler's decisions and the workers' transfers."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> "KVStoreConnectorStats":
        for k, v in (other.data or {}).items():
            self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())


class _Counters:
    """Thread-safe counters, taken (and zeroed) by vLLM's stats collection."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._now: dict[str, float] = {}
        self.total: dict[str, float] = {}

    def add(self, **kv: float) -> None:
        with self._lock:
            for k, v in kv.items():
                self._now[k] = self._now.get(k, 0) + v
                self.total[k] = self.total.get(k, 0) + v

    def take(self) -> dict[str, float]:
        with self._lock:
            out, self._now = self._now, {}
            return out


class _Health:
    """Skips a store that failed for ``retry_after_s`` (clock injected)."""

    def __init__(self, retry_after_s: float, clock=time.monotonic) -> None:
        self._retry = retry_after_s
        self._clock = clock
        self._down_until = 0.0

    def up(self) -> bool:
        return self._clock() >= self._down_until

    def failed(self, exc: BaseException, what: str) -> None:
        log.warning("kvstore-connector: %s failed (%s: %s); skipping the store for %.3g s",
                    what, type(exc).__name__, exc, self._retry)
        self._down_until = self._clock() + self._retry


@dataclass
class _Decision:
    cached_tokens: int        # the store's prefix of the lookup tokens (all tiers)
    load_tokens: int          # of which the planner chose to load
    reason: str


@dataclass
class _ReqState:
    tokens: list[int]
    block_ids: list[int] = field(default_factory=list)
    local_tokens: int = 0     # vLLM's own hit when the load was decided
    load_tokens: int = 0      # external tokens granted by vLLM (update_state_after_alloc)
    load_sent: bool = False
    save_sent: bool = False
    save_planned: bool = False  # a save went to the workers: free the blocks after it
    counted: bool = False


class _EmbeddedStores:
    """The in-process stores of ``embedded://`` endpoints, one per (endpoint, namespace),
    shared by the connector objects of one process (vLLM makes one per role; with the
    ``uni`` executor both live in the engine core). Closed when the last user closes it."""

    class _Shared:
        def __init__(self, owner: "_EmbeddedStores", key: tuple, client) -> None:
            self._owner, self._key, self._client = owner, key, client

        def __getattr__(self, name: str):
            return getattr(self._client, name)

        def close(self) -> None:
            self._owner.release(self._key)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[tuple, list] = {}  # key -> [client, users]

    def open(self, opts: ConnectorOptions, layout: ModelLayout, block_tokens: int):
        key = (opts.endpoint, opts.namespace)
        with self._lock:
            entry = self._open.get(key)
            if entry is None:
                client = connect(opts.endpoint, layout=layout, namespace=opts.namespace, block_tokens=block_tokens,
                                 **opts.client_options())
                entry = self._open[key] = [client, 0]
            elif entry[0].layout != layout or entry[0].block_tokens != block_tokens:
                raise ConfigError(f"{opts.endpoint} namespace {opts.namespace!r} is open with another layout")
            entry[1] += 1
            return self._Shared(self, key, entry[0])

    def release(self, key: tuple) -> None:
        with self._lock:
            entry = self._open.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] <= 0:
                del self._open[key]
                entry[0].close()


#: the one piece of process-wide state: where two roles in one process meet their store
_EMBEDDED = _EmbeddedStores()


# -- the connector ---------------------------------------------------------------------------------
class KVStoreConnector(KVConnectorBase_V1, SupportsHMA):
    """See the module doc. One instance per role; state is per instance."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig") -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.opts = ConnectorOptions.from_extra(self._kv_transfer_config.kv_connector_extra_config)
        pc = vllm_config.parallel_config
        if pc.tensor_parallel_size * pc.pipeline_parallel_size != 1:
            raise ConfigError("KVStoreConnector runs with one worker per engine (tensor and pipeline parallel 1)")
        self.block_size = int(vllm_config.cache_config.block_size)
        self.layout, self.layer_names = model_layout(vllm_config, kv_cache_config)
        self.block_tokens = self.opts.block_tokens or self.block_size
        if self.block_size % self.block_tokens:
            raise ConfigError(f"vLLM's block_size ({self.block_size}) must be a multiple of the store's "
                              f"block_tokens ({self.block_tokens})")
        if self._kv_transfer_config.kv_load_failure_policy != "recompute":
            log.warning("kvstore-connector: kv_load_failure_policy is %r: a block lost between lookup and load "
                        "fails its request; set kv_load_failure_policy='recompute' to recompute it instead",
                        self._kv_transfer_config.kv_load_failure_policy)
        self.counters = _Counters()
        self.health = _Health(self.opts.retry_after_s)
        self._client = self._connect()
        if role == KVConnectorRole.SCHEDULER:
            self._profile = self.opts.base_profile()
            self._rate: float | None = self.opts.prefill_tokens_per_s
            self._rate_measured = self.opts.prefill_tokens_per_s is None
            self._lookup_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvstore-lookup")
            self._decisions: dict[str, Future] = {}
            self._reqs: dict[str, _ReqState] = {}
            self._step_started: tuple[float, int] | None = None
        else:
            self._pool: paged.EnginePool | None = None
            self._rows: paged.Rows | None = None
            self._save_client = self._connect() if self.opts.save else None
            self._save_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvstore-save")
            self._pending_saves: dict[str, list[Future]] = {}
            self._finishing: set[str] = set()
            self._load_errors: set[int] = set()
            self._failed_load_reqs: set[str] = set()  # this step's requests whose load failed

    # -- shared --------------------------------------------------------------------------------
    def _connect(self):
        try:
            if self.opts.endpoint.startswith("embedded://"):
                return _EMBEDDED.open(self.opts, self.layout, self.block_tokens)
            return connect(self.opts.endpoint, layout=self.layout, namespace=self.opts.namespace,
                           block_tokens=self.block_tokens, **self.opts.client_options())
        except KVStoreError as exc:  # the engine still serves; the store is retried later
            self.health.failed(exc, f"connecting to {self.opts.endpoint}")
            return None

    def _usable(self, client) -> bool:
        return client is not None and self.health.up()

    def get_kv_connector_stats(self) -> KVStoreConnectorStats | None:
        data = self.counters.take()
        return KVStoreConnectorStats(data=data) if data else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVStoreConnectorStats:
        return KVStoreConnectorStats(data=dict(data or {}))

    def shutdown(self) -> None:
        if self.role == KVConnectorRole.WORKER:
            self._save_pool.shutdown(wait=True)
            for c in (self._client, self._save_client):
                if c is not None:
                    c.close()
        else:
            self._lookup_pool.shutdown(wait=False, cancel_futures=True)
            if self._client is not None:
                self._client.close()
        log.info("kvstore-connector %s totals: %s", self.role.name.lower(), self.counters.total)

    # -- scheduler side ------------------------------------------------------------------------
    def _prefill_profile(self) -> CostProfile | None:
        """The base profile with this engine's prefill rate; None while the rate is unknown."""
        if self._rate is None:
            return None
        flops = prefill_flops_per_token(self.layout) * self._rate
        return replace(self._profile, prefill=ComputeCost(flops_per_s=flops, latency_s=0.0))

    def _worst_load_s(self, profile: CostProfile, tokens: int) -> float:
        """Seconds to load ``tokens`` if every block came from the slowest tier the profile
        knows (disk or remote, then host to device), one block per op. O(1)."""
        nb = tokens // self.block_tokens
        block = self.layout.kv_block_bytes(self.block_tokens)
        slow = [link for name in ("disk->host", "remote->host") if (link := profile.link(name)) is not None]
        first = max((nb * link.seconds(block) for link in slow), default=0.0)
        return first + nb * profile.links["host->device"].seconds(block)

    def _decide(self, tokens: list[int]) -> _Decision:
        """Lookup, then the planner's verdict (runs on the lookup thread). O(round trips)."""
        client = self._client
        if client is None:
            client = self._client = self._connect()
        if not self._usable(client):
            return _Decision(0, 0, "store unavailable")
        try:
            cached = client.lookup(tokens, exact=self.opts.exact)
            if not cached:
                return _Decision(0, 0, "nothing cached")
            profile = self._prefill_profile()
            if profile is None:
                return _Decision(cached, cached, "prefill rate not yet measured: load all")
            worst = self._worst_load_s(profile, cached)
            prefill = profile.prefill_s(self.layout, cached)
            if worst < prefill:  # even from the slowest tier every block beats its prefill: no plan needed
                return _Decision(cached, cached, f"load all: worst case {worst:.4g} s < prefill {prefill:.4g} s")
            plan = client.plan(tokens[:cached], profile=profile.to_dict())
            local = int(plan["cached_tokens"])
            load = local - int(plan["prefill_tokens"])
            reason = f"planner: load {load} of {local} local (predicted {plan['predicted_s']:.4g} s)"
            if load == local and cached > local:
                more = (cached - local) // self.block_tokens
                if remote_worth_reading(profile, self.layout, self.block_tokens, more):
                    load = cached
                    reason += f", remote {cached - local} worth reading"
                else:
                    reason += f", remote {cached - local} cheaper to prefill"
            return _Decision(cached, load, reason)
        except KVStoreError as exc:
            self.health.failed(exc, "lookup")
            return _Decision(0, 0, f"lookup failed: {type(exc).__name__}")

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        rid = request.request_id
        prompt = list(request.prompt_token_ids or [])
        limit = (len(prompt) - 1) // self.block_size * self.block_size  # vLLM computes >= 1 token
        if limit <= num_computed_tokens:
            return 0, False
        fut = self._decisions.get(rid)
        if fut is None:
            if not self.health.up():
                self.counters.add(lookups_skipped=1)
                return 0, False
            fut = self._lookup_pool.submit(self._decide, prompt[:limit])
            self._decisions[rid] = fut
        if not fut.done():
            time.sleep(0)  # yield the GIL once: the lookup thread may be waiting for it to finish
            if not fut.done():
                return None, False
        d: _Decision = fut.result()
        load = min(d.load_tokens, limit) // self.block_size * self.block_size
        st = self._reqs.setdefault(rid, _ReqState(tokens=prompt))
        st.local_tokens = num_computed_tokens
        if not st.counted:
            st.counted = True
            self.counters.add(lookups=1, cached_tokens=d.cached_tokens, planned_load_tokens=load,
                              prefill_instead_tokens=max(0, min(d.cached_tokens, limit) - load))
            log.info("kvstore-connector decision %s: prompt %d, vLLM hit %d, store %d, load %d (%s)",
                     rid, len(prompt), num_computed_tokens, d.cached_tokens, max(0, load - num_computed_tokens),
                     d.reason)
        ext = load - num_computed_tokens
        return (ext, False) if ext > 0 else (0, False)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        st = self._reqs.setdefault(request.request_id, _ReqState(tokens=list(request.prompt_token_ids or [])))
        if num_external_tokens > 0:  # (again after a preemption: vLLM counts on a fresh load)
            st.load_tokens = num_external_tokens
            st.load_sent = False

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVStoreConnectorMetadata:
        now = time.monotonic()
        self._step_started = (now, int(scheduler_output.total_num_scheduled_tokens))
        meta = KVStoreConnectorMetadata()
        sched = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            st = self._reqs.setdefault(new.req_id, _ReqState(tokens=list(new.prompt_token_ids or [])))
            st.block_ids = list(new.block_ids[0])
            self._plan_transfers(new.req_id, st, new.num_computed_tokens, sched.get(new.req_id, 0), meta)
        cached = scheduler_output.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            st = self._reqs.get(rid)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if new_ids is not None:
                st.block_ids = (list(new_ids[0]) if rid in cached.resumed_req_ids
                                else st.block_ids + list(new_ids[0]))
            self._plan_transfers(rid, st, cached.num_computed_tokens[i], sched.get(rid, 0), meta)
        return meta

    def _plan_transfers(self, rid: str, st: _ReqState, computed: int, scheduled: int,
                        meta: KVStoreConnectorMetadata) -> None:
        """Add this step's load (once, when vLLM granted external tokens) and save (once, in
        the step that finishes the prompt) of ``rid``. O(blocks)."""
        bs = self.block_size
        if st.load_tokens and not st.load_sent:
            st.load_sent = True
            first, end = st.local_tokens // bs, (st.local_tokens + st.load_tokens) // bs
            meta.loads.append(LoadSpec(rid, st.tokens[:end * bs], first, st.block_ids[first:end]))
        if not self.opts.save or st.save_sent or not self.health.up():
            return
        full = len(st.tokens) // self.block_tokens * self.block_tokens
        if computed + scheduled < len(st.tokens) or full == 0:
            return
        fut = self._decisions.get(rid)
        known = fut.result().cached_tokens if fut is not None and fut.done() else 0
        st.save_sent = True
        if full - known <= 0 or full - known < self.opts.save_min_new * full:
            self.counters.add(saves_skipped_cached=1, unsaved_new_tokens=max(0, full - known))
            return
        nblocks = -(-full // bs)
        meta.saves.append(SaveSpec(rid, st.tokens[:full], st.block_ids[:nblocks]))
        self.counters.add(saves_planned=1)
        st.save_planned = True

    def update_connector_output(self, connector_output) -> None:
        """Measures this engine's prefill rate from the step that just ended (EWMA)."""
        started, self._step_started = self._step_started, None
        if started is None or not self._rate_measured:
            return
        t0, tokens = started
        dt = time.monotonic() - t0
        if tokens >= _MIN_RATE_TOKENS and dt > 0:
            rate = tokens / dt
            self._rate = rate if self._rate is None else 0.8 * self._rate + 0.2 * rate

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        fut = self._decisions.pop(rid, None)
        if fut is not None:
            fut.cancel()
        st = self._reqs.pop(rid, None)
        return bool(st is not None and st.save_planned), None

    def request_finished_all_groups(self, request: "Request",
                                    block_ids: tuple[list[int], ...]) -> tuple[bool, dict[str, Any] | None]:
        return self.request_finished(request, list(block_ids[0]) if block_ids else [])

    # -- worker side ---------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.layer_names if n not in kv_caches]
        if missing:
            raise ConfigError(f"the engine registered no KV cache for layers {missing[:3]}")
        tensors = [kv_caches[n] for n in self.layer_names]
        kind = detect_pool_layout(tensors[0], self.layout, self.block_size, self.opts.pool_layout)
        self._pool = paged.EnginePool(tensors, kind, self.block_size)
        self._rows, _ = paged.pool_rows(self.layout, self.block_tokens, self._pool)
        log.info("kvstore-connector: %d layers of %s blocks (%s), vLLM block %d, store block %d",
                 len(tensors), kind.value, tuple(tensors[0].shape), self.block_size, self.block_tokens)

    def _store_ids(self, vllm_ids: Sequence[int]) -> list[int]:
        assert self._pool is not None
        return self._pool.store_ids(vllm_ids, self.block_tokens)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVStoreConnectorMetadata)
        for spec in meta.loads:
            self._load(spec)

    def _load(self, spec: LoadSpec) -> None:
        """Copy ``spec``'s prefix from ``first_block`` on into the pool with one ``load_into``
        (verified; vLLM's own hit before it is neither read nor written). What cannot be
        loaded is reported as load errors from the first failed block on (vLLM recomputes from
        there). A prefix lost since the lookup is looked up again and what is left loaded.
        O(bytes)."""
        bs = self.block_size
        n = len(spec.block_ids)
        t0 = time.perf_counter()
        loaded = 0
        client = self._client
        if client is None:
            client = self._client = self._connect()
        if self._usable(client) and n:
            try:
                loaded = self._load_into(client, spec.tokens, spec.first_block, spec.block_ids)
                if loaded == 0:  # nothing loaded: lost since the lookup? load what is still there
                    end = client.lookup(spec.tokens, exact=self.opts.exact) // bs
                    if spec.first_block < end < spec.first_block + n:
                        loaded = self._load_into(client, spec.tokens[:end * bs], spec.first_block,
                                                 spec.block_ids[:end - spec.first_block])
            except KVStoreError as exc:
                if not isinstance(exc, BlockNotFoundError):
                    self.health.failed(exc, "load")
                loaded = 0
            except Exception:  # a fault of ours costs this request a recompute, never the engine
                log.exception("kvstore-connector: request %s: the load failed unexpectedly", spec.req_id)
                self.counters.add(load_unexpected_errors=1)
                loaded = 0
        failed = spec.block_ids[loaded:]
        self._load_errors.update(failed)
        if failed:
            self._failed_load_reqs.add(spec.req_id)
        self.counters.add(loads=1, loaded_tokens=loaded * bs, load_error_blocks=len(failed),
                          load_s=time.perf_counter() - t0)
        if failed:
            log.warning("kvstore-connector: request %s: %d of %d blocks could not be loaded; vLLM recomputes them",
                        spec.req_id, len(failed), n)

    def _load_into(self, client, tokens: list[int], first_block: int, block_ids: list[int]) -> int:
        """``load_into`` of ``tokens``' vLLM blocks ``first_block...`` into ``block_ids``;
        returns how many of them, from the first, hold the prefix (the rest failed)."""
        split = self.block_size // self.block_tokens
        t = time.perf_counter()
        res = client.load_into(tokens, self._pool, self._store_ids(block_ids), start=first_block * split,
                               on_error="report", exact=self.opts.exact)
        self.counters.add(load_into_s=time.perf_counter() - t)
        if res.ok:
            return len(block_ids)
        return max(0, int(res) // self.block_size - first_block)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv placed every layer before the forward pass

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # saves are whole blocks after the step (wait_for_save)

    def wait_for_save(self) -> None:
        """Hand this step's saves to the save thread; returns without waiting for them."""
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVStoreConnectorMetadata)
        for spec in meta.saves:
            if spec.req_id in self._failed_load_reqs:
                # its blocks were not all loaded this step (vLLM recomputes them later): saving
                # now would store whatever those pool blocks held
                done: Future = Future()
                done.set_result(0)
                self.counters.add(saves_dropped_load_error=1)
            else:
                done = self._save_pool.submit(self._save, spec)
            self._pending_saves.setdefault(spec.req_id, []).append(done)
        self._failed_load_reqs.clear()

    def _save(self, spec: SaveSpec) -> int:
        if self._save_client is None and self.health.up():
            self._save_client = self._connect()
        client = self._save_client
        if not self._usable(client):
            self.counters.add(saves_dropped=1)
            return 0
        t0 = time.perf_counter()
        try:
            n = client.save_from(spec.tokens, self._pool, self._store_ids(spec.block_ids)[:len(spec.tokens) // self.block_tokens])
        except KVStoreError as exc:
            self.health.failed(exc, "save")
            self.counters.add(save_errors=1)
            return 0
        except Exception:  # on the save thread nobody would see it: say so, count it, go on
            log.exception("kvstore-connector: request %s: the save failed unexpectedly", spec.req_id)
            self.counters.add(save_errors=1, save_unexpected_errors=1)
            return 0
        self.counters.add(saves=1, saved_tokens=len(spec.tokens), save_s=time.perf_counter() - t0)
        return n

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        self._finishing |= {r for r in finished_req_ids if r in self._pending_saves}
        done = {r for r in self._finishing if all(f.done() for f in self._pending_saves[r])}
        for r in done:
            self._finishing.discard(r)
            del self._pending_saves[r]
        return (done or None), None

    def get_block_ids_with_load_errors(self) -> set[int]:
        out, self._load_errors = self._load_errors, set()
        return out


__all__ = ["KVStoreConnector", "ConnectorOptions", "KVStoreConnectorMetadata", "detect_pool_layout", "model_layout"]
