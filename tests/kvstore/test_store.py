from __future__ import annotations

import random
import threading

import pytest
import torch

from tests.helpers import same

from kvstore import (BlockNotFoundError, ConfigError, InvalidInputError, KVStore, ModelLayout,
                     StoreClosedError, StoreConfig)

BT = 4


def make_kv(layout: ModelLayout, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layout.kv_shape(n), generator=g).to(layout.dtype)


def small_store(layout, tmp_path, device=4, host=4, disk=8, **kw) -> KVStore:
    bb = layout.kv_block_bytes(BT)
    from allocator.disk import slab_file_bytes

    return KVStore(StoreConfig(layout=layout, block_tokens=BT, device_bytes=device * bb, host_bytes=host * bb,
                               disk_bytes=slab_file_bytes(disk, bb) if disk else 0,
                               disk_path=str(tmp_path / "disk") if disk else None, **kw))


def test_put_lookup_get_roundtrip(layout, tmp_path):
    with small_store(layout, tmp_path) as s:
        tokens = list(range(10))
        kv = make_kv(layout, 10, 0)
        assert s.put(tokens, kv) == 8  # only full blocks
        assert s.lookup(tokens) == 8
        assert s.lookup(tokens[:7]) == 4
        assert same(s.get(tokens[:8]), kv[:, :, :8])
        assert same(s.get(tokens[:4]), kv[:, :, :4])
        assert s.lookup([99] + tokens[1:]) == 0
        s._check()


def test_shared_prefix_is_stored_once(layout, tmp_path):
    with small_store(layout, tmp_path) as s:
        base = list(range(8))
        kv_a = make_kv(layout, 12, 1)
        s.put(base + [100, 101, 102, 103], kv_a)
        kv_b = make_kv(layout, 12, 2)
        kv_b[:, :, :8] = kv_a[:, :, :8]
        assert s.put(base + [200, 201, 202, 203], kv_b) == 12
        st = s.stats()
        assert st["blocks"] == 4 and st["dedup_blocks"] == 2 and st["put_blocks"] == 4
        assert same(s.get(base + [200, 201, 202, 203]), kv_b)


def test_get_of_uncached_prefix_raises_keyerror(layout, tmp_path):
    with small_store(layout, tmp_path) as s:
        s.put(list(range(8)), make_kv(layout, 8, 0))
        with pytest.raises(BlockNotFoundError, match="only 8 of 12"):
            s.get(list(range(12)))
        with pytest.raises(KeyError):
            s.get(list(range(100, 104)))
        with pytest.raises(InvalidInputError, match="whole blocks"):
            s.get(list(range(6)))


def test_blocks_demote_to_disk_and_come_back_exact(layout, tmp_path):
    with small_store(layout, tmp_path, device=2, host=2, disk=8) as s:
        kvs = {}
        for p in range(6):
            tokens = [p * 1000 + i for i in range(8)]
            kvs[p] = (tokens, make_kv(layout, 8, p))
            s.put(*kvs[p])
            s._check()
        st = s.stats()
        assert st["tiers"]["disk"]["used_blocks"] > 0 and st["demotions"] > 0
        for tokens, kv in kvs.values():
            n = s.lookup(tokens)
            if n:
                assert same(s.get(tokens[:n]), kv[:, :, :n])
            s._check()
        assert s.stats()["tiers"]["disk"]["hits"] > 0
        assert s.stats()["promotions"] > 0


def test_capacity_is_never_exceeded_and_last_tier_drops(layout, tmp_path):
    with small_store(layout, tmp_path, device=2, host=2, disk=2) as s:
        for p in range(10):
            s.put([p * 1000 + i for i in range(8)], make_kv(layout, 8, p))
            st = s.stats()
            for tier in st["tiers"].values():
                assert tier["used_blocks"] <= tier["capacity_blocks"]
            s._check()
        assert st["dropped"] > 0 and st["blocks"] == 6


def test_promotion_can_be_disabled(layout, tmp_path):
    with small_store(layout, tmp_path, device=2, host=0, disk=8, promote_on_hit=False) as s:
        first = list(range(8))
        s.put(first, make_kv(layout, 8, 0))
        s.put(list(range(100, 108)), make_kv(layout, 8, 1))  # pushes `first` to disk
        assert s.stats()["tiers"]["disk"]["used_blocks"] == 2
        s.get(first)
        assert s.stats()["promotions"] == 0 and s.stats()["tiers"]["disk"]["used_blocks"] == 2


