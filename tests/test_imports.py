"""The import direction of STYLE.md: service -> model/protocol, consumers -> model/protocol;
model imports no transport; service and consumers never import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "model": {"consumers", "service", "protocol", "freshrec", "kafka", "redis", "fastapi",
              "prometheus_client", "os"},
    "protocol": {"consumers", "service", "freshrec", "fastapi"},
    "consumers": {"service", "freshrec", "fastapi"},
    "service": {"consumers", "freshrec"},
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction(package: str) -> None:
    bad = {}
    for path in (ROOT / package).rglob("*.py"):
        hit = imports_of(path) & FORBIDDEN[package]
        if hit:
            bad[str(path.relative_to(ROOT))] = sorted(hit)
    assert not bad, f"{package}/ must not import {bad}"


def test_model_neither_prints_nor_pickles() -> None:
    for path in list((ROOT / "model").rglob("*.py")) + list((ROOT / "protocol").rglob("*.py")) + \
            list((ROOT / "service").rglob("*.py")) + list((ROOT / "consumers").rglob("*.py")):
        text = path.read_text()
        assert "pickle" not in imports_of(path), path
        assert "torch.load(" not in text, path
    for path in (ROOT / "model").rglob("*.py"):
        assert "print(" not in path.read_text(), path
