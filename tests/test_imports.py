"""The import direction of docs/architecture.md, room by room.

Rooms (a module belongs to the deepest listed package that contains it):

- ``eviction`` and ``allocator`` import nothing of ours;
- the store core (``kvstore`` top-level modules) imports ``allocator``, ``eviction`` and
  ``kvstore.restore``; ``kvstore.restore`` sits beside it and imports the core; inside the
  core, ``kvstore.builder`` (building tiers) and ``kvstore.port`` (the lease/staging protocol
  for another process) sit below ``kvstore.store`` and never import it (``FORBIDDEN_MODULES``);
- ``kvstore.models`` imports only the core's ``layout`` and ``errors``;
- ``kvstore.sidecar`` sits above the store: core, restore, allocator, eviction. Inside it
  only the entry points (``kvstore.cli``, ``kvstore.bench``) import the ``server`` module
  (bind and loop): the handlers (``store_ops``, ``session_ops``, ``shm_plane``,
  ``gpu_pool``) see the sidecar through ``context.Context``, never the server's privates,
  and the sidecar's modules import each other without a cycle (``SIDECAR_LAYERS``);
- ``clients`` sits above the sidecar (and the store), but never imports the sidecar's
  server module: a client talks to the server over the wire (``FORBIDDEN``);
- ``kvstore.integrations`` (engine connectors: the only room that imports an engine) sits
  above the clients: core, restore, allocator, eviction, sidecar, clients; nothing of ours
  imports it (engines load it by module path);
- ``kvstore.cli`` and ``kvstore.bench`` are on top and may import anything but
  ``kvstore.integrations``.

``kvstore/hf.py`` is the public re-export ``from kvstore.hf import HFAdapter`` and
``kvstore/__init__.py`` resolves the public names lazily; both are listed by name.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP_PACKAGES = ("kvstore", "allocator", "eviction", "clients")

CORE = {"kvstore", "kvstore.activations", "kvstore.builder", "kvstore.config", "kvstore.errors", "kvstore.hashing",
        "kvstore.layout", "kvstore.paged", "kvstore.port", "kvstore.remote_tier", "kvstore.saves", "kvstore.store",
        "kvstore.tiers", "kvstore.validate"}
ROOMS = ["kvstore.restore", "kvstore.models", "kvstore.sidecar", "kvstore.integrations", "kvstore.cli", "kvstore.bench"]
EVERYTHING = {"*"}
ALLOWED: dict[str, set[str]] = {
    "eviction": set(),
    "allocator": set(),
    "kvstore": {"allocator", "eviction", "kvstore.restore"} | CORE,
    "kvstore.restore": {"allocator", "eviction"} | CORE,
    "kvstore.models": {"kvstore.layout", "kvstore.errors"},
    "kvstore.sidecar": {"allocator", "eviction", "kvstore.restore"} | CORE,
    "clients": {"allocator", "eviction", "kvstore.restore", "kvstore.sidecar"} | CORE,
    "kvstore.integrations": {"allocator", "eviction", "kvstore.restore", "kvstore.sidecar", "clients"} | CORE,
    "kvstore.cli": EVERYTHING,
    "kvstore.bench": EVERYTHING,
}
#: back doors: modules a room must not import although its rule allows their room, and why
FORBIDDEN: dict[str, set[str]] = {
    # a client reaches the server over the wire only; importing the server module loaded the
    # server and the store core into every client process (process identity is sidecar.procinfo)
    "clients": {"kvstore.sidecar.server"},
    # the server is bind + loop; its rooms (namespaces, claims, metrics, dispatch, handlers)
    # sit below it: shm_plane and gpu_pool once called its privates, a cycle in all but the
    # import line. They get a Context instead.
    "kvstore.sidecar": {"kvstore.sidecar.server"},
    "kvstore.integrations": {"kvstore.sidecar.server"},
}
#: back doors inside the core: the store assembles itself with ``kvstore.builder`` and offers
#: ``kvstore.port`` to other processes; both sit below ``kvstore.store`` and never import it
#: (the port reaches its store through the ``PortedStore`` protocol it is handed)
FORBIDDEN_MODULES: dict[str, set[str]] = {
    "kvstore.builder": {"kvstore.store", "kvstore.port"},
    "kvstore.port": {"kvstore.store", "kvstore.builder"},
}
#: the sidecar's modules, bottom up: a module imports only modules of earlier layers
#: (type-only imports included), so there is no cycle and a room's place is written down
SIDECAR_LAYERS: list[set[str]] = [
    {"kvstore.sidecar", "kvstore.sidecar.procinfo", "kvstore.sidecar.options", "kvstore.sidecar.protocol"},
    {"kvstore.sidecar.limits", "kvstore.sidecar.security"},
    {"kvstore.sidecar.namespaces"},                                     # stores and their arenas
    {"kvstore.sidecar.claims"},                                         # what clients hold, the reaper
    {"kvstore.sidecar.metrics"},                                        # counters, Prometheus
    {"kvstore.sidecar.context"},                                        # what a handler sees
    {"kvstore.sidecar.shm_plane", "kvstore.sidecar.gpu_pool", "kvstore.sidecar.session_ops"},
    {"kvstore.sidecar.store_ops"},                                      # a get's lease reply is shm_plane's
    {"kvstore.sidecar.dispatch"},                                       # the op table
    {"kvstore.sidecar.server"},                                         # bind and loop
]
#: modules allowed one extra arrow, and why
EXCEPTIONS = {
    "kvstore.hf": {"kvstore.models"},       # the public re-export of HFAdapter
    "kvstore.__main__": {"kvstore.cli"},    # python -m kvstore
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def room_of(module: str) -> str:
    for room in ROOMS:
        if module == room or module.startswith(room + "."):
            return room
    return module.split(".")[0]


def imported_modules(path: Path) -> set[str]:
    """Our modules that ``path`` imports (absolute imports; relative ones resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path).split(".")
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here if is_pkg else here[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names = [node.args[0].value]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in TOP_PACKAGES)
    return found


