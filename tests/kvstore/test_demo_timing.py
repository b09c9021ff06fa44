"""The demo's CUDA prefill timings wait for the kernels (issue 26 item 9): ``_Model.wait``
synchronises the model's own device (named), and nothing on the CPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from kvstore.cli.demo import _Model  # noqa: E402


def test_demo_waits_for_the_models_device_by_name(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: calls.append(a or k))
    m = _Model(0)
    m.wait()
    assert calls == []  # CPU: the forward is done when it returns
    m.device = torch.device("cuda:1")  # as after m.to("cuda:1")
    m.wait()
    assert calls == [(torch.device("cuda:1"),)]


@pytest.mark.cuda
def test_cuda_demo_runs_and_reports_waited_times(capsys):
    from kvstore.cli.demo import Demo

    assert Demo(users=2, turns=2, gen_tokens=2, seed=1).run() == 0
    assert "prefill time:" in capsys.readouterr().out
