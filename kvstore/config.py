"""``StoreConfig``: everything a store is built from; also read from TOML."""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass, field, fields
import math
import os
from pathlib import Path
import shutil
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
#: block codecs a tier may store with (allocator.codecs); the device tier always stores raw
CODEC_NAMES = ("none", "lossless", "fp8", "int8", "int4")
LOSSY_CODECS = ("fp8", "int8", "int4")


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
    #: reserve the disk slab's blocks when it is created (True), or keep it sparse (False, the
    #: default): disk is taken as blocks are written, up to disk_bytes, and a full file system
    #: degrades the disk tier instead of refusing to start
    disk_preallocate: bool = False
    device: str | None = None  # "cuda" / "cpu"; None picks cuda when available
    act_share: float = 0.0
    activations: ActivationsMode = "none"
    act_blocks: int = 0
    #: the shared remote tier (kvstore.remote_tier): redis://HOST:PORT[/DB], rediss://...,
    #: redis+cluster://H1:P1[,H2:P2...]; None: no remote tier. Password/ACL user from the URL
    #: or KVSTORE_REDIS_PASSWORD / KVSTORE_REDIS_USERNAME.
    remote_url: str | None = None
    remote_write: RemoteWriteMode = "through"
    #: per-namespace expiry of remote blocks, refreshed whenever a store re-puts the block
    #: (None: no expiry); finite, at least 1 ms, at most Redis' limit
    remote_ttl_s: float | None = None
    remote_deadline_s: float = 0.5             # one remote call (all of it) never blocks the caller longer
    remote_queue_bytes: int = 256 * MiB        # write-behind bound (beyond it, writes are dropped and counted)
    #: at close (a sidecar's SIGTERM) the write-behind queue drains for at most this long
    remote_drain_s: float = 5.0
    #: how the host, disk and remote tiers store a block (``CODEC_NAMES``; docs/decisions.md
    #: "Codecs per tier"): capacity counts encoded bytes, lossy ones are read only where
    #: ``lossy_ok`` (or a get's ``exact=False``) allows. Remote values of one codec live under
    #: their own keys: stores on different codecs share nothing (docs/decisions.md).
    host_codec: str = "none"
    disk_codec: str = "none"
    remote_codec: str = "none"
    #: whether gets of this namespace accept blocks a lossy codec stored when the caller does
    #: not say (``exact=None``); False: such blocks count as missing unless ``exact=False``
    lossy_ok: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(problems[0] if len(problems) == 1 else
                              f"{len(problems)} problems in the configuration:\n  - " + "\n  - ".join(problems),
                              problems)

    def problems(self) -> list[str]:
        """Every mistake in these values, one clear message each (empty: fine). Normalises
        ``layout`` given as a mapping. No I/O (see :func:`environment_problems`). O(fields)."""
        out: list[str] = []
        if isinstance(self.layout, dict):
            try:
                self.layout = layout_from_mapping(self.layout)
            except ConfigError as exc:
                out.extend(exc.problems)
        elif self.layout is not None and not isinstance(self.layout, ModelLayout):
            out.append(f"layout must be a [layout] table or a ModelLayout, got {type(self.layout).__name__}")
        if not _is_int(self.block_tokens) or self.block_tokens <= 0:
            out.append(f"block_tokens must be a positive int, got {self.block_tokens!r}")
        for tier in TIERS:
            value = getattr(self, f"{tier}_bytes")
            if not _is_int(value) or value < 0:
                out.append(f"{tier}_bytes must be a non-negative int, got {value!r}")
        if self.disk_path is not None and not isinstance(self.disk_path, (str, os.PathLike)):
            out.append(f"disk_path must be a directory path (a string), got {type(self.disk_path).__name__}")
        out.extend(policy_problems(self.policy))
        out.extend(codec_problems(self))
        for name in ("promote_on_hit", "persist", "disk_preallocate", "lossy_ok"):
            if not isinstance(getattr(self, name), bool):
                out.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.fsync not in ("always", "interval", "never"):
            out.append(f"fsync must be 'always', 'interval' or 'never', got {self.fsync!r}")
        if isinstance(self.fsync_interval_s, bool) or not isinstance(self.fsync_interval_s, (int, float)) \
                or not math.isfinite(self.fsync_interval_s) or self.fsync_interval_s <= 0:
            out.append(f"fsync_interval_s must be a positive number of seconds, got {self.fsync_interval_s!r}")
        if self.device is not None and not _is_device_name(self.device):
            out.append(f"device must be 'cpu', 'cuda' or 'cuda:N' (N a device index), got {self.device!r}")
        if isinstance(self.act_share, bool) or not isinstance(self.act_share, (int, float)) \
                or not 0.0 <= self.act_share < 1.0:
            out.append(f"act_share must be a number in [0, 1), got {self.act_share!r}")
        elif self.activations in ACTIVATION_MODES and (self.activations == "none") != (self.act_share == 0):
            out.append(f"activations={self.activations!r} with act_share={self.act_share}: keeping "
                       "activations needs act_share > 0, and act_share > 0 needs activations "
                       "'beside' or 'instead'")
        if self.activations not in ACTIVATION_MODES:
            out.append(f"activations must be one of {ACTIVATION_MODES}, got {self.activations!r}")
        if not _is_int(self.act_blocks) or self.act_blocks < 0:
            out.append(f"act_blocks must be a non-negative int (0: every block), got {self.act_blocks!r}")
        if not isinstance(self.namespace, str) or not self.namespace:
            out.append("namespace must be a non-empty string")
        if not isinstance(self.extra, dict):
            out.append(f"extra must be a table, got {type(self.extra).__name__}")
        from kvstore.remote_tier import remote_config_problems

        out.extend(remote_config_problems(self.remote_url, self.remote_write, self.remote_ttl_s,
                                          self.remote_deadline_s, self.remote_queue_bytes, self.remote_drain_s))
        return out

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
        problems = [f"unknown config keys in {path}: {k!r}" + _did_you_mean(k, known) for k in unknown]
        try:
            config = cls(**{k: v for k, v in data.items() if k in known})
        except ConfigError as exc:
            problems.extend(exc.problems)
        if problems:
            raise ConfigError(problems[0] if len(problems) == 1 else
                              f"{len(problems)} problems in {path}:\n  - " + "\n  - ".join(problems), problems)
        return config