#: rooms nothing else of ours may import (whatever ALLOWED says)
SEALED = {"kvstore.integrations"}


def allowed(importer: str, imported: str) -> bool:
    room = room_of(importer)
    if room_of(imported) in SEALED and room_of(imported) != room:
        return False
    rule = ALLOWED[room]
    closed = FORBIDDEN.get(room, set()) | FORBIDDEN_MODULES.get(importer, set())
    if any(t == f or t.startswith(f + ".") for t in (imported, imported.rsplit(".", 1)[0]) for f in closed):
        return False
    if rule is EVERYTHING or room_of(imported) == room:
        return True
    # "from kvstore.layout import X" names kvstore.layout.X too: judge it and its parent
    for target in (imported, imported.rsplit(".", 1)[0]):
        if target in rule or room_of(target) in rule or room_of(target) in EXCEPTIONS.get(importer, set()):
            return True
    return False


def violations_in(paths) -> list[str]:
    out = []
    for path in paths:
        importer = module_name(path)
        for imported in sorted(imported_modules(path)):
            if imported.split(".")[0] == "kvstore" and room_of(imported) == "kvstore" \
                    and imported not in CORE and imported.rsplit(".", 1)[0] not in CORE \
                    and imported not in EXCEPTIONS and imported.rsplit(".", 1)[0] not in EXCEPTIONS:
                # a top-level kvstore module that is not in CORE: the checker must learn it
                out.append(f"{importer} imports {imported}, a kvstore module outside every room")
            elif not allowed(importer, imported):
                out.append(f"{importer} ({room_of(importer)}) imports {imported} ({room_of(imported)})")
    return out


def our_files():
    for pkg in TOP_PACKAGES:
        yield from (ROOT / pkg).rglob("*.py")


