"""The package's import graph has no cycle: no lorakern module imports one that imports it back.

Every static import between lorakern's modules (at any depth in a module, function-level ones too) is
read from the source with ``ast``; a dependency cycle fails with its path. Then each module is imported
fresh (all lorakern modules dropped from sys.modules first) in one child process, so an order-dependent
import error shows up too. Imports by string (``importlib.import_module``), how lorakern.dispatch loads
the Triton kernels on demand, are not edges."""
import ast
import os
import subprocess
import sys

import lorakern

PACKAGE = os.path.dirname(lorakern.__file__)
KERNELS = os.path.join(os.path.dirname(PACKAGE), "kernels")


def _modules() -> dict[str, str]:
    found = {}
    for root, prefix in ((PACKAGE, "lorakern"), (KERNELS, "lorakern.kernels")):
        if not os.path.isdir(root):
            continue
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d not in ("__pycache__", "fixtures")]
            if root == PACKAGE and os.path.abspath(folder).startswith(os.path.join(PACKAGE, "kernels")):
                continue
            for file in files:
                if not file.endswith(".py"):
                    continue
                relative = os.path.relpath(os.path.join(folder, file), root)[:-3].replace(os.sep, ".")
                name = prefix if relative == "__init__" else f"{prefix}.{relative.removesuffix('.__init__')}"
                found[name] = os.path.join(folder, file)
    return found


def _edges(modules: dict[str, str]) -> dict[str, set[str]]:
    edges = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    edges[name].add(target)  # a package's __init__ imported on the way down is no cycle edge
    return edges


def test_no_import_cycle():
    modules = _modules()
    edges = _edges(modules)
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(modules):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_every_module_imports_fresh():
    names = sorted(n for n in _modules() if n != "lorakern.__main__"  # runs the CLI
                   and (not n.startswith("lorakern.kernels") or n == "lorakern.kernels"))
    script = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'lorakern' or m.startswith('lorakern.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError as exc:\n"
        "        if 'lorakern' in str(exc):\n"
        "            raise SystemExit(f'{name}: {exc}')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
