"""Import layering: no import circles in the package, and no hidden dependencies inside functions.

The graph is read from the source (every `import` statement, at module top or inside a function),
so a circle that only closes at run time is found too.
"""
import ast
import importlib
import multiprocessing
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
# heavy or optional dependencies that a module may import where it needs them (with a comment saying so)
LOCAL_OK = ("nvidia", "open_clip", "triton", "tensorboard", "matplotlib", "timm", "sklearn", "safetensors",
            "torch.utils.tensorboard", "hello_fast.kernels", "hello_fast._C")
# modules that defer imports on purpose: the command line answers --help and one-line errors without
# importing torch (about 2 s), the package's __init__ exposes its API lazily for the same reason, and the
# extension loader must import torch before the compiled module (which links against torch's libraries)
DEFERRING = {"hello_fast/cli.py", "hello_fast/__init__.py", "hello_fast/_extension.py"}


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for base, prefix in ((ROOT / "hello_fast", ["hello_fast"]), (ROOT / "kernels", ["hello_fast", "kernels"])):
        for path in base.rglob("*.py"):
            parts = prefix + list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _imports(path: pathlib.Path):
    """(imported name, line, inside a function?) of every import statement in a file."""
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                out.extend((f"{child.module}.{a.name}", child.lineno, in_function) for a in child.names)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(ast.parse(path.read_text()), False)
    return out


def _graph():
    mods = _modules()
    edges = {m: set() for m in mods}
    for m, path in mods.items():
        for name, _, _ in _imports(path):
            while name and name not in mods:
                name = name.rpartition(".")[0]
            if name and name != m and name != "hello_fast":  # `from hello_fast import _C` is the extension
                edges[m].add(name)
                parent = name.rpartition(".")[0]  # importing a.b.c runs the packages a.b's __init__ first
                while parent not in ("", "hello_fast") and parent != m and not m.startswith(parent + "."):
                    if parent in mods:
                        edges[m].add(parent)
                    parent = parent.rpartition(".")[0]
    return edges


def test_the_package_has_no_import_circles():
    edges = _graph()
    state, path, circles = {}, [], []

    def walk(m):
        state[m] = "open"
        path.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == "open":
                circles.append(" -> ".join(path[path.index(n):] + [n]))
            elif n not in state:
                walk(n)
        path.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            walk(m)
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_graph_reader_sees_a_circle(tmp_path, monkeypatch):
    """The check above can fail: two modules importing each other (one inside a function) are a circle."""
    pkg = tmp_path / "hello_fast"
    pkg.mkdir()
    (pkg / "a.py").write_text("from hello_fast import b\n")
    (pkg / "b.py").write_text("def f():\n    from hello_fast.a import x\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "kernels").mkdir()
    edges = _graph()
    assert edges["hello_fast.a"] == {"hello_fast.b"} and edges["hello_fast.b"] == {"hello_fast.a"}


def test_imports_inside_functions_are_only_heavy_optional_dependencies():
    hidden = []
    for m, path in sorted(_modules().items()):
        for name, line, in_function in _imports(path):
            if in_function and not name.startswith(LOCAL_OK) and str(path.relative_to(ROOT)) not in DEFERRING:
                hidden.append(f"{path.relative_to(ROOT)}:{line} imports {name} inside a function")
    assert not hidden, "\n".join(hidden)


def _import_alone(name, queue):
    try:
        importlib.import_module(name)
        queue.put((name, None))
    except Exception as e:  # noqa: BLE001 (reported by the test)
        queue.put((name, f"{type(e).__name__}: {e}"))


def test_every_module_imports_first():
    """Each module imported first in a fresh process (forked before any hello_fast import): an import
    circle that only shows for one import order fails here."""
    ctx = multiprocessing.get_context("fork")
    failures = []
    for name in sorted(m for m in _modules() if not m.startswith("hello_fast.kernels") and m != "hello_fast.__main__"):
        queue = ctx.Queue()
        p = ctx.Process(target=_import_alone, args=(name, queue))
        p.start()
        p.join(120)
        _, error = queue.get(timeout=5) if p.exitcode == 0 else (name, f"exit code {p.exitcode}")
        if error:
            failures.append(f"{name}: {error}")
    assert not failures, "\n".join(failures)
