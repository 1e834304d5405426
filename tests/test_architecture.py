"""Imports point one way: stream -> features -> learner -> serving -> infra; learner/models imports torch only."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("stream", "features", "learner", "serving", "infra")
MODELS_MAY_IMPORT = {"torch", "__future__", *sys.stdlib_module_names}
# Third-party packages that belong to one layer and must not appear upstream of it.
TRAINER = tuple(f"learner.{m}" for m in ("worker", "loop", "step", "feature_loop", "reporter", "intake", "replay_source"))
"""The trainer's modules: serving may use the models and snapshots, never these."""
OWNED = {"kafka": "stream", "feast": "features", "torch": "learner", "ray": "learner", "wandb": "learner"}


def _imports(source: str) -> list[tuple[int, str]]:
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found.append((node.lineno, "." * node.level + (node.module or "")))
    return found


def _modules(layer: str) -> list[Path]:
    return sorted((ROOT / layer).rglob("*.py"))


def _violations(path: Path, layer: str, source: str | None = None) -> list[str]:
    """Backward arrows in one module (``path`` relative to the repo root decides its layer rules)."""
    rank = LAYERS.index(layer)
    in_models = path.parts[:2] == ("learner", "models")
    bad = []
    for line, name in _imports(source if source is not None else (ROOT / path).read_text()):
        if name.startswith("."):
            if in_models and name.startswith(".."):
                bad.append(f"{path}:{line} relative import leaves learner/models: {name}")
            continue
        top = name.split(".")[0]
        if in_models and top not in MODELS_MAY_IMPORT and not name.startswith("learner.models"):
            bad.append(f"{path}:{line} learner/models imports {name} (torch only)")
        if top in LAYERS and LAYERS.index(top) > rank:
            bad.append(f"{path}:{line} {layer} imports downstream {name}")
        if top in OWNED and LAYERS.index(OWNED[top]) > rank:
            bad.append(f"{path}:{line} {layer} imports {top}, which belongs to {OWNED[top]}")
        if layer == "serving" and name.startswith(TRAINER):
            bad.append(f"{path}:{line} serving imports the trainer ({name})")
    return bad


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_point_one_way(layer: str) -> None:
    modules = _modules(layer)
    assert modules, f"no modules found in {layer}"
    bad = [v for path in modules for v in _violations(path.relative_to(ROOT), layer)]
    assert not bad, "\n".join(bad)


def test_checker_catches_a_backward_arrow() -> None:
    """The rule must be able to fail: a stream module importing learner is caught."""
    bad = _violations(Path("stream/probe.py"), "stream", "import learner.loop\nimport torch\n")
    assert any("downstream learner.loop" in b for b in bad)
    assert any("imports torch" in b for b in bad)


def test_checker_catches_models_importing_outside_torch() -> None:
    source = "import numpy\nfrom kafka import KafkaConsumer\nimport torch\n"
    bad = _violations(Path("learner/models/probe.py"), "learner", source)
    assert sum("torch only" in b for b in bad) == 2
