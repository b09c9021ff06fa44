"""SidecarClient over CurveZMQ: keys by argument or environment; a client the sidecar does
not know is refused (a clear SidecarUnavailableError, counted by the sidecar)."""

from __future__ import annotations

import pytest
import torch

from clients import CurveConfig, connect
from kvstore.errors import ConfigError
from kvstore.sidecar.security import write_keypair
from kvstore.sidecar.protocol import SidecarUnavailableError
from tests.clients.conftest import BT, start_server
from tests.clients.test_sidecar_client import make_kv, wait_until


@pytest.fixture
def curve(tmp_path):
    write_keypair(tmp_path, "server")
    write_keypair(tmp_path / "allow", "engine")
    write_keypair(tmp_path, "stranger")
    srv = start_server("tcp://127.0.0.1:*", tmp_path, curve_secret=str(tmp_path / "server.key_secret"),
                       curve_allow=str(tmp_path / "allow"))
    yield srv, tmp_path
    srv.stop(timeout=10)


def test_an_allowed_client_works_by_argument_and_by_environment(curve, layout, monkeypatch):
    srv, d = curve
    conf = CurveConfig(secret=str(d / "allow" / "engine.key_secret"), server=str(d / "server.key"))
    kv = make_kv(layout, 8, 1)
    with connect(srv.endpoint, layout=layout, namespace="c", block_tokens=BT, curve=conf) as c:
        assert c.put(list(range(8)), kv) == 8
    monkeypatch.setenv("KVSTORE_CURVE_SECRET", conf.secret)
    monkeypatch.setenv("KVSTORE_CURVE_SERVER", conf.server)
    with connect(srv.endpoint, layout=layout, namespace="c", block_tokens=BT) as c:
        assert torch.equal(c.get(list(range(8)), device="cpu"), kv)


@pytest.mark.parametrize("who", ["stranger", "no-curve"])
def test_an_unknown_client_is_refused(curve, layout, who):
    srv, d = curve
    kw = {"curve": {"secret": str(d / "stranger.key_secret"), "server": str(d / "server.key")}} if who == "stranger" \
        else {}
    before = srv.counters["unauthorised"]
    with pytest.raises(SidecarUnavailableError, match="CurveZMQ|CURVE|curve"):
        connect(srv.endpoint, layout=layout, namespace="c", block_tokens=BT, connect_timeout=0.5, retries=0, **kw)
    wait_until(lambda: srv.counters["unauthorised"] > before, timeout=5, what="the refusal to be counted")


def test_half_a_curve_config_is_a_config_error(layout, tmp_path):
    with pytest.raises(ConfigError, match="both"):
        connect("tcp://127.0.0.1:1", layout=layout, curve={"secret": str(tmp_path / "x")})
