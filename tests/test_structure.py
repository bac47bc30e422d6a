"""The layering rule, read from the code: the engine (every module of dfusion_core/ except the faces and the
plug-ins: cli.py, __main__.py, training/, shapesworld/) imports no app, gradio, training or world code.
Worlds reach the engine through registries (prompt_sets.register_prompt_source, scoring.register_scorer)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "dfusion_core"
OUTSIDE_ENGINE = {"training", "shapesworld", "worlds", "faces"}
FORBIDDEN = ("gradio", "app", "dfusion_core.training", "dfusion_core.shapesworld", "dfusion_core.worlds")


def _engine_files():
    for f in ROOT.rglob("*.py"):
        rel = f.relative_to(ROOT)
        if f.name in ("cli.py", "__main__.py") or (len(rel.parts) > 1 and rel.parts[0] in OUTSIDE_ENGINE):
            continue
        yield f


def _imports(path: Path):
    package = ["dfusion_core"] + list(path.relative_to(ROOT).parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            names = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
            for n in names:
                yield node.lineno, n


def test_the_engine_imports_no_face_trainer_or_world():
    breaks = [f"{f.relative_to(ROOT.parent)}:{line} imports {name}" for f in _engine_files()
              for line, name in _imports(f) if any(name == p or name.startswith(p + ".") for p in FORBIDDEN)]
    assert not breaks, "\n".join(breaks)


def test_the_rule_reader_resolves_relative_imports_in_sub_packages():
    """So the rule can fail: the world's evidence harness imports the trainer as `from ..training...`."""
    names = {n for _, n in _imports(ROOT / "shapesworld" / "experiment.py")}
    assert "dfusion_core.training.trainer" in names and "dfusion_core.config" in names
    assert ROOT / "shapesworld" / "experiment.py" not in set(_engine_files())
