"""The import direction of docs/architecture.md, room by room.

Rooms (a module belongs to the deepest listed package that contains it):

- ``eviction`` and ``allocator`` import nothing of ours;
- the store core (``kvstore`` top-level modules) imports ``allocator``, ``eviction`` and
  ``kvstore.restore``; ``kvstore.restore`` sits beside it and imports the core; inside the
  core, ``kvstore.builder`` (building tiers) and ``kvstore.port`` (the lease/staging protocol
  for another process) sit below ``kvstore.store`` and never import it (``FORBIDDEN_MODULES``);
- ``kvstore.models`` imports only the core's ``layout`` and ``errors``;
- ``kvstore.sidecar`` sits above the store: core, restore, allocator, eviction;
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
}
#: back doors inside the core: the store assembles itself with ``kvstore.builder`` and offers
#: ``kvstore.port`` to other processes; both sit below ``kvstore.store`` and never import it
#: (the port reaches its store through the ``PortedStore`` protocol it is handed)
FORBIDDEN_MODULES: dict[str, set[str]] = {
    "kvstore.builder": {"kvstore.store", "kvstore.port"},
    "kvstore.port": {"kvstore.store", "kvstore.builder"},
}
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
        "clients/remote.py": "from kvstore.bench.report import Report\n",               # clients -> bench
        "eviction/lru.py": "import importlib\nimportlib.import_module('kvstore.store')\n",
        "clients/embedded.py": "from kvstore.sidecar.server import host_id\n",          # clients -> server
        "clients/base.py": "from kvstore.sidecar import server\n",
        "kvstore/bench/vllm.py": "from kvstore.integrations.vllm import KVStoreConnector\n",   # into integrations
        "kvstore/integrations/vllm.py": "from kvstore.cli import main\n",                    # integrations -> cli
        "kvstore/port.py": "from kvstore.store import KVStore\n",                        # port -> the store above it
        "kvstore/builder.py": "from kvstore import store\n",                           # builder -> the store above it
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
        "clients/remote.py": "from kvstore.sidecar.protocol import pack\n",
        "kvstore/integrations/vllm.py": "from clients import connect\nfrom kvstore.restore.planner import plan_restore\n",
    }
    for rel, text in fine.items():
        p = _write(tmp_path, rel, text)
        assert not violations_in([p]), f"{rel}: {text!r} should be allowed"


def test_importing_the_sidecar_client_loads_neither_the_server_nor_the_store_core():
    """What the FORBIDDEN rule is for, checked at run time in a fresh interpreter."""
    import subprocess
    code = ("import sys, clients.remote; print(sorted(m for m in ('kvstore.sidecar.server', "
            "'kvstore.store', 'kvstore.tiers', 'eviction') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip()
    assert out == "[]", f"importing clients.remote loaded {out}"


LAYOUT_MODULE = ROOT / "kvstore" / "layout.py"
HAND_DERIVED_LAYOUT = ("permute(2, 0, 1, 3, 4, 5)", "unflatten(2, (")


def test_only_the_layout_module_derives_block_rows():
    """KV as block rows is derived in ``kvstore/layout.py`` alone (``as_block_rows`` and
    ``from_block_rows``), so a new engine layout or codec is one change, not a hunt."""
    found = [f"{path.relative_to(ROOT)}:{n}: {needle}"
             for pkg in ("kvstore", "clients") for path in sorted((ROOT / pkg).rglob("*.py")) if path != LAYOUT_MODULE
             for n, line in enumerate(path.read_text().splitlines(), 1) for needle in HAND_DERIVED_LAYOUT if needle in line]
    assert not found, "use kvstore.layout.as_block_rows/from_block_rows:\n" + "\n".join(found)
