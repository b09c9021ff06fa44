"""``kvstore serve`` validates everything before it serves (and ``--check`` does only that):
each mistake is one line, nothing is bound; ``kvstore stats`` works before any namespace."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvstore.cli.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvstore", "serve", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def problems(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("kvstore serve: ") and "problem(s)" not in line]


def test_every_mistake_in_a_config_file_is_one_line_and_nothing_serves(tmp_path):
    cfg = tmp_path / "store.toml"
    cfg.write_text('policy = {device = "lru", hots = "arc", disk = "lruu"}\n'
                   'fsync_interval_s = -5\n'
                   'host_bytz = 5\n'
                   '[layout]\nnum_layers = 2\nnum_kv_heads = 2\nhidden_size = 32\ndtype = "fp16"\n')
    proc = serve("--config", str(cfg), "--endpoint", f"ipc://{tmp_path}/s.sock", "--check")
    assert proc.returncode == 2, proc.stderr
    lines = problems(proc.stderr)
    expected = ["unknown tier 'hots'", "'lruu'", "fsync_interval_s", "'host_bytz'", "missing 'head_dim'",
                "dtype"]
    for what in expected:
        assert sum(what in line for line in lines) == 1, (what, lines)
    assert len(lines) == len(expected), lines
    assert "Traceback" not in proc.stderr and "serving" not in proc.stderr
    assert not (tmp_path / "s.sock").exists()


@pytest.mark.parametrize("args,message", [
    (["--policy", "bogus"], "'bogus' is an unknown eviction policy"),
    (["--lease-timeout", "-1"], "lease_timeout_s must be a positive number"),
    (["--workers", "0"], "workers must be a positive int"),
    (["--host-codec", "int3"], "host_codec must be one of"),
    (["--disk-codec", "zstd"], "disk_codec must be one of"),
])
def test_bad_flags_fail_at_start_not_at_the_first_hello(tmp_path, args, message):
    proc = serve("--endpoint", f"ipc://{tmp_path}/s.sock", *args)  # no --check: it would serve
    assert proc.returncode == 2 and any(message in line for line in problems(proc.stderr)), proc.stderr
    assert "serving" not in proc.stderr and not (tmp_path / "s.sock").exists()


def test_an_unwritable_disk_path_fails_at_start(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = serve("--endpoint", f"ipc://{tmp_path}/s.sock", "--disk-bytes", "64MiB", "--disk-path",
                 str(blocker / "sub"))
    assert proc.returncode == 2 and any("disk_path" in line for line in problems(proc.stderr)), proc.stderr
    if os.geteuid() != 0:  # root writes anywhere; a read-only directory only stops other users
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        proc = serve("--endpoint", f"ipc://{tmp_path}/s.sock", "--disk-bytes", "64MiB", "--disk-path", str(ro))
        assert proc.returncode == 2 and any("not writable" in line for line in problems(proc.stderr)), proc.stderr


def test_a_good_config_checks_ok(tmp_path):
    cfg = tmp_path / "store.toml"
    cfg.write_text(f'host_bytes = 1048576\ndevice_bytes = 0\ndisk_bytes = 1048576\ndisk_path = "{tmp_path}/d"\n'
                   'policy = {host = "lru", disk = "s3fifo"}\n')
    proc = serve("--config", str(cfg), "--endpoint", f"ipc://{tmp_path}/s.sock", "--check")
    assert proc.returncode == 0 and "configuration OK" in proc.stderr, proc.stderr


def test_stats_before_any_namespace_exists(tmp_path, capsys):
    from kvstore import StoreConfig
    from kvstore.sidecar.server import ServerOptions, SidecarServer

    srv = SidecarServer(f"ipc://{tmp_path}/s.sock", StoreConfig(device_bytes=0, host_bytes=1 << 20),
                        ServerOptions(workers=1, shm_dir=str(tmp_path / "shm"))).start()
    try:
        assert main(["stats", "--endpoint", srv.endpoint]) == 0
        out = capsys.readouterr().out
        assert "no namespaces yet" in out and srv.endpoint in out
        assert main(["stats", "--endpoint", srv.endpoint, "--json"]) == 0
        assert '"namespaces": {}' in capsys.readouterr().out
    finally:
        srv.stop(timeout=10)


def test_codec_flags_check_ok(tmp_path):
    proc = serve("--endpoint", f"ipc://{tmp_path}/s.sock", "--host-codec", "int4", "--disk-codec", "lossless",
                 "--disk-bytes", "1MiB", "--disk-path", str(tmp_path / "d"), "--lossy-ok", "--check")
    assert proc.returncode == 0 and "configuration OK" in proc.stderr, proc.stderr
