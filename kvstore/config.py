"""``StoreConfig``: everything a store is built from; also read from TOML."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
import tomllib
from typing import Any, Literal

from kvstore.errors import ConfigError
from kvstore.layout import ModelLayout

MiB = 1 << 20
GiB = 1 << 30
TIERS = ("device", "host", "disk")
FsyncMode = Literal["always", "interval", "never"]
ActivationsMode = Literal["none", "beside", "instead"]
RemoteWriteMode = Literal["through", "back"]
ACTIVATION_MODES = ("none", "beside", "instead")


@dataclass
class StoreConfig:
    """Configuration of one store (one namespace in embedded use).

    Capacities are bytes; 0 disables a tier, a positive value below one block is an error.
    ``policy`` is a registry name for every tier or a ``{tier: name}`` mapping.
    ``disk_path`` is a directory for the slab file; None with ``disk_bytes > 0`` uses a
    temporary directory removed on close.

    Activations (the K/V projections' inputs, what recompute needs) are a second payload
    with their own slots: ``act_share`` is the fraction of *each* tier's bytes given to
    them (0 keeps every byte for KV: the store behaves exactly as without activations).
    ``activations`` says which form a put keeps for the blocks ``act_blocks`` selects
    (0: every block; N: the blocks among the first N of the sequence, KVPR's leading
    tokens): ``"beside"`` keeps activations and KV, ``"instead"`` activations only (half
    the bytes of MHA KV; restorable only by a store given a recompute adapter), ``"none"``
    keeps KV only. Blocks not selected keep KV only.
    """

    layout: ModelLayout | None = None
    block_tokens: int = 16
    device_bytes: int = 256 * MiB
    host_bytes: int = 1 * GiB
    disk_bytes: int = 0
    disk_path: str | None = None
    policy: str | dict[str, str] = "lru"
    namespace: str = "default"
    promote_on_hit: bool = True
    persist: bool = False
    fsync: FsyncMode = "never"
    fsync_interval_s: float = 1.0
    device: str | None = None  # "cuda" / "cpu"; None picks cuda when available
    act_share: float = 0.0
    activations: ActivationsMode = "none"
    act_blocks: int = 0
    #: the shared remote tier (kvstore.remote_tier): redis://HOST:PORT[/DB], rediss://...,
    #: redis+cluster://H1:P1[,H2:P2...]; None: no remote tier. Password/ACL user from the URL
    #: or KVSTORE_REDIS_PASSWORD / KVSTORE_REDIS_USERNAME.
    remote_url: str | None = None
    remote_write: RemoteWriteMode = "through"
    remote_ttl_s: float | None = None          # per-namespace expiry of remote blocks
    remote_deadline_s: float = 0.5             # no remote call blocks the caller longer
    remote_queue_bytes: int = 256 * MiB        # write-behind bound (beyond it, writes are dropped)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.layout, dict):
            self.layout = ModelLayout.from_dict(self.layout)
        if not isinstance(self.block_tokens, int) or self.block_tokens <= 0:
            raise ConfigError(f"block_tokens must be a positive int, got {self.block_tokens!r}")
        for tier in TIERS:
            value = getattr(self, f"{tier}_bytes")
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"{tier}_bytes must be a non-negative int, got {value!r}")
        if self.fsync not in ("always", "interval", "never"):
            raise ConfigError(f"fsync must be 'always', 'interval' or 'never', got {self.fsync!r}")
        if isinstance(self.act_share, bool) or not isinstance(self.act_share, (int, float)) \
                or not 0.0 <= self.act_share < 1.0:
            raise ConfigError(f"act_share must be a number in [0, 1), got {self.act_share!r}")
        if self.activations not in ACTIVATION_MODES:
            raise ConfigError(f"activations must be one of {ACTIVATION_MODES}, got {self.activations!r}")
        if isinstance(self.act_blocks, bool) or not isinstance(self.act_blocks, int) or self.act_blocks < 0:
            raise ConfigError(f"act_blocks must be a non-negative int (0: every block), got {self.act_blocks!r}")
        if (self.activations == "none") != (self.act_share == 0):
            raise ConfigError(f"activations={self.activations!r} with act_share={self.act_share}: keeping "
                              "activations needs act_share > 0, and act_share > 0 needs activations "
                              "'beside' or 'instead'")
        if not isinstance(self.namespace, str) or not self.namespace:
            raise ConfigError("namespace must be a non-empty string")
        from kvstore.remote_tier import check_remote_config

        check_remote_config(self.remote_url, self.remote_write, self.remote_ttl_s, self.remote_deadline_s,
                            self.remote_queue_bytes)

    def policy_for(self, tier: str) -> str:
        if isinstance(self.policy, str):
            return self.policy
        return self.policy.get(tier, "lru")

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> "StoreConfig":
        """Read a TOML file whose keys are field names; ``overrides`` (non-None) win.

        A ``[layout]`` table gives the layout. Unknown keys are an error, not ignored.
        """
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        data.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config keys in {path}: {unknown}; known: {sorted(known)}")
        return cls(**data)
