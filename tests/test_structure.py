"""The layering rules, read from the code (docs/ARCHITECTURE.md draws them):
1. the engine (dfusion_core/engine/) imports no app, gradio, training or world code;
2. the data layer (dfusion_core/data/) imports no engine, model or UI code: reading a pair needs no model;
3. the app's views (app/ui.py, app/views.py) reach the core only through app/service.py (config constants
   for widget choices excepted).
Worlds reach the engine through registries (prompt_sets.register_prompt_source, scoring.register_scorer)."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORE = REPO / "dfusion_core"


def _imports(path: Path):
    """(line, absolute module) for every import in a file, relative imports resolved."""
    package = list(path.relative_to(REPO).parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            for n in ([mod] if node.module else [f"{mod}.{a.name}" for a in node.names]):
                yield node.lineno, n


def _breaks(files, forbidden, allowed=()):
    out = []
    for f in files:
        for line, name in _imports(f):
            hit = any(name == p or name.startswith(p + ".") for p in forbidden)
            if hit and not any(name == a or name.startswith(a + ".") for a in allowed):
                out.append(f"{f.relative_to(REPO)}:{line} imports {name}")
    return out


def test_the_engine_imports_no_face_trainer_or_world():
    forbidden = ("gradio", "app", "dfusion_core.training", "dfusion_core.shapesworld", "dfusion_core.worlds",
                 "dfusion_core.cli")
    assert not (b := _breaks((CORE / "engine").rglob("*.py"), forbidden)), "\n".join(b)


def test_the_data_layer_imports_no_model_code():
    forbidden = ("dfusion_core.engine", "dfusion_core.training", "dfusion_core.shapesworld", "diffusers",
                 "transformers", "peft", "open_clip", "gradio", "app")
    assert not (b := _breaks((CORE / "data").rglob("*.py"), forbidden)), "\n".join(b)


def test_the_app_views_go_through_the_service():
    files = [REPO / "app" / "ui.py", REPO / "app" / "views.py"]
    assert not (b := _breaks(files, ("dfusion_core", "torch"), allowed=("dfusion_core.engine.config",))), \
        "\n".join(b)


def test_the_rule_reader_resolves_relative_imports_in_sub_packages():
    """So the rules can fail: the world's evidence harness imports the trainer as `from ..training...`."""
    names = {n for _, n in _imports(CORE / "shapesworld" / "experiment.py")}
    assert "dfusion_core.training.trainer" in names and "dfusion_core.engine.config" in names
    assert _breaks([CORE / "shapesworld" / "experiment.py"], ("dfusion_core.training",))
