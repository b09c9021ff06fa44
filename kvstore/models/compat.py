"""What the installed ``transformers`` release expects of a cache, found by looking, not by version.

Releases in the declared range (see ``pyproject.toml``) differ in three ways that matter here:

* the forward's cache keyword: ``past_key_values`` (4.x up to 5.23) or ``cache`` (5.24 on);
  a model given the wrong one swallows it in ``**kwargs`` and silently runs without it, so
  the keyword is read from the forward's signature and a forward with neither is refused;
* the output field holding the cache (``past_key_values`` or ``cache``), read the same way;
* the layout of a ``DynamicCache``: per-layer objects in ``.layers`` (``.keys``/``.values``,
  4.55 on), parallel ``.key_cache``/``.value_cache`` lists (before 4.55), or a legacy tuple
  of ``(key, value)`` pairs that some models return.

Every function here is O(layers) Python plus the tensor views; nothing copies KV except
:func:`fill_cache` (one ``update`` per layer).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

CACHE_KEYWORDS = ("cache", "past_key_values")


def unsupported(what: str) -> NotImplementedError:
    """The one error the adapter raises for anything it does not understand."""
    return NotImplementedError(f"HFAdapter does not support {what}; refusing rather than risk wrong KV")


def cache_keyword(forward: Callable[..., Any]) -> str:
    """The keyword under which ``forward`` takes a KV cache (``cache`` or ``past_key_values``).

    Read from the signature (``inspect`` follows ``functools.wraps`` through the
    deprecation decorators). A forward that names both prefers ``cache`` (the newer name,
    the other being the deprecated alias); one that names neither is refused.
    """
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError) as exc:  # builtins, C extensions
        raise unsupported(f"a forward whose signature cannot be read ({exc})") from exc
    for name in CACHE_KEYWORDS:
        if name in params:
            return name
    raise unsupported(f"a forward without a cache keyword (has {sorted(params)})")


def takes_keyword(forward: Callable[..., Any], name: str) -> bool:
    """Whether ``forward`` names ``name`` as a parameter."""
    return name in inspect.signature(forward).parameters


def output_cache(out: Any) -> Any:
    """The cache a forward returned, whichever field name the release uses (``None`` if none)."""
    for name in CACHE_KEYWORDS:
        cache = getattr(out, name, None)
        if cache is not None:
            return cache
    return None


def new_cache() -> Any:
    """An empty ``DynamicCache`` whose layers all keep every token.

    Built without a config on purpose: given one, newer releases make sliding-window layers
    that drop tokens older than the window, and the store needs every token's KV.
    """
    from transformers import DynamicCache

    return DynamicCache()


def cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """``[(key, value, seen), ...]`` per layer: K/V ``[batch, kv_heads, slots, head_dim]`` and the
    number of tokens the layer has been given.

    ``seen`` differs from ``slots`` where a layer does not hold each token it saw exactly
    once (a sliding-window layer that dropped old tokens, a preallocated static layer); the
    caller must refuse such a layer rather than read its slots as the first tokens.
    Understands ``.layers`` (``keys``/``values``), a ``DynamicCache``'s
    ``.key_cache``/``.value_cache`` lists and legacy tuples; anything else (e.g. the
    fixed-size ``StaticCache``/``HybridCache`` lists of older releases) raises
    ``NotImplementedError`` naming its type. A layer not yet written is returned empty.
    """
    if hasattr(cache, "layers") and isinstance(cache.layers, (list, tuple)):
        out = []
        for layer in cache.layers:
            k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
            if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor) or k.dim() != 4:
                out.append((torch.empty(0, 0, 0, 0), torch.empty(0, 0, 0, 0), 0))
                continue
            seen = layer.get_seq_length() if callable(getattr(layer, "get_seq_length", None)) else k.shape[-2]
            out.append((k, v, int(seen)))
        return out
    if isinstance(getattr(cache, "key_cache", None), list) and isinstance(getattr(cache, "value_cache", None), list):
        from transformers import DynamicCache

        if not isinstance(cache, DynamicCache):
            raise unsupported(f"a cache of type {type(cache).__name__} (fixed-size or windowed key_cache lists)")
        return [(k, v, k.shape[-2]) for k, v in zip(cache.key_cache, cache.value_cache)]
    if isinstance(cache, (tuple, list)) and all(isinstance(p, (tuple, list)) and len(p) >= 2 for p in cache):
        return [(p[0], p[1], p[0].shape[-2]) for p in cache]
    raise unsupported(f"a cache of type {type(cache).__name__} (neither .layers, .key_cache/.value_cache "
                      "nor a tuple of (key, value) pairs)")


def fill_cache(cache: Any, kv: torch.Tensor, device: torch.device, repeats: list[int] | None = None) -> None:
    """Append ``kv`` (``[L, 2, T, H, D]``) to ``cache``, layer by layer, in the model's layout.

    ``repeats[layer] > 1`` repeats each head that many times (a model that caches K/V
    broadcast to its query heads).
    """
    for layer in range(kv.shape[0]):
        k = kv[layer, 0].to(device).transpose(0, 1).unsqueeze(0)  # [1, H, T, D]
        v = kv[layer, 1].to(device).transpose(0, 1).unsqueeze(0)
        if repeats is not None and repeats[layer] > 1:
            k, v = k.repeat_interleave(repeats[layer], dim=1), v.repeat_interleave(repeats[layer], dim=1)
        cache.update(k.contiguous(), v.contiguous(), layer)


def probe_cache_layout() -> str:
    """Check at construction that this release's ``DynamicCache`` round-trips KV; name its layout.

    Writes one tiny layer and reads it back through :func:`cache_layers`, so a release whose
    cache this module cannot read is refused before any capture, not during one.
    """
    try:
        cache = new_cache()
    except ImportError as exc:
        raise unsupported(f"this transformers release (no DynamicCache: {exc})") from exc
    k = torch.arange(6, dtype=torch.float32).view(1, 1, 3, 2)
    cache.update(k, k + 1, 0)
    layers = cache_layers(cache)
    if len(layers) != 1 or not torch.equal(layers[0][0], k) or not torch.equal(layers[0][1], k + 1) \
            or layers[0][2] != 3:
        raise unsupported(f"{type(cache).__name__} of this release (written KV does not read back)")
    return "layers" if hasattr(cache, "layers") else "key_cache lists"
