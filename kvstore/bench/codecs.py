"""``kvstore bench codecs``: each tier codec's ratio, its encode and decode speed beside a
memcpy of the decoded bytes, and restores from the host and disk tiers with and without it.

Blocks are bf16 KV of a typical shape (``--layers`` 32, ``--kv-heads`` 8, ``--head-dim``
128, 16 tokens: 2 MiB raw each) with per-channel key outliers; ``total`` raw bytes
(default 256 MiB) of them.

- ``<codec> ratio``: raw bytes per byte of slot (what a tier's capacity is multiplied by);
  for ``lossless`` also the payload ratio Blosc achieved on these bytes.
- ``<codec> encode`` / ``decode``: raw GB/s through ``Codec.encode``/``decode`` over the
  whole batch in the codec arena's chunks (4 MiB of raw blocks), limit: one ``copy_`` of the
  same raw bytes in the same run (ratio = value / memcpy; target for int8/fp8 decode: >= 0.5).
- ``restore <tier> <codec>``: seconds of ``KVStore.get(..., out=)`` of every block from a
  store whose only tier is ``host`` or ``disk`` with that codec (disk: page cache dropped
  before each read), limit: the same restore with ``none`` in the same run (ratio = coded /
  raw; target for int8 from disk: <= 0.6 where the disk link is the bottleneck -- on a
  machine whose disk reads outrun the decode it is not, and the ratio says so). With
  ``--remote-url`` the same from Redis (a store with no local copy of the blocks).

Each figure is the median of ``--repeats`` runs, ours and the limit interleaved.
"""

from __future__ import annotations

import argparse
from pathlib import Path
import tempfile

from allocator.codec_arena import _CHUNK_BYTES
from kvstore.bench.report import Report, machine_info, median_time

MiB = 1 << 20
CODECS = ("none", "lossless", "fp8", "int8", "int4")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--total", type=int, default=256, help="MiB of raw KV per measurement (default 256)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--codecs", default=",".join(CODECS), help="comma-separated codecs to measure")
    parser.add_argument("--remote-url", default=None,
                        help="also restore from this Redis (flushed namespace 'bench-codecs-*' keys only)")


