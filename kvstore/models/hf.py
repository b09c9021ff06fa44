"""Model adapters: capture a HF causal LM's KV and activations, and recompute KV from them.

``HFAdapter(model)`` wraps a ``transformers`` causal LM of a family listed in
:mod:`kvstore.models.families` (Llama, Mistral, Mixtral, Qwen2/3 and their MoE variants,
Gemma 1/2/3, Granite, OLMo2, Starcoder2, Phi, Phi-3, StableLM, GPT-NeoX, Falcon, GPT-2, OPT)
on any release in the range ``pyproject.toml`` declares, and offers the three operations
the transfer-or-recompute planner needs:

* ``capture(input_ids, past_kv=None) -> (kv, act)`` runs the model's own forward (the real
  prefill, so the KV is the model's own cache, byte for byte) and records, through forward
  pre-hooks on the K/V projections, the activations recompute needs; then it checks that the
  cache holds exactly the prefix it was given followed by exactly the new tokens, in every
  layer, and that every layer's projection saw exactly those tokens once, and raises
  :class:`CaptureError` otherwise (never returns KV of other tokens);
* ``recompute_kv(act, start_pos=0, layers=None, out=None) -> kv`` rebuilds the K/V of those
  tokens with **one GEMM per layer** over all the tokens at once: the K and V rows of each
  layer's projection (separate or fused, whatever the layout: :mod:`.projections`) are
  gathered once, at construction, into a ``[2 * kv_heads * head_dim, hidden]`` matrix, so a
  layer's recompute is ``X @ W_kv^T + b_kv``, then K goes through the model's own K norm
  (:mod:`.norms`) and the model's own rotary embedding (:mod:`.rotary`), both batched over
  all tokens and heads;
* ``to_cache(kv)`` turns a restored ``[layers, 2, T, kv_heads, head_dim]`` tensor into a
  ``DynamicCache`` the model's ``forward``/``generate`` accept, passed under
  ``adapter.cache_keyword`` (``cache`` or ``past_key_values``, read from the forward's
  signature: :mod:`.compat`).

Which activations: the input to the K/V projection (post-norm), not the pre-norm residual
stream: it is exactly what the K/V GEMM consumed (recompute is that GEMM plus the model's
own K norm and rotary; no second source of rounding), it is right for pre- and post-LN
models alike (OPT's ``do_layer_norm_before=False``) without special cases, and normalised
activations keep their relative precision when stored in fp16/bf16.

For GPT-2, OPT and Falcon with ALiBi the keys are not rotated; a token's position reaches
its K/V only through the activations, so ``start_pos`` does not change their recompute.

Anything not understood raises ``NotImplementedError`` naming it at construction: an
unknown or refused architecture (MLA, recurrent mixers: :data:`.families.REFUSED`), a cache
this release lays out in a way :mod:`.compat` cannot read, a rope type whose frequencies
depend on the sequence length (``dynamic``, ``longrope``), a norm on anything but K (or Q),
cross-attention, layers sharing KV, quantised or otherwise non-standard projection modules.
Sliding-window attention is accepted: it changes which keys a query attends to, not the
K/V values themselves, and ``capture``/``to_cache`` use full, non-sliding cache layers so
no token's KV is dropped. MoE changes the feed-forward block only.

Costs: ``capture`` is one forward pass plus an ``O(L * P)`` comparison of the given prefix;
``recompute_kv`` is ``L`` GEMMs of ``T x hidden x 2*H*D`` plus ``O(L * T * H * D)`` for the
norm and rotary. The gathered weights cost extra memory equal to the model's K/V weights.
"""

from __future__ import annotations

from functools import reduce
from typing import TYPE_CHECKING, Any

import torch

from kvstore.errors import InvalidInputError, KVStoreError
from kvstore.layout import ModelLayout
from kvstore.models import compat, norms, rotary
from kvstore.models.compat import unsupported
from kvstore.models.families import FAMILIES, REFUSED, REFUSED_ATTENTION_PARTS
from kvstore.models.projections import LAYOUTS, KVProjection

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


class CaptureError(KVStoreError, RuntimeError):
    """The model's forward did not produce KV of exactly the given prefix and tokens.

    Raised instead of returning KV that might belong to other tokens or positions (e.g. a
    model that ignored the cache it was given). Nothing is returned when it is raised.
    """


