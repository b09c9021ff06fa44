"""``kvstore bench SUITE [--json] [--quick] [--dir D] [suite flags]``.

Suites are modules ``kvstore.bench.<suite>`` exposing ``run(args) -> Report`` and optionally
``configure(parser)`` for their own flags. Only the chosen suite is imported, so its flags
are parsed after the suite name is known.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil

import kvstore.bench as bench_pkg

_NOT_SUITES = {"report"}


def suites() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(bench_pkg.__path__) if m.name not in _NOT_SUITES
                  and not m.name.startswith("_") and not m.name.endswith("_client"))


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", choices=suites())
    parser.add_argument("suite_args", nargs=argparse.REMAINDER,
                        help="--json (one JSON document on stdout), --quick (smaller sizes), "
                             "--dir D (scratch files), and the suite's own flags (kvstore bench SUITE --help)")


def _suite_parser(name: str, module) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"kvstore bench {name}", description=(module.__doc__ or "").strip())
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (for smoke tests)")
    parser.add_argument("--dir", default=None, help="directory for scratch files (default: a temp dir)")
    if hasattr(module, "configure"):
        module.configure(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"kvstore.bench.{args.suite}")
    opts = _suite_parser(args.suite, module).parse_args(args.suite_args)
    report = module.run(opts)
    print(report.to_json() if opts.json else report.to_table())
    return 0
