"""Issue 12, the disk tier as an operator or a hostile local user would try it: namespace
names that collide, ownership across a restart, cleared blocks on a disk-only store, an
fsync'd put larger than the disk tier followed by SIGKILL, and a planted symlink.

Each test asserts exact bytes or a clean error, nothing else."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from allocator.disk import slab_file_bytes
from kvstore import ConfigError, KVStore, ModelLayout, StoreConfig
from kvstore.errors import NamespaceOwnerError
from kvstore.store import slab_filename
from tests.helpers import same

BT = 4
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def kv_for(layout: ModelLayout, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layout.kv_shape(n), generator=g).to(layout.dtype)


def store(layout, path, namespace="default", device=0, host=0, disk=16, fsync="always", owner=None) -> KVStore:
    bb = layout.kv_block_bytes(BT)
    return KVStore(StoreConfig(layout=layout, block_tokens=BT, device_bytes=device * bb, host_bytes=host * bb,
                               disk_bytes=slab_file_bytes(disk, bb), disk_path=str(path), persist=True,
                               fsync=fsync, namespace=namespace), owner=owner)


def prompt(p: int, n: int = 12) -> list[int]:
    return [p * 100000 + i for i in range(n)]


# -- scenario 4: names that collide on disk --------------------------------------------------
@pytest.mark.parametrize("a,b", [("a/b", "a_b"), ("\u00e9", "\u00fc"), ("x" * 70 + "1", "x" * 70 + "2"),
                                 ("ns", "NS")])
def test_colliding_names_get_their_own_slabs_across_restarts(layout, tmp_path, a, b):
    toks = prompt(0)
    with store(layout, tmp_path, a) as sa, store(layout, tmp_path, b) as sb:  # both open at once
        assert sa.put(toks, kv_for(layout, 12, 1)) == 12
        assert sb.put(toks, kv_for(layout, 12, 2)) == 12
    with store(layout, tmp_path, b) as sb:
        assert same(sb.get(toks), kv_for(layout, 12, 2))
        sb.clear()  # the second tenant's clear must not touch the first's blocks
    with store(layout, tmp_path, a) as sa, store(layout, tmp_path, b) as sb:
        assert sa.recovered_blocks == 3 and sb.recovered_blocks == 0
        assert same(sa.get(toks), kv_for(layout, 12, 1))
        assert sb.lookup(toks) == 0


def test_a_slab_refuses_another_namespace(layout, tmp_path):
    with store(layout, tmp_path, "alpha") as s:
        s.put(prompt(0), kv_for(layout, 12, 0))
    # an operator renames alpha's slab to beta's file name: beta must not adopt alpha's blocks
    os.rename(tmp_path / slab_filename("alpha", "kv"), tmp_path / slab_filename("beta", "kv"))
    with pytest.raises(ConfigError, match="alpha"):
        store(layout, tmp_path, "beta")
    assert slab_filename("a/b", "kv") != slab_filename("a_b", "kv")


# -- scenario 2 (store side): ownership recorded with the data --------------------------------
def test_owner_is_recorded_in_the_slab_and_survives_restart(layout, tmp_path):
    toks = prompt(1)
    with store(layout, tmp_path, "shared-name", owner="alice") as s:
        s.put(toks, kv_for(layout, 12, 1))
    for intruder in ("bob", None):  # each key's namespace of this name is its own slab: nothing of alice's
        with store(layout, tmp_path, "shared-name", owner=intruder) as s:
            assert s.lookup(toks) == 0
    # alice's slab planted under bob's file name: the slab records its owner and refuses bob
    alice_file = tmp_path / slab_filename("shared-name", "kv", "alice")
    bob_file = tmp_path / slab_filename("shared-name", "kv", "bob")
    os.replace(bob_file, tmp_path / "bob-own.slab")
    shutil.copyfile(alice_file, bob_file)
    with pytest.raises(NamespaceOwnerError, match="another owner"):
        store(layout, tmp_path, "shared-name", owner="bob")
    os.replace(tmp_path / "bob-own.slab", bob_file)
    with store(layout, tmp_path, "shared-name", owner="alice") as s:
        assert same(s.get(toks), kv_for(layout, 12, 1))


def test_owner_salts_the_block_keys(layout, tmp_path):
    with store(layout, tmp_path / "a", "n", owner="alice") as a, store(layout, tmp_path / "b", "n", owner="bob") as b:
        assert a._keys(prompt(0))[1] != b._keys(prompt(0))[1]


# -- scenario 5: cleared / evicted blocks on a disk-only persistent store ----------------------
def test_disk_only_clear_and_eviction_never_come_back(layout, tmp_path):
    with store(layout, tmp_path, disk=6) as s:
        assert s.put(prompt(0), kv_for(layout, 12, 0)) == 12
        s.clear()
        assert s.put(prompt(1), kv_for(layout, 12, 1)) == 12
        assert s.put(prompt(2), kv_for(layout, 12, 2)) == 12
        assert s.put(prompt(3), kv_for(layout, 12, 3)) == 12  # evicts prompt 1 (LRU)
        live = {p: s.lookup(prompt(p)) for p in range(4)}
    with store(layout, tmp_path, disk=6) as s:
        assert {p: s.lookup(prompt(p)) for p in range(4)} == live == {0: 0, 1: 0, 2: 12, 3: 12}
        assert s.recovered_blocks == 6
        for p in (2, 3):
            assert same(s.get(prompt(p)), kv_for(layout, 12, p))
        s._check()


def _run_then_kill(script: str, until_lines: int) -> list[str]:
    """Run ``script`` in a fresh interpreter, read ``until_lines`` lines, SIGKILL it."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.strip())
            if len(lines) >= until_lines:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert len(lines) == until_lines, f"the writer died early: {lines}"
    return lines


