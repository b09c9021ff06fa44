"""A restore plan as plain data: the sidecar's ``plan`` reply and the embedded client's ``plan``.

Here, beside the planner, so both the sidecar server and the clients use it without the
clients importing the server module. The planner and cost model are imported on call, so a
build without them answers :class:`~kvstore.errors.UnsupportedError` instead of failing
to import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kvstore.errors import InvalidInputError, UnsupportedError

if TYPE_CHECKING:  # pragma: no cover
    from kvstore.store import KVStore


def plan_result(store: KVStore, tokens: Any, profile: dict | None = None) -> dict:
    """The transfer-or-recompute plan for ``tokens``' cached prefix, as plain data.

    Raises :class:`UnsupportedError` when this build has no planner. O(planner).
    """
    try:
        planner = importlib.import_module("kvstore.restore.planner")
        costmodel = importlib.import_module("kvstore.restore.costmodel")
    except ModuleNotFoundError as exc:
        raise UnsupportedError(f"plan is not available in this build ({exc.name} is missing)") from None
    try:
        prof = costmodel.CostProfile.from_dict(profile) if profile is not None else costmodel.default_profile()
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInputError(f"bad cost profile: {exc}") from None
    tiers = store.locate(tokens)
    blocks = [planner.BlockForms(kv=t) for t in tiers]
    plan = planner.plan_restore(blocks, store.layout, store.block_tokens, prof, codecs=store.planner_codecs(prof))
    return {"blocks": len(blocks), "cached_tokens": len(blocks) * store.block_tokens,
            "steps": [[s.block, s.action, s.tier] for s in plan.steps],
            "predicted_s": plan.predicted_s, "lower_bound_s": plan.lower_bound_s,
            "restore_s": plan.restore_s, "prefill_tokens": plan.prefill_tokens, "exact": plan.exact}
