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


@dataclass
class StoreConfig:
    """Configuration of one store (one namespace in embedded use).

    Capacities are bytes; 0 disables a tier, a positive value below one block is an error.
    ``policy`` is a registry name for every tier or a ``{tier: name}`` mapping.
    ``disk_path`` is a directory for the slab file; None with ``disk_bytes > 0`` uses a
    temporary directory removed on close.
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
        if not isinstance(self.namespace, str) or not self.namespace:
            raise ConfigError("namespace must be a non-empty string")

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
