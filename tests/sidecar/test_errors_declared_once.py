"""Every error the sidecar sends is declared once, in ``kvstore.errors``; the protocol
module only maps wire codes to those classes (and re-exports them for old imports)."""

from __future__ import annotations

import ast
from pathlib import Path

import kvstore.errors as errors
from kvstore.sidecar import protocol


def test_every_wire_code_maps_to_a_class_declared_in_errors():
    for code, cls in protocol.CODE_TO_ERROR.items():
        if cls is NotImplementedError:
            continue
        assert cls.__module__ == "kvstore.errors", f"{code}: {cls.__qualname__} is declared in {cls.__module__}"
        assert getattr(errors, cls.__name__) is cls
        assert getattr(protocol, cls.__name__) is cls, f"protocol no longer re-exports {cls.__name__}"


def test_the_protocol_module_declares_no_exception_class():
    tree = ast.parse(Path(protocol.__file__).read_text())
    declared = [n.name for n in tree.body if isinstance(n, ast.ClassDef) and n.name.endswith("Error")]
    assert declared == [], f"declare these in kvstore.errors instead: {declared}"


def test_a_reply_raises_the_class_an_engine_catches_from_errors():
    exc = protocol.error_from_reply({"code": "unknown_lease", "message": "gone"})
    assert isinstance(exc, errors.UnknownLeaseError) and isinstance(exc, errors.RemoteError)
    assert exc.code == "unknown_lease" and str(exc) == "gone"
    assert protocol.error_code(errors.StaleArenaError("x")) == "stale_arena"
