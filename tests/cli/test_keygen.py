from __future__ import annotations

import stat

import pytest

from kvstore.cli import main


def test_keygen_writes_a_loadable_pair_with_a_private_secret(tmp_path, capsys):
    zmq_auth = pytest.importorskip("zmq.auth")
    assert main(["keygen", "--dir", str(tmp_path), "--name", "server"]) == 0
    public, secret = tmp_path / "server.key", tmp_path / "server.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    pub1, sec1 = zmq_auth.load_certificate(str(secret))
    pub2, sec2 = zmq_auth.load_certificate(str(public))
    assert pub1 == pub2 and len(pub1) == 40 and len(sec1) == 40 and sec2 is None
    assert main(["keygen", "--dir", str(tmp_path), "--name", "server"]) == 1  # no silent overwrite
    assert "exists" in capsys.readouterr().err
    assert main(["keygen", "--dir", str(tmp_path), "--name", "server", "--force"]) == 0
    assert zmq_auth.load_certificate(str(secret))[0] != pub1
