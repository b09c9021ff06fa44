"""kvstore: a paged, tiered KV-cache service for LLM inference.

The command line: one entry point, one module per subcommand.

Each subcommand lives in its own module exposing ``configure(parser)`` and
``run(args) -> int``; modules keep their imports light at top level (torch, transformers and
zmq are imported inside ``run``) so ``kvstore --help`` stays fast. A module that is not
present in this build is simply not offered.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("kvstore.cli.demo", "end-to-end run on embedded defaults: a small model, shared prefixes, the tiered store"),
    "serve": ("kvstore.cli.serve", "run the sidecar (ZeroMQ + msgpack)"),
    "stats": ("kvstore.cli.stats", "print a running sidecar's statistics"),
    "simulate": ("kvstore.cli.simulate", "trace-driven eviction study"),
    "bench": ("kvstore.cli.bench", "benchmarks, each beside the machine limit measured in the same run"),
    "calibrate": ("kvstore.cli.calibrate", "measure link bandwidths and compute rate into a cost profile"),
    "keygen": ("kvstore.cli.keygen", "make a CurveZMQ key pair"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvstore", description=__doc__.splitlines()[0].removeprefix("kvstore: "))
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.configure(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    # The sidecar and the benchmarks share cores with inference engines: OpenMP threads that
    # spin after each parallel region (the default) steal them. Before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not getattr(args, "_run", None):
        parser.print_help(sys.stderr)
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
