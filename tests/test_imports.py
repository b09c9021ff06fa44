"""The import direction of DESIGN.md: eviction and allocator import nothing of ours,
kvstore imports only allocator and eviction, clients only kvstore (and what it brings)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kvstore", "allocator", "eviction", "clients")
ALLOWED = {
    "eviction": set(),
    "allocator": set(),
    "kvstore": {"allocator", "eviction"},
    "clients": {"kvstore", "allocator", "eviction"},
}


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update(n.split(".")[0] for n in names if n.split(".")[0] in PACKAGES)
    return found


def test_every_import_follows_the_design_direction():
    violations = []
    checked = 0
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            checked += 1
            bad = _imported_packages(path) - ALLOWED[pkg] - {pkg}
            if bad:
                violations.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert checked > 10
    assert not violations, "imports against DESIGN.md's direction:\n" + "\n".join(violations)


def test_the_checker_catches_a_violation(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("import kvstore.store\nfrom clients import connect\n")
    assert _imported_packages(f) == {"kvstore", "clients"}