def codec_problems(config: "StoreConfig") -> list[str]:
    """Unknown codec names and codecs this process cannot run (fp8 without float8 in torch,
    lossless without numcodecs). Imports torch only when fp8 is named. O(1)."""
    out: list[str] = []
    for tier in ("host", "disk", "remote"):
        name = getattr(config, f"{tier}_codec")
        if name not in CODEC_NAMES:
            out.append(f"{tier}_codec must be one of {', '.join(CODEC_NAMES)}, got {name!r}"
                       + (_did_you_mean(name, CODEC_NAMES) if isinstance(name, str) else ""))
        elif name == "fp8":
            import torch

            if not hasattr(torch, "float8_e4m3fn"):
                out.append(f"{tier}_codec = 'fp8' needs a torch with float8_e4m3fn (this is torch {torch.__version__})")
        elif name == "lossless":
            import importlib.util

            if importlib.util.find_spec("numcodecs") is None:
                out.append(f"{tier}_codec = 'lossless' needs numcodecs: pip install 'kvstore[codecs]'")
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _did_you_mean(name: str, choices: Any) -> str:
    import difflib

    close = difflib.get_close_matches(str(name), sorted(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


LAYOUT_KEYS = ("num_layers", "num_kv_heads", "head_dim", "hidden_size", "dtype")


def layout_from_mapping(d: dict) -> ModelLayout:
    """A ``ModelLayout`` from a ``[layout]`` table; every mistake is one ConfigError message."""
    problems = [f"[layout] is missing {k!r}" for k in LAYOUT_KEYS if k not in d]
    problems += [f"[layout] has an unknown key {k!r}" + _did_you_mean(k, LAYOUT_KEYS) for k in d if k not in LAYOUT_KEYS]
    if "dtype" in d:
        from kvstore.layout import dtype_from_name

        try:
            dtype_from_name(d["dtype"])
        except ValueError as exc:
            problems.append(f"[layout] dtype: {exc}")
    for k in LAYOUT_KEYS[:4]:
        if k in d and (not _is_int(d[k]) or d[k] <= 0):
            problems.append(f"[layout] {k} must be a positive int, got {d[k]!r}")
    if problems:
        raise ConfigError("; ".join(problems), problems)
    return ModelLayout.from_dict(d)


def policy_problems(policy: Any) -> list[str]:
    """Mistakes in ``policy``: a registry name, or a ``{tier: name}`` table over known tiers."""
    from eviction.registry import ALIASES, OFFLINE, POLICIES, online

    def bad_name(name: Any, where: str) -> str | None:
        if not isinstance(name, str):
            return f"{where} must be a policy name, got {name!r}"
        key = name.lower()
        key = ALIASES.get(key, key)
        if key in POLICIES and key not in OFFLINE:
            return None
        why = "needs the future (simulator only)" if key in OFFLINE else "is an unknown eviction policy"
        return f"{where} {name!r} {why}" + _did_you_mean(key, online()) + f"; choose one of {online()}"

    if isinstance(policy, dict):
        out = []
        for tier, name in policy.items():
            if tier not in TIERS:
                out.append(f"policy table names an unknown tier {tier!r}" + _did_you_mean(tier, TIERS)
                           + f"; tiers are {list(TIERS)}")
            problem = bad_name(name, f"policy.{tier}")
            if problem:
                out.append(problem)
        return out
    problem = bad_name(policy, "policy")
    return [problem] if problem else []


def environment_problems(config: StoreConfig) -> list[str]:
    """What would make ``config`` fail on this machine: an unusable disk_path (not creatable,
    not writable, too little room for one namespace's slab), persist without disk_path, a CUDA
    device without CUDA. Run where the store will run (``kvstore serve`` at start and with
    ``--check``), so a mistake is found before the first client. O(1) file operations."""
    out: list[str] = []
    if config.persist and config.disk_bytes > 0 and config.disk_path is None:
        out.append("persist = true needs a disk_path (a temporary directory would not survive)")
    if config.disk_bytes > 0 and config.disk_path is not None:
        directory = Path(config.disk_path)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            out.append(f"disk_path {directory} cannot be created: {exc.strerror or exc}")
        else:
            probe = directory / f".kvstore-write-probe-{os.getpid()}"
            try:
                probe.write_bytes(b"x")
                probe.unlink()
            except OSError as exc:
                out.append(f"disk_path {directory} is not writable: {exc.strerror or exc}")
            else:
                free = shutil.disk_usage(directory).free
                if free < config.disk_bytes:
                    out.append(f"disk_path {directory} has {free} bytes free, below disk_bytes={config.disk_bytes} "
                               "(the disk tier of one namespace)")
    if isinstance(config.device, str) and config.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            out.append(f"device = {config.device!r} but this machine has no CUDA device")
        else:
            index = int(config.device.partition(":")[2] or 0)
            count = torch.cuda.device_count()
            if index >= count:
                out.append(f"device = {config.device!r} but this machine has {count} CUDA device(s) "
                           f"(cuda:0 .. cuda:{count - 1})")
    return out


def _is_device_name(name: object) -> bool:
    """``cpu``, ``cuda`` or ``cuda:N`` with N a non-negative integer."""
    if not isinstance(name, str):
        return False
    kind, sep, index = name.partition(":")
    if kind == "cpu":
        return not sep
    return kind == "cuda" and (not sep or (index.isdigit() and index.isascii()))


def sidecar_config(config: StoreConfig) -> StoreConfig:
    """A sidecar's namespace template: its device tier stays in host memory unless a CUDA
    device is asked for (``device = "cuda[:N]"``). A sidecar is a separate process beside
    the engine: GPU memory it held (``device_bytes`` per namespace) would be unusable by
    other processes and compete with the engine's, and its clients copy through host
    memory anyway. O(1)."""
    if config.device is None:
        return dataclasses.replace(config, device="cpu")
    return config
