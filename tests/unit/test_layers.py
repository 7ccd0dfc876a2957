"""The import layers of daemon/virtwatch (DEVELOPERS.md, "Layers"), read from the source with
ast: nothing is imported. Every import counts, function-local ones included.

A module may import from a lower layer, and from its own layer only inside its own unit (the
top-level package or module under virtwatch: ``virt``, ``policy``, ``state``...). A unit that
owns a section of the configuration (``config.py`` imports it) must not import ``config``
back. The edges that break a rule today are listed in ALLOWED, each with the move of issue 15
that removes it: the list can only shrink (an entry that no longer matches an import fails).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "daemon" / "virtwatch"

#: Lowest first. "pkg.*" is the package and everything under it; other names are exact. A
#: module belongs to its exact entry, else to its longest "pkg.*" entry.
LAYERS: list[tuple[str, list[str]]] = [
    ("base", ["virtwatch", "virtwatch.model", "virtwatch.infra.*"]),
    ("vocabulary", ["virtwatch.virt.decode"]),
    ("sections", ["virtwatch.agent.settings", "virtwatch.alerts.config", "virtwatch.console.settings",
                  "virtwatch.policy.config"]),
    ("config", ["virtwatch.config"]),
    ("libvirt", ["virtwatch.virt.*"]),
    ("state", ["virtwatch.state", "virtwatch.eventlog"]),
    ("features", ["virtwatch.agent.*", "virtwatch.alerts.*", "virtwatch.console.*", "virtwatch.demo",
                  "virtwatch.inventory", "virtwatch.logs"]),
    ("liveness", ["virtwatch.liveness.*"]),
    ("policy", ["virtwatch.policy.*"]),
    ("endpoints", ["virtwatch.metrics.*", "virtwatch.web.*", "virtwatch.control", "virtwatch.systemd"]),
    ("handover", ["virtwatch.handover"]),
    ("composition root", ["virtwatch.app"]),
    ("process shell", ["virtwatch.cli.*"]),
    ("entry point", ["virtwatch.__main__"]),
]

#: Today's exceptions, as (importer, imported). Remove an entry with the change that removes
#: the import; never add one.
ALLOWED: dict[tuple[str, str], str] = {
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The virtwatch modules ``name`` imports (``from pkg import mod`` names the module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names)
    return {m for m in found if m == "virtwatch" or m.startswith("virtwatch.")}


def _layer(module: str) -> int:
    exact = [i for i, (_, names) in enumerate(LAYERS) if module in names]
    if exact:
        return exact[0]
    wild = [(len(n), i) for i, (_, names) in enumerate(LAYERS) for n in names
            if n.endswith(".*") and (module == n[:-2] or module.startswith(n[:-1]))]
    assert wild, f"{module} is in no layer: place it in LAYERS (and in DEVELOPERS.md)"
    return max(wild)[1]


def _unit(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def _violations() -> dict[tuple[str, str], str]:
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    config_units = {_unit(m) for m in graph["virtwatch.config"]}
    out = {}
    for importer, targets in graph.items():
        for target in targets:
            low, high = _layer(target), _layer(importer)
            if low > high or (low == high and _unit(target) != _unit(importer)):
                out[importer, target] = f"{LAYERS[high][0]} imports {LAYERS[low][0]}"
            elif target == "virtwatch.config" and _unit(importer) in config_units:
                out[importer, target] = "config imports this unit's section: importing config back is a cycle"
    return out


def test_every_module_has_a_layer() -> None:
    for name in MODULES:
        _layer(name)


def test_imports_follow_the_layers() -> None:
    found = _violations()
    new = {edge: why for edge, why in found.items() if edge not in ALLOWED}
    assert not new, "imports against the layers (DEVELOPERS.md, 'Layers'):\n" + "\n".join(
        f"  {a} -> {b}: {why}" for (a, b), why in sorted(new.items()))
    gone = sorted(set(ALLOWED) - set(found))
    assert not gone, f"no longer needed: remove from ALLOWED in {__file__}: {gone}"
