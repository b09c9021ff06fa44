"""``kvstore keygen``: a CurveZMQ key pair for the sidecar or a client.

Writes ``NAME.key`` (public, Z85) and ``NAME.key_secret`` (public and secret, mode 0600) in
the ZeroMQ certificate format, so ``zmq.auth.load_certificate`` reads them and the server's
allow-list is simply a directory of client ``.key`` files.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default=".", help="where to write the key files (default: .)")
    parser.add_argument("--name", default="kvstore", help="file name stem (default: kvstore)")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")


def write_keypair(directory: str | Path, name: str, force: bool = False) -> tuple[Path, Path]:
    """Create the pair; refuses to overwrite unless ``force``. Returns (public, secret) paths."""
    import zmq

    if not zmq.has("curve"):
        raise RuntimeError("this libzmq was built without CURVE support")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public_path, secret_path = directory / f"{name}.key", directory / f"{name}.key_secret"
    if not force and (public_path.exists() or secret_path.exists()):
        raise FileExistsError(f"{public_path} or {secret_path} exists (use --force to replace)")
    public, secret = zmq.curve_keypair()
    header = "#   ZeroMQ CURVE certificate written by kvstore keygen\n"
    public_path.write_text(f"{header}metadata\ncurve\n    public-key = \"{public.decode()}\"\n")
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{header}metadata\ncurve\n    public-key = \"{public.decode()}\"\n"
                f"    secret-key = \"{secret.decode()}\"\n")
    os.chmod(secret_path, 0o600)
    return public_path, secret_path


def run(args: argparse.Namespace) -> int:
    try:
        public, secret = write_keypair(args.dir, args.name, args.force)
    except (FileExistsError, RuntimeError) as exc:
        print(f"kvstore keygen: {exc}", file=sys.stderr)
        return 1
    print(f"public key: {public}\nsecret key: {secret} (mode 0600; keep it private)")
    return 0
