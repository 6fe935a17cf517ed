"""The package's layers: no module imports a layer above its own (lazy imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import softprompt

# Lowest first; a module may import its own layer and those before it.
LAYERS = ("options", "models", "core", "data", "fastpath", "evaluation", "inference", "training",
          "server", "bench", "cli")
PACKAGE = Path(softprompt.__file__).parent


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "softprompt" or len(parts) == 1:
        return None  # outside the package, or its root (which only re-exports core lazily)
    name = "cli" if parts[1] == "__main__" else parts[1]
    return LAYERS.index(name)


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return names


def test_every_subpackage_has_a_layer():
    tops = {path.stem if path.is_file() else path.name for path in PACKAGE.iterdir()}
    tops -= {"__init__", "__pycache__", "__main__", "py"}
    assert tops <= set(LAYERS), tops - set(LAYERS)


def test_no_module_imports_a_higher_layer():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        own = _layer(module.removesuffix(".__init__"))
        for name in _imports(path):
            target = _layer(name)
            if own is not None and target is not None and target > own:
                upward.append(f"{module} ({LAYERS[own]}) imports {name} ({LAYERS[target]})")
    assert not upward, "\n".join(upward)
