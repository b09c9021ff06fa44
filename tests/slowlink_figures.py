"""Issue 27's slow-link figures: get 2 x 256 KiB and put 256 x 32 KiB through a 256 KiB/s
loopback proxy to a healthy redis-server, remote_deadline_s=0.5, single node and cluster.
Run from the repository root: .venv/bin/python tests/slowlink_figures.py (issue 27 note)"""
import sys, time, json
sys.path.insert(0, ".")
import torch
from kvstore import KVStore, ModelLayout, StoreConfig
from kvstore.errors import BlockNotFoundError
from tests.redisserver import RedisServer, RedisClusterProcs
from tests.slowlink import SlowLink

RATE = 256 << 10
BT = 16
big = ModelLayout(num_layers=4, num_kv_heads=8, head_dim=128, hidden_size=1024, dtype=torch.float16)   # 256 KiB blocks
small = ModelLayout(num_layers=4, num_kv_heads=1, head_dim=128, hidden_size=128, dtype=torch.float16)  # 32 KiB blocks

def store(layout, url, deadline=0.5):
    return KVStore(StoreConfig(layout=layout, block_tokens=BT, device_bytes=0, host_bytes=1 << 30, device="cpu",
                               namespace="fig", remote_url=url, remote_deadline_s=deadline))

def case(real_url, slow_url):
    g = torch.Generator().manual_seed(1)
    out = {}
    tokens = torch.randint(0, 50000, (2 * BT,), generator=g)
    kv = torch.randn(big.kv_shape(2 * BT), generator=g).to(big.dtype)
    with store(big, real_url, deadline=60) as fast:  # (a cluster's clients all go through the proxies)
        fast.put(tokens, kv)
        out["setup_written"] = fast.stats()["remote"]["written_blocks"]
    with store(big, slow_url) as s:
        t0 = time.monotonic()
        try:
            s.get(tokens); hit = True
        except BlockNotFoundError:
            hit = False
        out["get_2x256KiB_s"] = round(time.monotonic() - t0, 3); out["get_hit"] = hit
    tokens = torch.randint(0, 50000, (256 * BT,), generator=g)
    kv = torch.randn(small.kv_shape(256 * BT), generator=g).to(small.dtype)
    with store(small, slow_url) as s:
        t0 = time.monotonic()
        n = s.put(tokens, kv)
        out["put_256x32KiB_s"] = round(time.monotonic() - t0, 3)
        out["put_written_remote"] = s.stats()["remote"]["written_blocks"]
    return out

res = {}
srv = RedisServer()
try:
    with SlowLink(srv.port, RATE, lifetime_s=300) as link:
        res["single"] = case(srv.url, f"redis://127.0.0.1:{link.port}")
finally:
    srv.stop()
c = RedisClusterProcs(3)
links = [SlowLink(n.port, RATE, lifetime_s=300) for n in c.nodes]
try:
    for n, l in zip(c.nodes, links):
        n.cli("config", "set", "cluster-announce-port", str(l.port))
    while not all(str(links[0].port) in n.cli("cluster", "slots") for n in c.nodes):
        time.sleep(0.1)
    res["cluster"] = case(c.url, "redis+cluster://" + ",".join(f"127.0.0.1:{l.port}" for l in links))
finally:
    for l in links: l.close()
    c.stop()
print(json.dumps(res))
