"""A dead or silent sidecar costs a client its documented deadline, not a minute; every
error code reaches the engine as the class the README names, from ``kvstore.errors``."""

from __future__ import annotations

import time

import pytest
import torch

from clients import connect
from clients.sidecar import DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_TIMEOUT_S, SidecarClient
import kvstore.errors as errors
from kvstore.sidecar import protocol
from tests.clients.conftest import BT, start_server
from tests.clients.test_sidecar_client import FakeSidecar, hello_ok, make_kv


def test_defaults_are_short_and_documented():
    assert DEFAULT_TIMEOUT_S <= 5 and DEFAULT_CONNECT_TIMEOUT_S <= 3
    import clients.sidecar

    doc = clients.sidecar.__doc__
    assert "5 s" in doc and "3 s" in doc and "timeout=" in doc


def test_nothing_listening_fails_within_the_connect_deadline(layout):
    t0 = time.monotonic()
    with pytest.raises(errors.SidecarUnavailableError):
        SidecarClient("tcp://127.0.0.1:9", layout, block_tokens=BT)
    assert time.monotonic() - t0 < DEFAULT_CONNECT_TIMEOUT_S + 1.0


def test_an_ipc_endpoint_says_why_nothing_answers_there(layout, tmp_path):
    """An operator whose sidecar died sees why the client got no reply: ZeroMQ retries a
    dead ipc socket file silently, so the error reads the file itself."""
    import socket

    missing = tmp_path / "none.sock"
    with pytest.raises(errors.SidecarUnavailableError, match="there is no socket file .*none.sock"):
        SidecarClient(f"ipc://{missing}", layout, block_tokens=BT, connect_timeout=0.3)
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # as a killed sidecar leaves it: the file, nobody listening
    assert stale.exists()
    with pytest.raises(errors.SidecarUnavailableError, match="exists but nothing listens on it"):
        SidecarClient(f"ipc://{stale}", layout, block_tokens=BT, connect_timeout=0.3)
    # a live one that is only silent (does not speak kvstore): no verdict about the file
    listening = tmp_path / "live.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(listening))
    live.listen(8)
    try:
        with pytest.raises(errors.SidecarUnavailableError, match="is `kvstore serve` running there"):
            SidecarClient(f"ipc://{listening}", layout, block_tokens=BT, connect_timeout=0.3)
    finally:
        live.close()


def test_a_silent_sidecar_costs_each_call_its_deadline_retries_included(layout):
    fake = FakeSidecar(lambda n, h: hello_ok(h) if h["op"] == "hello" else None)
    try:
        c = SidecarClient(fake.endpoint, layout, block_tokens=BT, shm=False)
        for call in (lambda: c.lookup(list(range(8))), lambda: c.put(list(range(8)), make_kv(layout, 8, 1))):
            t0 = time.monotonic()
            with pytest.raises(errors.SidecarUnavailableError):
                call()
            took = time.monotonic() - t0
            assert DEFAULT_TIMEOUT_S - 0.2 < took < DEFAULT_TIMEOUT_S + 1.0, took
        t0 = time.monotonic()
        with pytest.raises(errors.SidecarUnavailableError, match="within 0.4 s"):
            c.lookup(list(range(8)), timeout=0.4)  # per call
        assert time.monotonic() - t0 < 1.0
        with pytest.raises(ValueError, match="timeout"):
            c.lookup(list(range(8)), timeout=-1)
        c.close()
    finally:
        fake.close()


def test_error_classes_live_in_kvstore_errors_and_old_names_still_import():
    assert protocol.SidecarUnavailableError is errors.SidecarUnavailableError
    assert protocol.LayoutMismatchError is errors.LayoutMismatchError
    assert issubclass(errors.LayoutMismatchError, errors.ConfigError)
    from kvstore.sidecar.server import ForbiddenError

    assert ForbiddenError is errors.ForbiddenError


@pytest.mark.parametrize("code,cls", [("forbidden", errors.ForbiddenError), ("busy", errors.BusyError),
                                      ("unavailable", errors.SidecarUnavailableError),
                                      ("layout_mismatch", errors.LayoutMismatchError),
                                      ("invalid_argument", errors.InvalidInputError)])
def test_each_error_code_maps_to_its_class(layout, code, cls):
    fake = FakeSidecar(lambda n, h: hello_ok(h) if h["op"] == "hello" else
                       {"v": 1, "id": h["id"], "ok": False, "error": {"code": code, "message": f"a {code} error"}})
    try:
        c = SidecarClient(fake.endpoint, layout, block_tokens=BT, shm=False, timeout=2)
        with pytest.raises(cls, match=f"a {code} error"):
            c.stats()
        c.close()
    finally:
        fake.close()


def test_busy_from_a_real_sidecar_is_a_busy_error(tmp_path, layout):
    srv = start_server("tcp://127.0.0.1:*", tmp_path, max_claims_per_client=1)
    try:
        with connect(srv.endpoint, layout=layout, namespace="busy", block_tokens=BT) as c:
            toks = list(range(8))
            c.put(toks, make_kv(layout, 8, 2))
            args = {"ns": "busy", "tokens": torch.tensor(toks, dtype=torch.int32).numpy().tobytes(), "shm": True}
            c._request("get", args)
            with pytest.raises(errors.BusyError):
                c._request("get", args)
    finally:
        srv.stop()
