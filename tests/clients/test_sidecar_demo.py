"""``run_sidecar_demo``: two engine processes share one cache; the report says so."""

from kvstore.cli.sidecar_demo import run_sidecar_demo


def test_sidecar_demo_shares_a_prompt_between_processes(capsys):
    assert run_sidecar_demo(tokens=64) == 0
    out = capsys.readouterr().out
    assert "cache hit on 64 of 64 tokens" in out and "bytes equal to its own prefill: True" in out
    assert "OK, two processes shared one cache" in out