def test_every_import_follows_the_design_direction():
    files = list(our_files())
    assert len(files) > 40
    bad = violations_in(files)
    assert not bad, "imports against the direction of docs/architecture.md:\n" + "\n".join(bad)


def test_every_top_level_kvstore_module_is_in_a_room():
    top = {module_name(p) for p in (ROOT / "kvstore").glob("*.py")}
    assert top - CORE - set(EXCEPTIONS) == set(), "new top-level kvstore modules: put them in a room or in CORE"


def test_every_room_says_what_it_owns_and_may_import():
    for room in ROOMS:
        init = ROOT / Path(*room.split(".")) / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "import" in doc and len(doc) > 100, f"{init} needs a docstring saying what it owns and imports"


def _write(tmp_root: Path, rel: str, text: str) -> Path:
    p = tmp_root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_the_checker_catches_violations(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    cases = {
        "kvstore/store.py": "from kvstore.sidecar.server import SidecarServer\n",        # core -> sidecar
        "kvstore/models/hf.py": "from kvstore.store import KVStore\n",                  # models -> core store
        "kvstore/restore/planner.py": "import clients\n",                              # restore -> clients
        "kvstore/sidecar/server.py": "from kvstore.cli import main\n",                  # sidecar -> cli
        "allocator/arena.py": "from kvstore.errors import ConfigError\n",               # allocator -> kvstore
        "clients/sidecar.py": "from kvstore.bench.report import Report\n",               # clients -> bench
        "eviction/lru.py": "import importlib\nimportlib.import_module('kvstore.store')\n",
        "clients/embedded.py": "from kvstore.sidecar.server import host_id\n",          # clients -> server
        "clients/base.py": "from kvstore.sidecar import server\n",
        "kvstore/bench/vllm.py": "from kvstore.integrations.vllm import KVStoreConnector\n",   # into integrations
        "kvstore/integrations/vllm.py": "from kvstore.cli import main\n",                    # integrations -> cli
        "kvstore/port.py": "from kvstore.store import KVStore\n",                        # port -> the store above it
        "kvstore/builder.py": "from kvstore import store\n",                           # builder -> the store above it
        # the old back door: the sidecar's rooms reaching into the server
        "kvstore/sidecar/shm_plane.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                        "    from kvstore.sidecar.server import Namespace\n",
        "kvstore/sidecar/gpu_pool.py": "from kvstore.sidecar import server\n",
        "kvstore/integrations/lmcache.py": "from kvstore.sidecar.server import SidecarServer\n",
    }
    for rel, text in cases.items():
        p = _write(tmp_path, rel, text)
        assert violations_in([p]), f"{rel}: {text!r} should be refused"
    fine = {
        "kvstore/cli/demo.py": "from clients import connect\nfrom kvstore.sidecar.server import SidecarServer\n",
        "kvstore/models/hf.py": "from kvstore.layout import ModelLayout\nfrom kvstore.errors import InvalidInputError\n",
        "kvstore/sidecar/server.py": "from kvstore.store import KVStore\nfrom .protocol import pack\n",
        "kvstore/store.py": "from kvstore.port import StorePort\nfrom kvstore.builder import build_store_tiers\n",
        "kvstore/port.py": "from kvstore.tiers import TierManager\n",
        "kvstore/sidecar/shm_plane.py": "from kvstore.sidecar.context import Context\n",
        "kvstore/bench/sidecar.py": "from kvstore.sidecar.server import SidecarServer\n",
        "clients/sidecar.py": "from kvstore.sidecar.protocol import pack\n",
        "kvstore/integrations/vllm.py": "from clients import connect\nfrom kvstore.restore.planner import plan_restore\n",
    }
    for rel, text in fine.items():
        p = _write(tmp_path, rel, text)
        assert not violations_in([p]), f"{rel}: {text!r} should be allowed"


def sidecar_layer_problems() -> list[str]:
    """Imports between the sidecar's modules that do not point to an earlier layer of
    ``SIDECAR_LAYERS``, and sidecar modules missing from it. O(imports)."""
    layer = {m: i for i, mods in enumerate(SIDECAR_LAYERS) for m in mods}
    out = []
    for path in sorted((ROOT / "kvstore" / "sidecar").glob("*.py")):
        importer = module_name(path)
        if importer not in layer:
            out.append(f"{importer} is in no layer of SIDECAR_LAYERS: place it")
            continue
        for imported in sorted(imported_modules(path)):
            if imported in layer and imported != "kvstore.sidecar" and layer[imported] >= layer[importer]:
                out.append(f"{importer} (layer {layer[importer]}) imports {imported} (layer {layer[imported]})")
    return out


def test_the_sidecar_modules_import_each_other_downwards_only():
    """No cycle between the server and its rooms (type-only imports count: the old
    ``TYPE_CHECKING`` import of the server's ``Namespace`` was one half of a cycle)."""
    bad = sidecar_layer_problems()
    assert not bad, "sidecar imports against SIDECAR_LAYERS:\n" + "\n".join(bad)


def test_the_layer_check_catches_an_upward_import(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    sidecar = tmp_path / "kvstore" / "sidecar"
    sidecar.mkdir(parents=True)
    (sidecar / "claims.py").write_text("from kvstore.sidecar.shm_plane import drop_staging\n")
    (sidecar / "shm_plane.py").write_text("from kvstore.sidecar.claims import Staging\n")
    (sidecar / "newroom.py").write_text("")
    bad = sidecar_layer_problems()
    assert any("claims" in b and "imports kvstore.sidecar.shm_plane" in b for b in bad), bad
    assert any("newroom is in no layer" in b for b in bad), bad
    assert not any(b.startswith("kvstore.sidecar.shm_plane ") for b in bad), bad


PRIVATE_REACH = ("server", "srv", "ctx", "context")


def test_no_sidecar_room_reaches_into_the_server_or_its_context():
    """Handlers use the Context's public surface; ``server._namespace(args)`` (the old back
    door), ``ctx._anything`` or ``ctx.loop._anything`` in a module other than server.py
    fails here."""
    found = []
    for path in sorted((ROOT / "kvstore" / "sidecar").glob("*.py")):
        if path.name == "server.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                root = node.value
                while isinstance(root, ast.Attribute):  # ctx.loop._queued reaches the server too
                    root = root.value
                if isinstance(root, ast.Name) and root.id in PRIVATE_REACH:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
            if isinstance(node, ast.arg) and node.arg == "server":
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: a parameter named server")
    assert not found, "the sidecar's rooms see the server through context.Context:\n" + "\n".join(found)


def test_importing_the_sidecar_client_loads_neither_the_server_nor_the_store_core():
    """What the FORBIDDEN rule is for, checked at run time in a fresh interpreter."""
    import subprocess
    code = ("import sys, clients.sidecar; print(sorted(m for m in ('kvstore.sidecar.server', "
            "'kvstore.store', 'kvstore.tiers', 'eviction') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip()
    assert out == "[]", f"importing clients.sidecar loaded {out}"


LAYOUT_MODULE = ROOT / "kvstore" / "layout.py"
HAND_DERIVED_LAYOUT = ("permute(2, 0, 1, 3, 4, 5)", "unflatten(2, (")


def test_only_the_layout_module_derives_block_rows():
    """KV as block rows is derived in ``kvstore/layout.py`` alone (``as_block_rows`` and
    ``from_block_rows``), so a new engine layout or codec is one change, not a hunt."""
    found = [f"{path.relative_to(ROOT)}:{n}: {needle}"
             for pkg in ("kvstore", "clients") for path in sorted((ROOT / pkg).rglob("*.py")) if path != LAYOUT_MODULE
             for n, line in enumerate(path.read_text().splitlines(), 1) for needle in HAND_DERIVED_LAYOUT if needle in line]
    assert not found, "use kvstore.layout.as_block_rows/from_block_rows:\n" + "\n".join(found)
