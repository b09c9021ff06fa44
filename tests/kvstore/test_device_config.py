"""Device names are validated at start; a sidecar takes no GPU memory unless asked (issue 26
item 6)."""

from __future__ import annotations

import argparse

import pytest
import torch

from kvstore import ConfigError, StoreConfig
from kvstore.cli import serve
from kvstore.config import environment_problems, sidecar_config


def _serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve.configure(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("bad", ["cuda:", "cuda:x", "cuda:-1", "cpu:0", "gpu", "cuda:1.5", "cuda:١"])
def test_malformed_device_names_are_one_clear_error(bad):
    with pytest.raises(ConfigError, match="device must be 'cpu', 'cuda' or 'cuda:N'"):
        StoreConfig(device=bad)


@pytest.mark.parametrize("good", ["cpu", "cuda", "cuda:0", "cuda:12"], ids=lambda d: f"name-{d}")
def test_well_formed_device_names_pass(good):
    assert StoreConfig(device=good).device == good


def test_sidecar_defaults_its_device_tier_to_host_memory():
    _, config, _ = serve.build(_serve_args())
    assert config.device == "cpu"
    assert sidecar_config(StoreConfig()).device == "cpu"
    assert sidecar_config(StoreConfig(device="cuda:0")).device == "cuda:0"  # asked for: kept
    _, config, _ = serve.build(_serve_args("--device", "cuda:1"))
    assert config.device == "cuda:1"


def test_sidecar_server_template_takes_no_gpu_by_default(tmp_path):
    from kvstore.sidecar.server import SidecarServer

    srv = SidecarServer(f"ipc://{tmp_path}/s.sock", StoreConfig(device_bytes=1 << 20, host_bytes=1 << 20))
    try:
        assert srv.config.device == "cpu"
    finally:
        srv.stop(timeout=5)


def test_a_cuda_index_beyond_the_machine_is_refused_at_start():
    found = environment_problems(StoreConfig(device="cuda:7", device_bytes=1 << 20, disk_bytes=0))
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count > 7:
        pytest.skip("this machine has more than 7 GPUs")
    assert len(found) == 1 and "cuda:7" in found[0]
    assert ("no CUDA device" in found[0]) if count == 0 else (f"{count} CUDA device(s)" in found[0])


def test_serve_check_names_the_bad_device(tmp_path):
    args = _serve_args("--device", "cuda:9", "--disk-bytes", "0", "--endpoint", f"ipc://{tmp_path}/s.sock")
    found, built = serve.problems(args)
    assert built is None and any("cuda:9" in p for p in found)
