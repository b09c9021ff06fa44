"""``kvstore bench SUITE [--json]``: suites are modules ``kvstore.bench.<suite>`` exposing
``run(opts) -> Report`` and optionally ``configure(parser)`` for their own flags."""

from __future__ import annotations

import argparse
import importlib
import pkgutil

import kvstore.bench as bench_pkg

_NOT_SUITES = {"cli", "report"}


def suites() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(bench_pkg.__path__) if m.name not in _NOT_SUITES
                  and not m.name.startswith("_"))


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", choices=suites())
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (for smoke tests)")
    parser.add_argument("--dir", default=None, help="directory for scratch files (default: a temp dir)")


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"kvstore.bench.{args.suite}")
    report = module.run(args)
    print(report.to_json() if args.json else report.to_table())
    return 0
