"""The package's shape: each layer imports only the layers below it, and modules stay a readable size.

    base (config, errors, io, ...) < data < encoder < llm < tasks < serve < bench < cli

A helper that several layers use lives below all of them. Imports inside functions count too: a lazy import
up the layers is still an import up the layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "userllm"
LAYERS = ["base", "data", "encoder", "llm", "tasks", "serve", "bench", "cli"]
BASE = {"config", "errors", "io", "progress", "precision", "memory", "distributed", "metrics", "schedule", "resources"}
MAX_LINES = 400


def layer(module: str) -> str:
    """The layer of ``userllm.X...``: its subpackage, or ``base`` for the top-level helper modules."""
    parts = module.split(".")
    if len(parts) == 1:  # `import userllm`: the package root, which imports nothing eagerly
        return "base"
    top = parts[1]
    if top in BASE:
        return "base"
    if top not in LAYERS:
        raise AssertionError(f"userllm.{top} belongs to no layer: add it to LAYERS or BASE in {__file__}")
    return top


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out.append((name, path))
    return out


def userllm_imports(path: Path, name: str) -> list[tuple[int, str]]:
    """(line, imported module) of every import of a userllm module in the file, relative ones resolved."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "userllm"]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from the module's package
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                module = ".".join(package[: len(package) - node.level + 1] + ([module] if module else []))
            if module.split(".")[0] == "userllm":
                found.append((node.lineno, module))
    return found


def test_no_module_imports_one_from_a_layer_above_it():
    upward = []
    for name, path in modules():
        if name == "userllm":
            continue  # the root re-exports the public API lazily (checked below)
        mine = LAYERS.index(layer(name))
        for line, imported in userllm_imports(path, name):
            if LAYERS.index(layer(imported)) > mine:
                upward.append(
                    f"{path.relative_to(SRC.parent)}:{line} ({layer(name)}) imports {imported} ({layer(imported)})"
                )
    assert not upward, "imports up the layers:\n" + "\n".join(upward)


def test_the_package_root_imports_nothing_eagerly():
    """``import userllm`` stays light: the public names are imported on first use (``__getattr__``)."""
    tree = ast.parse((SRC / "__init__.py").read_text())
    eager = [n for n in tree.body if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("userllm")]
    assert not eager


def test_the_public_api_names_resolve():
    import userllm

    for name in userllm.__all__:
        assert getattr(userllm, name) is not None
    with pytest.raises(AttributeError):
        userllm.no_such_name  # noqa: B018


@pytest.mark.parametrize("name,path", modules(), ids=[n for n, _ in modules()])
def test_modules_stay_under_the_line_limit(name, path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(SRC.parent)}: {lines} lines (at most {MAX_LINES}): split it"


def test_the_layer_check_sees_an_import_up_the_layers(tmp_path):
    """The check itself: an encoder module importing the tasks layer is reported."""
    bad = tmp_path / "model.py"
    bad.write_text("def f():\n    from userllm.tasks.pipeline import load\n")
    imported = userllm_imports(bad, "userllm.encoder.model")
    assert imported == [(2, "userllm.tasks.pipeline")]
    assert LAYERS.index(layer(imported[0][1])) > LAYERS.index(layer("userllm.encoder.model"))
