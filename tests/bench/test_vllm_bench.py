"""``kvstore bench vllm`` outside a venv with vLLM says so and exits (the suite itself runs
from .venv-vllm; its figures are in the issue note)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_bench_vllm_without_vllm_says_where_to_run_it(tmp_path):
    done = subprocess.run([sys.executable, "-m", "kvstore", "bench", "vllm", "--quick", "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "needs vLLM" in done.stderr and ".venv-vllm" in done.stderr
