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
    assert isinstance(exc, errors.UnknownLeaseError) and isinstance(exc, errors.SidecarError)
    assert exc.code == "unknown_lease" and str(exc) == "gone"
    assert protocol.error_code(errors.StaleArenaError("x")) == "stale_arena"


def test_the_old_remote_names_are_the_sidecar_names_for_one_release():
    """"remote" now names the remote tier (Redis) only; the sidecar client and its error
    class were renamed, and the old names stay importable as the very same objects."""
    import warnings

    import clients
    from clients.remote import RemoteClient, SidecarClient as ViaOldModule
    from clients.sidecar import SidecarClient

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an alias, not a shim that warns on every import
        assert RemoteClient is SidecarClient and ViaOldModule is SidecarClient
        assert clients.RemoteClient is SidecarClient and clients.SidecarClient is SidecarClient
    assert errors.RemoteError is errors.SidecarError and protocol.RemoteError is errors.SidecarError
    assert issubclass(errors.SidecarUnavailableError, errors.RemoteError)
