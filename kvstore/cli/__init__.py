"""The ``kvstore`` command (also ``python -m kvstore``): one module per subcommand, demos included.

On top of everything: may import any part of the project, ``clients`` included. Each
subcommand module keeps its top-level imports light so ``kvstore --help`` stays fast.
"""

from kvstore.cli.main import main

__all__ = ["main"]