_HEAD = """
    import json, sys, time, torch
    from kvstore import ModelLayout
    from tests.kvstore.test_disk_integrity import kv_for, prompt, store
    layout = ModelLayout(num_layers=2, num_kv_heads=2, head_dim=8, hidden_size=32, dtype=torch.float16)
"""


def test_disk_only_clear_survives_sigkill(layout, tmp_path):
    _run_then_kill(_HEAD + f"""
    s = store(layout, {str(tmp_path)!r}, disk=8)
    s.put(prompt(0), kv_for(layout, 12, 0)); s.put(prompt(1), kv_for(layout, 12, 1))
    s.clear()
    print("cleared", flush=True)
    time.sleep(60)
    """, 1)
    with store(layout, tmp_path, disk=8) as s:
        assert s.recovered_blocks == 0
        assert s.lookup(prompt(0)) == 0 and s.lookup(prompt(1)) == 0


# -- scenario 7: fsync="always", disk tier smaller than the memory tiers -----------------------
def test_fsynced_puts_larger_than_the_disk_say_what_survives_sigkill(layout, tmp_path):
    # memory holds 32 blocks, disk 8: a put of 160 tokens (40 blocks) and several of 12 tokens
    lines = _run_then_kill(_HEAD + f"""
    s = store(layout, {str(tmp_path)!r}, device=16, host=16, disk=8)
    big = prompt(99, 160)
    n = s.put(big, kv_for(layout, 160, 99))
    print(json.dumps({{"big": n}}), flush=True)
    for p in range(6):
        s.put(prompt(p), kv_for(layout, 12, p))
        print(json.dumps({{q: s.lookup(prompt(q)) for q in range(6)}} | {{"big": s.lookup(big)}}), flush=True)
    time.sleep(60)
    """, 7)
    first, last = json.loads(lines[0]), json.loads(lines[-1])
    assert first["big"] < 160, "the put must not acknowledge more than the disk tier can keep"
    with store(layout, tmp_path, device=16, host=16, disk=8) as s:
        after = {str(p): s.lookup(prompt(p)) for p in range(6)} | {"big": s.lookup(prompt(99, 160))}
        assert after == last, (after, last)  # what lookup said before the kill is exactly what survived
        for p in range(6):
            if after[str(p)]:
                n = after[str(p)]
                assert same(s.get(prompt(p)[:n]), kv_for(layout, 12, p)[:, :, :n])
        s._check()


def test_put_result_counts_only_durable_tokens(layout, tmp_path):
    with store(layout, tmp_path, device=16, host=16, disk=8) as s:
        n = s.put(prompt(5, 160), kv_for(layout, 160, 5))
        assert n == s.lookup(prompt(5, 160)) <= 8 * BT
        assert same(s.get(prompt(5, 160)[:n]), kv_for(layout, 160, 5)[:, :, :n])
        s._check()


# -- scenario 8: planted links in disk_path ------------------------------------------------------
@pytest.mark.parametrize("persist", [True, False])
def test_planted_symlink_is_refused_and_target_untouched(layout, tmp_path, persist):
    disk = tmp_path / "disk"
    disk.mkdir(mode=0o700)
    victim = tmp_path / "precious.txt"
    victim.write_bytes(b"operator data")
    (disk / slab_filename("default", "kv")).symlink_to(victim)
    dangling = tmp_path / "created-elsewhere"
    (disk / slab_filename("other", "kv")).symlink_to(dangling)
    bb = layout.kv_block_bytes(BT)
    for ns in ("default", "other"):
        with pytest.raises(ConfigError, match="symbolic link"):
            KVStore(StoreConfig(layout=layout, block_tokens=BT, device_bytes=0, host_bytes=0,
                                disk_bytes=slab_file_bytes(8, bb), disk_path=str(disk), persist=persist,
                                namespace=ns))
    assert victim.read_bytes() == b"operator data"
    assert not dangling.exists()


def test_planted_hard_link_and_open_directory_are_refused(layout, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir(mode=0o700)
    victim = tmp_path / "precious.bin"
    victim.write_bytes(b"x" * 100)
    os.link(victim, disk / slab_filename("default", "kv"))
    with pytest.raises(ConfigError, match="hard link"):
        store(layout, disk)
    assert victim.read_bytes() == b"x" * 100
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # anyone could plant a link here between our check and open
    with pytest.raises(ConfigError, match="writable by other users"):
        store(layout, shared)
