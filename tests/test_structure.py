"""The layering rules, read from the code (docs/ARCHITECTURE.md draws them):

    data -> engine -> pairs, bench (timings), testing (fixtures) -> training | worlds -> faces (cli, app)

1. a layer imports only from layers to its left (and from itself); training and worlds do not import each other;
2. the library (dfusion_core/) never imports the lab around it (recipes/, experiments/, benchmarks/) or the UI;
3. no import circle between modules, lazy (function-level) imports included;
4. the app's views (app/ui.py, app/views.py) reach the core only through app/service.py (the settings' config and
   schema, which the controls are made from, excepted);
5. no function longer than 80 lines.
Worlds reach the engine through registries (prompt_sets.register_prompt_source, scoring.register_scorer)."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORE = REPO / "dfusion_core"
LAYERS = {"data": 0, "engine": 1, "pairs": 2, "testing": 2, "training": 3, "worlds": 3, "bench": 2, "cli": 5}
SIBLINGS_APART = {("training", "worlds"), ("worlds", "training")}
LAB = ("recipes", "experiments", "benchmarks", "app", "gradio")


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


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "dfusion_core" and len(parts) > 1 and parts[1] in LAYERS else None


def _layer_breaks(files) -> list[str]:
    out = []
    for f in files:
        own = _layer("dfusion_core." + ".".join(f.relative_to(CORE).with_suffix("").parts))
        for line, name in _imports(f):
            other = _layer(name)
            lab = name.split(".")[0] in LAB
            if lab or (own and other and (LAYERS[other] > LAYERS[own] or (own, other) in SIBLINGS_APART)):
                out.append(f"{f.relative_to(REPO)}:{line} ({own}) imports {name}")
    return out


def _breaks(files, forbidden, allowed=()):
    out = []
    for f in files:
        for line, name in _imports(f):
            hit = any(name == p or name.startswith(p + ".") for p in forbidden)
            if hit and not any(name == a or name.startswith(a + ".") for a in allowed):
                out.append(f"{f.relative_to(REPO)}:{line} imports {name}")
    return out


def _module_graph(folders=("dfusion_core", "app", "recipes", "experiments")) -> dict[str, set[str]]:
    files = [p for d in folders for p in (REPO / d).rglob("*.py")]
    names = {}
    for p in files:
        parts = list(p.relative_to(REPO).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph = {}
    for mod, p in names.items():
        deps = set()
        for _, n in _imports(p):
            while n and n not in names:
                n = n.rpartition(".")[0]
            if n and n != mod and not mod.startswith(n + "."):  # a package's own __init__ is not a circle
                deps.add(n)
        graph[mod] = deps
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v), on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_each_layer_imports_only_the_layers_below_it():
    assert not (b := _layer_breaks(CORE.rglob("*.py"))), "\n".join(b)


def test_the_engine_imports_no_pairs_trainer_world_or_face():
    forbidden = ("gradio", "app", "dfusion_core.pairs", "dfusion_core.training", "dfusion_core.worlds",
                 "dfusion_core.cli", "dfusion_core.bench", "dfusion_core.testing")
    assert not (b := _breaks((CORE / "engine").rglob("*.py"), forbidden)), "\n".join(b)


def test_the_data_layer_imports_no_model_code():
    forbidden = ("dfusion_core.engine", "dfusion_core.pairs", "dfusion_core.training", "dfusion_core.worlds",
                 "diffusers", "transformers", "peft", "open_clip", "gradio", "app")
    assert not (b := _breaks((CORE / "data").rglob("*.py"), forbidden)), "\n".join(b)


def test_no_import_circle():
    assert not (c := _circles(_module_graph())), c


def test_the_app_views_go_through_the_service():
    files = [REPO / "app" / "ui.py", REPO / "app" / "views.py"]
    assert not (b := _breaks(files, ("dfusion_core", "torch"), allowed=("dfusion_core.engine.config", "dfusion_core.engine.schema"))), \
        "\n".join(b)


def test_no_function_over_80_lines():
    long = []
    for d in ("dfusion_core", "app", "recipes", "experiments"):
        for f in (REPO / d).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                    long.append(f"{f.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long, "\n".join(long)


def test_the_rules_can_fail():
    """The readers see relative imports in sub-packages, upward imports and circles."""
    names = {n for _, n in _imports(CORE / "worlds" / "shapesworld" / "evaluate.py")}
    assert "dfusion_core.engine.fusion" in names and "dfusion_core.worlds.shapesworld.checker" in names
    assert _layer_breaks([CORE / "cli" / "train.py"]) == []
    fake = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _circles(fake) == [["a", "b", "c"]]


def test_upward_imports_are_caught(tmp_path, monkeypatch):
    engine = tmp_path / "dfusion_core" / "engine"
    engine.mkdir(parents=True)
    (engine / "bad.py").write_text("from ..training.trainer import Trainer\nfrom ..config import x\n")
    monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)
    monkeypatch.setattr(__import__(__name__), "CORE", tmp_path / "dfusion_core")
    breaks = _layer_breaks([engine / "bad.py"])
    assert len(breaks) == 1 and "dfusion_core.training.trainer" in breaks[0]


def _module_exists(name: str) -> bool:
    parts = name.split(".")
    return REPO.joinpath(*parts).with_suffix(".py").is_file() or REPO.joinpath(*parts, "__init__.py").is_file()


def test_every_import_of_a_project_module_names_one_that_exists():
    """Lazy (function-level) imports run only when their branch does: a moved module must not leave one behind."""
    roots = ("dfusion_core", "app", "recipes", "experiments")
    missing = []
    for d in roots:
        for f in (REPO / d).rglob("*.py"):
            package = list(f.relative_to(REPO).parts[:-1])
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    base = package[: len(package) - node.level + 1] if node.level else []
                    mod = ".".join(base + ([node.module] if node.module else []))
                    # `from pkg import x`: x is a module or a name defined by pkg; the module pkg must exist
                    names = [mod] if node.module else [f"{mod}.{a.name}" if _module_exists(f"{mod}.{a.name}")
                                                       else mod for a in node.names]
                else:
                    continue
                missing += [f"{f.relative_to(REPO)}:{node.lineno} imports {n}" for n in names
                            if n.split(".")[0] in roots and not _module_exists(n)]
    assert not missing, "\n".join(missing)
