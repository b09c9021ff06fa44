"""The old home of the sidecar client, kept for one release.

"remote" now names the remote tier (Redis) only; the client of a ``kvstore serve`` sidecar
is :class:`clients.sidecar.SidecarClient`. ``RemoteClient`` and this module's names are
the same objects as ``clients.sidecar``'s, not copies.
"""

from clients.sidecar import *  # noqa: F401,F403
from clients.sidecar import CurveConfig, SidecarClient

RemoteClient = SidecarClient

__all__ = ["CurveConfig", "RemoteClient", "SidecarClient"]