@pytest.mark.parametrize("bad_kv,msg", [
    (lambda L: make_kv(L, 8, 0).float(), "dtype"),
    (lambda L: make_kv(L, 7, 0), "shape"),
    (lambda L: make_kv(L, 8, 0)[:, :1], "shape"),
    (lambda L: make_kv(L, 8, 0).numpy(), "torch.Tensor"),
])
def test_bad_kv_is_rejected_and_nothing_changes(layout, tmp_path, bad_kv, msg):
    with small_store(layout, tmp_path) as s:
        kept = make_kv(layout, 8, 5)
        s.put(list(range(8)), kept)
        with pytest.raises(InvalidInputError, match=msg):
            s.put(list(range(100, 108)), bad_kv(layout))
        with pytest.raises(InvalidInputError, match="ints"):
            s.put([0.5] * 8, make_kv(layout, 8, 0))
        with pytest.raises(InvalidInputError, match="empty"):
            s.lookup([])
        assert s.stats()["blocks"] == 2
        assert same(s.get(list(range(8))), kept)
        s._check()


def test_config_errors_are_clear(layout, tmp_path):
    bb = layout.kv_block_bytes(BT)
    with pytest.raises(ConfigError, match="below one block"):
        KVStore(StoreConfig(layout=layout, block_tokens=BT, device_bytes=bb - 1))
    with pytest.raises(ConfigError, match="every tier is disabled"):
        KVStore(StoreConfig(layout=layout, block_tokens=BT, device_bytes=0, host_bytes=0))
    with pytest.raises(ConfigError, match="unknown eviction policy"):
        KVStore(StoreConfig(layout=layout, block_tokens=BT, policy="nope"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot be created|not a writable"):
        KVStore(StoreConfig(layout=layout, block_tokens=BT, disk_bytes=1 << 20, disk_path=str(blocker / "sub")))
    with pytest.raises(ConfigError, match="bytes free"):
        KVStore(StoreConfig(layout=layout, block_tokens=BT, disk_bytes=1 << 62, disk_path=str(tmp_path)))
    with pytest.raises(ConfigError, match="layout"):
        KVStore(StoreConfig(block_tokens=BT))


def test_toml_config(layout, tmp_path):
    f = tmp_path / "store.toml"
    f.write_text('block_tokens = 8\nhost_bytes = 4096\npolicy = "lru"\nfsync = "always"\n'
                 '[layout]\nnum_layers = 2\nnum_kv_heads = 2\nhead_dim = 8\nhidden_size = 32\ndtype = "float16"\n')
    cfg = StoreConfig.from_toml(f, host_bytes=8192)
    assert cfg.block_tokens == 8 and cfg.host_bytes == 8192 and cfg.layout == layout and cfg.fsync == "always"
    f.write_text("bogus = 1\n")
    with pytest.raises(ConfigError, match="unknown config keys"):
        StoreConfig.from_toml(f)


def test_closed_store_refuses_and_temp_dir_is_removed(layout):
    bb = layout.kv_block_bytes(BT)
    s = KVStore(StoreConfig(layout=layout, block_tokens=BT, disk_bytes=64 * bb + (1 << 16)))
    tmp = s._tmpdir
    assert tmp is not None
    s.close()
    import os

    assert not os.path.exists(tmp)
    with pytest.raises(StoreClosedError):
        s.lookup([1, 2, 3, 4])


def test_pinned_blocks_are_not_evicted_while_read(layout, tmp_path):
    """A reader holds its blocks; a put that needs their room stores less instead."""
    with small_store(layout, tmp_path, device=2, host=0, disk=0) as s:
        tokens = list(range(8))
        kv = make_kv(layout, 8, 0)
        s.put(tokens, kv)
        entries = [s._tiers.index[k] for k in s._keys(tokens)[1]]
        for e in entries:
            s._tiers.pin(e)
        assert s.put(list(range(100, 108)), make_kv(layout, 8, 1)) == 0
        assert s.stats()["rejected_blocks"] == 2
        for e in entries:
            s._tiers.unpin(e, e.tier, e.slot)
        assert same(s.get(tokens), kv)
        assert s.put(list(range(100, 108)), make_kv(layout, 8, 1)) == 8
        s._check()


def test_corrupt_disk_block_is_reported_missing_never_returned(layout, tmp_path):
    import os

    with small_store(layout, tmp_path, device=1, host=0, disk=4) as s:
        victim = list(range(8))
        s.put(victim, make_kv(layout, 8, 0))
        s.put(list(range(100, 104)), make_kv(layout, 4, 1))
        disk = s._tiers.tiers[-1].arena
        entry = s._tiers.index[s._keys(victim)[1][0]]
        assert s._tiers.tiers[entry.tier] is s._tiers.tiers[-1]
        off = disk.data_offset + entry.slot * disk.stride + 10
        os.pwrite(disk.fd, bytes([os.pread(disk.fd, 1, off)[0] ^ 1]), off)
        with pytest.raises(BlockNotFoundError, match="checksum"):
            s.get(victim)
        assert s.stats()["corrupt_blocks"] == 1
        assert s.lookup(victim) == 0  # dropped, with its now unreachable child
        s._check()


def test_threads_share_a_store_safely(layout, tmp_path):
    with small_store(layout, tmp_path, device=4, host=4, disk=16) as s:
        errors: list[BaseException] = []
        data = {t: ([t * 10000 + i for i in range(12)], make_kv(layout, 12, t)) for t in range(4)}

        def worker(t: int) -> None:
            r = random.Random(t)
            try:
                for _ in range(60):
                    tokens, kv = data[r.randrange(4)]
                    if r.random() < 0.5:
                        s.put(tokens, kv)
                    n = s.lookup(tokens)
                    if n:
                        try:
                            assert same(s.get(tokens[:n]), kv[:, :, :n])
                        except BlockNotFoundError:
                            pass  # evicted between lookup and get: a clean miss
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        s._check()


@pytest.mark.parametrize("persist", [False, True], ids=["exclusive", "durable"])
def test_seeded_stress_against_reference(layout, tmp_path, seed, persist):
    """Random put/lookup/get over three tiny tiers; every get equals the reference bytes."""
    rng = random.Random(seed)
    prompts = []
    for p in range(30):
        if prompts and rng.random() < 0.5:  # share a prefix with an earlier prompt
            base, _ = prompts[rng.randrange(len(prompts))]
            cut = rng.randrange(1, len(base) // BT + 1) * BT
            tokens = base[:cut] + [rng.randrange(50000) for _ in range(rng.randrange(0, 14))]
        else:
            tokens = [rng.randrange(50000) for _ in range(rng.randrange(4, 20))]
        prompts.append((tokens, None))
    reference: dict[tuple, torch.Tensor] = {}  # full-block prefix -> its kv
    disk_hits = dropped = restarts = 0
    with small_store(layout, tmp_path, device=3, host=3, disk=5 if not persist else 8, persist=persist) as s:
        for step in range(400):
            tokens, _ = prompts[rng.randrange(len(prompts))]
            op = rng.random()
            if op < 0.45:
                kv = make_kv(layout, len(tokens), rng.randrange(10**6))
                # a prefix already stored must carry the same KV (same tokens -> same KV)
                nb = len(tokens) // BT
                for b in range(nb):
                    ref = reference.get(tuple(tokens[:(b + 1) * BT]))
                    if ref is not None:
                        kv[:, :, b * BT:(b + 1) * BT] = ref
                stored = s.put(tokens, kv)
                assert stored % BT == 0 and stored <= nb * BT
                for b in range(nb):
                    reference[tuple(tokens[:(b + 1) * BT])] = kv[:, :, b * BT:(b + 1) * BT].clone()
            elif op < 0.7:
                n = s.lookup(tokens)
                assert n % BT == 0 and n <= len(tokens)
            elif op < 0.72 and persist:  # restart: what the disk holds must come back exact
                disk_hits += s.stats()["tiers"]["disk"]["hits"]
                dropped += s.stats()["dropped"]
                restarts += 1
                s.close()
                s = small_store(layout, tmp_path, device=3, host=3, disk=8, persist=True)
            else:
                n = s.lookup(tokens)
                if n:
                    got = s.get(tokens[:n])
                    want = torch.cat([reference[tuple(tokens[:(b + 1) * BT])] for b in range(n // BT)], dim=2)
                    assert same(got, want), f"step {step}: bytes differ"
            s._check()
            for tier in s.stats()["tiers"].values():
                assert tier["used_blocks"] <= tier["capacity_blocks"]
        st = s.stats()
        assert st["dropped"] + dropped > 0 and st["tiers"]["disk"]["hits"] + disk_hits > 0
        assert st["demotions"] > 0 or persist
        assert restarts > 0 or not persist
    s.close()
