"""The project documents itself in docs/: code cites only documents that are in the repo."""

from __future__ import annotations

from pathlib import Path
import re

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kvstore", "allocator", "eviction", "clients", "tests")


def _sources():
    for pkg in PACKAGES:
        yield from (p for p in (ROOT / pkg).rglob("*.py") if p != Path(__file__).resolve())


def test_every_cited_document_is_in_the_repository():
    cited: dict[str, list[str]] = {}
    for path in _sources():
        for name in re.findall(r"\b((?:docs/)?[A-Za-z_]+\.md)\b", path.read_text()):
            cited.setdefault(name, []).append(str(path.relative_to(ROOT)))
    missing = {name: where for name, where in cited.items()
               if not (ROOT / name).is_file() and name != "README.md" or name == "DESIGN.md"}
    assert not missing, f"cited but not in the repository: {missing}"
    assert "docs/architecture.md" in cited and "docs/decisions.md" in cited


def test_the_architecture_names_every_room_the_import_test_knows():
    from tests.test_imports import ALLOWED, ROOMS
    text = (ROOT / "docs" / "architecture.md").read_text()
    for room in list(ALLOWED) + ROOMS:
        path = room.replace(".", "/") + "/"
        assert f"`{path}`" in text, f"docs/architecture.md does not describe the room {path}"


def test_the_architecture_names_every_core_module():
    """A new module of the store core (``kvstore.builder``, ``kvstore.port``, ...) says in
    docs/architecture.md what it is for."""
    from tests.test_imports import CORE
    text = (ROOT / "docs" / "architecture.md").read_text()
    unnamed = [m for m in sorted(CORE) if m != "kvstore" and f"`{m.rsplit('.', 1)[1]}`" not in text]
    assert not unnamed, f"docs/architecture.md does not name the core modules {unnamed}"
