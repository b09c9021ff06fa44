"""``kvstore keygen``: a CurveZMQ key pair for the sidecar or a client.

Writes ``NAME.key`` (public, Z85) and ``NAME.key_secret`` (public and secret, mode 0600) in
the ZeroMQ certificate format, so ``zmq.auth.load_certificate`` reads them and the server's
allow-list is simply a directory of client ``.key`` files.
"""

from __future__ import annotations

import argparse
import sys

from kvstore.sidecar.security import write_keypair


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default=".", help="where to write the key files (default: .)")
    parser.add_argument("--name", default="kvstore", help="file name stem (default: kvstore)")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")



def run(args: argparse.Namespace) -> int:
    try:
        public, secret = write_keypair(args.dir, args.name, args.force)
    except (FileExistsError, RuntimeError) as exc:
        print(f"kvstore keygen: {exc}", file=sys.stderr)
        return 1
    print(f"public key: {public}\nsecret key: {secret} (mode 0600; keep it private)")
    return 0