def _kv(layers: int, tokens: int, heads: int, dim: int):
    import torch

    g = torch.Generator().manual_seed(24)
    kv = torch.randn(layers, 2, tokens, heads, dim, generator=g)
    kv[:, 0, :, :, torch.randperm(dim, generator=g)[:dim // 32]] *= 20  # key channel outliers
    return kv.to(torch.bfloat16)


def _codec_speed(report: Report, names: list[str], kv, block_shape: tuple[int, ...], repeats: int) -> None:
    import torch

    from allocator.codecs import make_codec
    from kvstore.layout import as_block_rows

    bt = block_shape[2]
    n = kv.shape[2] // bt
    blocks = as_block_rows(kv, bt, n).contiguous()
    raw = blocks.numel() * blocks.element_size()
    dst = torch.empty_like(blocks)
    for name in names:
        codec = make_codec(name, block_shape, torch.bfloat16)
        enc = torch.empty((n, codec.encoded_bytes), dtype=torch.uint8)
        codec.encode(blocks, enc)
        report.add(f"{name} ratio", codec.ratio, "x")
        if name == "lossless":
            report.add("lossless payload ratio", codec.achieved_ratio or 0.0, "x")
        # in the chunks a codec arena uses (the store never codes a whole batch at once: its
        # temporaries stay cache-sized), the memcpy over the same bytes in one copy
        per = max(1, _CHUNK_BYTES // codec.raw_bytes)
        parts = [(i, min(n, i + per)) for i in range(0, n, per)]

        def encode() -> None:
            for lo, hi in parts:
                codec.encode(blocks[lo:hi], enc[lo:hi])

        def decode() -> None:
            for lo, hi in parts:
                codec.decode(enc[lo:hi], dst[lo:hi])
        enc_s, dec_s, copy_s = [], [], []
        for _ in range(repeats):  # interleaved: ours and the limit see the same machine noise
            enc_s.append(median_time(encode, 1))
            dec_s.append(median_time(decode, 1))
            copy_s.append(median_time(lambda: dst.copy_(blocks), 1))
        med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        memcpy = raw / med(copy_s) / 1e9
        report.add(f"{name} encode", raw / med(enc_s) / 1e9, "GB/s", limit=memcpy)
        report.add(f"{name} decode", raw / med(dec_s) / 1e9, "GB/s", limit=memcpy,
                   target=0.5 if name in ("int8", "fp8") else None)
        if not codec.lossy and not torch.equal(dst, blocks):
            raise AssertionError(f"{name} did not decode to the same bytes")


def _restores(report: Report, names: list[str], kv, bt: int, workdir: Path, repeats: int,
              remote_url: str | None = None) -> None:
    import torch

    from kvstore import KVStore, ModelLayout, StoreConfig

    L, _, T, H, D = kv.shape
    layout = ModelLayout(num_layers=L, num_kv_heads=H, head_dim=D, hidden_size=H * D, dtype=torch.bfloat16)
    tokens = list(range(T))
    raw = kv.numel() * kv.element_size()
    out = torch.empty_like(kv)
    block = layout.kv_block_bytes(bt)
    for tier in ("host", "disk") + (("remote",) if remote_url else ()):
        stores = {}
        try:
            for name in ["none"] + [c for c in names if c != "none"]:
                size = raw + 64 * MiB
                cfg = StoreConfig(layout=layout, block_tokens=bt, device_bytes=0, device="cpu",
                                  host_bytes=size if tier == "host" else block if tier == "remote" else 0,
                                  disk_bytes=size if tier == "disk" else 0,
                                  disk_path=str(workdir / f"{tier}-{name}") if tier == "disk" else None,
                                  remote_url=remote_url if tier == "remote" else None, remote_deadline_s=120.0,
                                  namespace=f"bench-codecs-{name}",
                                  promote_on_hit=False, lossy_ok=True, **{f"{tier}_codec": name})
                st = KVStore(cfg)
                st.put(tokens, kv)
                if tier == "remote":
                    st.flush_remote(60.0)
                    st.clear()  # every block now comes from Redis
                stores[name] = st

            def restore(st) -> None:
                if tier == "disk":
                    st._tiers.tiers[-1].arena.drop_page_cache()  # cold: the disk link, not the page cache
                st.get(tokens, out=out)
            times: dict[str, list[float]] = {n: [] for n in stores}
            for _ in range(repeats):
                for name, st in stores.items():
                    times[name].append(median_time(lambda st=st: restore(st), 1))
            med = {n: sorted(v)[len(v) // 2] for n, v in times.items()}
            for name in stores:
                report.add(f"restore {tier} {name}", med[name], "s", limit=med["none"], better="lower",
                           target=0.6 if (tier == "disk" and name == "int8") else None)
            report.add(f"restore {tier} none bandwidth", raw / med["none"] / 1e9, "GB/s")
        finally:
            for st in stores.values():
                st.close()


def run(args: argparse.Namespace) -> Report:
    report = Report("codecs", machine_info())
    total = (min(32, args.total) if args.quick else args.total) * MiB
    names = [c for c in args.codecs.split(",") if c]
    layers = 8 if args.quick else args.layers
    block_shape = (layers, 2, args.block_tokens, args.kv_heads, args.head_dim)
    block_bytes = 2 * layers * 2 * args.block_tokens * args.kv_heads * args.head_dim
    blocks = max(1, total // block_bytes)
    kv = _kv(layers, blocks * args.block_tokens, args.kv_heads, args.head_dim)
    report.machine["raw_bytes"] = kv.numel() * kv.element_size()
    report.machine["block_shape"] = list(block_shape)
    repeats = 3 if args.quick else args.repeats
    _codec_speed(report, names, kv, block_shape, repeats)
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        _restores(report, names, kv, args.block_tokens, Path(d), repeats, args.remote_url)
    return report