class HFAdapter:
    """Capture and recompute the KV cache of a ``transformers`` causal LM (see module doc).

    Holds no mutable state after construction apart from the model reference and the
    gathered K/V weights; safe to share between threads for ``recompute_kv`` (each call
    allocates its own outputs unless ``out`` is given). ``capture`` hooks the model's modules
    for the duration of one forward: one capture per model at a time.
    """

    def __init__(self, model: "nn.Module") -> None:
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type in REFUSED:
            raise unsupported(f"architecture {model_type!r}: {REFUSED[model_type]}")
        if model_type not in FAMILIES:
            raise unsupported(f"architecture {model_type!r} ({type(model).__name__}); "
                              f"supported: {sorted(FAMILIES)}")
        if getattr(config, "is_encoder_decoder", False):
            raise unsupported("encoder-decoder models")
        if getattr(config, "add_cross_attention", False):
            raise unsupported(f"{model_type} with add_cross_attention=True")
        self.model = model
        self.config = config
        self.model_type: str = model_type
        try:
            self._inspect(model, config, FAMILIES[model_type])
        except AttributeError as exc:  # a module tree other than the family's: refuse, by name
            raise unsupported(f"{model_type} module layout ({exc})") from exc

    # ------------------------------------------------------------------ construction
    def _inspect(self, model: "nn.Module", config: Any, family: Any) -> None:
        """Find and check every module the adapter relies on; build the gathered K/V weights."""
        self.cache_layout: str = compat.probe_cache_layout()
        self._base = self._base_model(model)
        #: the keyword under which the model's forward / generate take a cache.
        self.cache_keyword: str = compat.cache_keyword(model.forward)
        self._base_cache_keyword = compat.cache_keyword(self._base.forward)
        self._base_takes_positions = compat.takes_keyword(self._base.forward, "position_ids")

        attns = self._attention_modules(family.layers, family.attn)
        self._proj: list[KVProjection] = [LAYOUTS[family.proj](a, config, i) for i, a in enumerate(attns)]
        first = self._proj[0]
        for i, p in enumerate(self._proj):
            if (p.kv_heads, p.head_dim, p.hidden, p.weight.dtype) != (first.kv_heads, first.head_dim, first.hidden,
                                                                        first.weight.dtype):
                raise unsupported(f"heterogeneous layers (layer {i} differs from layer 0)")
        self._repeats = [p.cache_repeat for p in self._proj]
        if len({id(p.module) for p in self._proj}) != len(self._proj):
            raise unsupported("K/V projections shared between layers")
        self._norms = [norms.resolve(a, i, first.kv_heads, first.head_dim) for i, a in enumerate(attns)]
        rotated = family.rotary if isinstance(family.rotary, bool) else getattr(config, family.rotary, None)
        if not isinstance(rotated, bool):
            raise unsupported(f"{self.model_type} config without a boolean {family.rotary!r}")
        self._rotary: list[rotary.LayerRotary | None] = [
            rotary.resolve(self._base, a, config, i, first.head_dim) if rotated else None for i, a in enumerate(attns)]
        self.layout = ModelLayout(num_layers=len(attns), num_kv_heads=first.kv_heads, head_dim=first.head_dim,
                                  hidden_size=first.hidden, dtype=first.weight.dtype)
        self.device = first.weight.device

    @staticmethod
    def _base_model(model: "nn.Module") -> "nn.Module":
        """The decoder stack under the LM head (skips computing logits during capture).

        ``base_model_prefix`` names it on most releases; some (Gemma3's causal LM in 4.x)
        declare a prefix that is not an attribute, so the usual names are tried next.
        """
        for name in (getattr(model, "base_model_prefix", ""), "model", "transformer"):
            base = getattr(model, name, None) if name else None
            if isinstance(base, torch.nn.Module):
                return base
        return model

    def _attention_modules(self, layers_path: str, attn_name: str) -> list["nn.Module"]:
        try:
            layers = reduce(getattr, layers_path.split("."), self._base)
        except AttributeError as exc:
            raise unsupported(f"{self.model_type} module tree without {layers_path!r} "
                              f"under {type(self._base).__name__}") from exc
        attns = []
        for i, layer in enumerate(layers):
            attn = getattr(layer, attn_name, None)
            if attn is None:
                raise unsupported(f"decoder layer {i} ({type(layer).__name__}) without {attn_name!r}")
            for part, why in REFUSED_ATTENTION_PARTS.items():
                if getattr(attn, part, None) is not None:
                    raise unsupported(f"{type(attn).__name__}.{part} in layer {i}: {why}")
            if getattr(attn, "is_cross_attention", False):
                raise unsupported(f"cross-attention in layer {i}")
            if getattr(attn, "layer_idx", i) != i:
                raise unsupported(f"layer {i} whose attention writes cache layer {attn.layer_idx} (shared KV)")
            attns.append(attn)
        if not attns:
            raise unsupported("a model with no attention layers")
        return attns

    # ------------------------------------------------------------------ capture
    def capture(self, input_ids: torch.Tensor, past_kv: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model's forward on ``input_ids`` and return the new tokens' KV and activations.

        ``input_ids``: ``[T]`` or ``[1, T]``. ``past_kv``: an optional cached prefix in this
        adapter's layout (``[L, 2, P, H, D]``); the new tokens then sit at positions
        ``P..P+T-1``. Returns ``kv`` ``[L, 2, T, H, D]`` (read from the model's own cache) and
        ``act`` ``[L, T, hidden]`` (the inputs to the K/V projections). One forward pass.
        Raises :class:`CaptureError` if the cache or the activations do not cover exactly
        the prefix and the tokens in every layer.
        """
        ids = self._as_ids(input_ids)
        tokens = ids.shape[1]
        past_len = 0
        cache = compat.new_cache()
        prefix = None
        if past_kv is not None:
            self._check_kv(past_kv)
            prefix = past_kv.to(device=self.device, dtype=self.layout.dtype)
            past_len = prefix.shape[2]
            compat.fill_cache(cache, prefix, self.device, self._repeats)
        seen: list[list[torch.Tensor]] = [[] for _ in self._proj]
        seen_v: list[list[torch.Tensor]] = [[] for _ in self._proj]
        handles = []
        for i, p in enumerate(self._proj):
            def hook(_mod: Any, args: tuple, _i: int = i) -> None:
                seen[_i].append(args[0].detach())

            def hook_v(_mod: Any, args: tuple, _i: int = i) -> None:
                seen_v[_i].append(args[0].detach())
            handles.append(p.module.register_forward_pre_hook(hook))
            if p.v_module is not None:
                handles.append(p.v_module.register_forward_pre_hook(hook_v))
        kwargs: dict[str, Any] = {self._base_cache_keyword: cache, "use_cache": True}
        if self._base_takes_positions:
            kwargs["position_ids"] = torch.arange(past_len, past_len + tokens, device=self.device)[None]
        try:
            with torch.inference_mode():
                out = self._base(input_ids=ids, **kwargs)
        finally:
            for h in handles:
                h.remove()
        act = self._checked_activations(seen, tokens)
        for i, p in enumerate(self._proj):
            if p.v_module is not None and (len(seen_v[i]) != 1 or not torch.equal(seen_v[i][0][0], act[i])):
                raise CaptureError(f"layer {i}'s V projection did not see exactly the K projection's input")
        kv = self._checked_kv(compat.output_cache(out), prefix, past_len, tokens)
        return kv, act

    def _checked_activations(self, seen: list[list[torch.Tensor]], tokens: int) -> torch.Tensor:
        want = (1, tokens, self.layout.hidden_size)
        for i, calls in enumerate(seen):
            if len(calls) != 1 or tuple(calls[0].shape) != want:
                raise CaptureError(f"layer {i}'s K/V projection saw {[tuple(c.shape) for c in calls]}, "
                                   f"expected one call on {want}")
        return torch.stack([calls[0][0] for calls in seen])

    def _checked_kv(self, cache: Any, prefix: torch.Tensor | None, past_len: int, tokens: int) -> torch.Tensor:
        """The new tokens' KV from ``cache``, after checking it is exactly ``prefix`` + ``tokens`` per layer."""
        if cache is None:
            raise CaptureError("the model's forward returned no cache")
        layers = compat.cache_layers(cache)
        lay = self.layout
        if len(layers) != lay.num_layers:
            raise CaptureError(f"the model's cache has {len(layers)} layers, expected {lay.num_layers} "
                               f"(did the forward ignore the {self._base_cache_keyword!r} it was given?)")
        per_layer = []
        for i, (k, v, seen) in enumerate(layers):
            repeat = self._proj[i].cache_repeat
            want = (1, lay.num_kv_heads * repeat, past_len + tokens, lay.head_dim)
            if seen != k.shape[2]:
                raise CaptureError(f"layer {i} of the model's cache holds {k.shape[2]} of the {seen} tokens it saw")
            if tuple(k.shape) != want or tuple(v.shape) != want:
                raise CaptureError(f"layer {i} of the model's cache holds K {tuple(k.shape)}, V {tuple(v.shape)}; "
                                   f"expected {want} ({past_len} cached + {tokens} new tokens)")
            if repeat > 1:
                k, v = self._unrepeat(k, repeat, i), self._unrepeat(v, repeat, i)
            if prefix is not None and past_len and not (
                    torch.equal(k[0, :, :past_len], prefix[i, 0].transpose(0, 1))
                    and torch.equal(v[0, :, :past_len], prefix[i, 1].transpose(0, 1))):
                raise CaptureError(f"layer {i} of the model's cache does not start with the given prefix")
            per_layer.append(torch.stack([k[0, :, past_len:].transpose(0, 1), v[0, :, past_len:].transpose(0, 1)]))
        return torch.stack(per_layer).contiguous()

    @staticmethod
    def _unrepeat(x: torch.Tensor, repeat: int, layer: int) -> torch.Tensor:
        """``[1, H * r, T, D]`` whose heads repeat ``r`` times each -> ``[1, H, T, D]``; checks the copies agree."""
        grouped = x.view(1, x.shape[1] // repeat, repeat, *x.shape[2:])
        if not torch.equal(grouped, grouped[:, :, :1].expand_as(grouped)):
            raise CaptureError(f"layer {layer} of the model's cache does not repeat each K/V head {repeat} times")
        return grouped[:, :, 0]

    def _as_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise InvalidInputError(f"input_ids must be [T] or [1, T] with T > 0, got {tuple(ids.shape)}")
        return ids.to(self.device)

    def new_cache(self) -> Any:
        """An empty cache for this model's forward (pass it under ``cache_keyword``); keeps every token."""
        return compat.new_cache()

    def to_cache(self, kv: torch.Tensor) -> Any:
        """A ``DynamicCache`` holding ``kv`` (``[L, 2, T, H, D]``), for ``forward``/``generate``.

        Pass it as ``model(ids, **{adapter.cache_keyword: cache})``: the keyword differs
        between releases. Every layer keeps all tokens (no sliding-window truncation).
        """
        self._check_kv(kv)
        cache = compat.new_cache()
        compat.fill_cache(cache, kv.to(dtype=self.layout.dtype), self.device, self._repeats)
        return cache

    def from_cache(self, cache: Any, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Tokens ``start..stop`` of a model-filled cache (any layout this release uses) as ``[L, 2, T, H, D]``.

        What an engine calls after its own prefill to ``put`` the KV. Raises
        :class:`CaptureError` if the cache does not have this model's layers and heads or
        holds fewer than ``stop`` tokens in some layer (e.g. a sliding-window layer that
        dropped old tokens). ``O(L * T * H * D)`` copy.
        """
        layers = compat.cache_layers(cache)
        lay = self.layout
        if len(layers) != lay.num_layers:
            raise CaptureError(f"the cache has {len(layers)} layers, expected {lay.num_layers}")
        for i, (k, _, seen) in enumerate(layers):
            if seen != k.shape[2]:
                raise CaptureError(f"layer {i} of the cache holds {k.shape[2]} of the {seen} tokens it saw "
                                   "(a sliding-window or preallocated layer)")
        lengths = {k.shape[2] for k, _, _ in layers}
        if len(lengths) != 1:
            raise CaptureError(f"the cache's layers hold different numbers of tokens {sorted(lengths)} "
                               "(a sliding-window layer drops old tokens)")
        held = lengths.pop()
        stop = held if stop is None else stop
        if not 0 <= start <= stop <= held:
            raise CaptureError(f"asked for tokens {start}..{stop} of a cache holding {held}")
        per_layer = []
        for i, (k, v, _) in enumerate(layers):
            repeat = self._proj[i].cache_repeat
            want = (1, lay.num_kv_heads * repeat)
            if tuple(k.shape[:2]) != want or tuple(v.shape[:2]) != want or k.shape[3] != lay.head_dim:
                raise CaptureError(f"layer {i} of the cache holds K {tuple(k.shape)}, expected {want} heads x "
                                   f"tokens x {lay.head_dim}")
            if repeat > 1:
                k, v = self._unrepeat(k, repeat, i), self._unrepeat(v, repeat, i)
            per_layer.append(torch.stack([k[0, :, start:stop].transpose(0, 1), v[0, :, start:stop].transpose(0, 1)]))
        return torch.stack(per_layer).contiguous()

    @staticmethod
    def output_cache(out: Any) -> Any:
        """The cache in a forward's output, whichever field name this release uses."""
        return compat.output_cache(out)

    def _check_kv(self, kv: torch.Tensor) -> None:
        lay = self.layout
        if kv.dim() != 5 or kv.shape[0] != lay.num_layers or kv.shape[1] != 2 \
                or tuple(kv.shape[3:]) != (lay.num_kv_heads, lay.head_dim):
            raise InvalidInputError(f"kv must be {lay.kv_shape('T')}, got {tuple(kv.shape)}")

    # ------------------------------------------------------------------ recompute
    def recompute_kv(self, act: torch.Tensor, start_pos: int = 0,
                     layers: tuple[int, int] | None = None, out: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """Recompute K/V from stored activations: one GEMM per layer, then the model's K norm and rotary.

        ``act``: ``[L, T, hidden]`` (all layers) or ``[b - a, T, hidden]`` for
        ``layers=(a, b)``. Tokens are at positions ``start_pos..start_pos+T-1``. Returns
        ``[b - a, 2, T, H, D]`` in the model's dtype and device, written into ``out`` when
        given (e.g. a slice of the caller's KV buffer). Cost: ``b - a`` GEMMs of
        ``T x hidden x 2*H*D``, one rotary evaluation per distinct rotary module.
        """
        lay = self.layout
        a, b = layers if layers is not None else (0, lay.num_layers)
        if not (0 <= a < b <= lay.num_layers):
            raise InvalidInputError(f"layers must satisfy 0 <= a < b <= {lay.num_layers}, got {(a, b)}")
        if not isinstance(start_pos, int) or isinstance(start_pos, bool) or start_pos < 0:
            raise InvalidInputError(f"start_pos must be a non-negative int, got {start_pos!r}")
        if act.dim() != 3 or act.shape[2] != lay.hidden_size or act.shape[0] not in (lay.num_layers, b - a):
            raise InvalidInputError(f"act must be [{lay.num_layers} or {b - a}, T, {lay.hidden_size}], "
                                    f"got {tuple(act.shape)}")
        offset = 0 if act.shape[0] == lay.num_layers else a
        tokens = act.shape[1]
        heads, dim = lay.num_kv_heads, lay.head_dim
        kvd = heads * dim
        shape = (b - a, 2, tokens, heads, dim)
        if out is None:
            out = torch.empty(shape, dtype=lay.dtype, device=self.device)
        elif tuple(out.shape) != shape:
            raise InvalidInputError(f"out must be {shape}, got {tuple(out.shape)}")
        positions = torch.arange(start_pos, start_pos + tokens, device=self.device)
        cos_sin: dict[tuple[int, str | None], tuple[torch.Tensor, torch.Tensor]] = {}
        with torch.inference_mode():
            for layer in range(a, b):
                proj, norm, rot = self._proj[layer], self._norms[layer], self._rotary[layer]
                x = act[layer - offset].to(device=self.device, dtype=lay.dtype)
                if proj.fused_bias:
                    y = torch.nn.functional.linear(x, proj.weight, proj.bias)  # [T, 2*kvd]: the one GEMM
                else:  # rounded as the model rounds it: the product, then the bias
                    y = torch.nn.functional.linear(x, proj.weight)
                    y = y if proj.bias is None else y + proj.bias
                k = y[:, :kvd].view(tokens, heads, dim)
                if norm is not None or rot is not None:
                    k4 = k.transpose(0, 1)[None]  # [1, H, T, D], the layout the model's modules take
                    if norm is not None:
                        k4 = norm.apply(k4)
                    if rot is not None:
                        if rot.key not in cos_sin:
                            cos_sin[rot.key] = rot.cos_sin(positions, lay.dtype)
                        k4 = rot.rotate(k4, *cos_sin[rot.key])
                    k = k4[0].transpose(0, 1)
                out[layer - a, 0].copy_(k)
                out[layer - a, 1].copy_(y[:, kvd:].view(tokens, heads, dim))
        return out
