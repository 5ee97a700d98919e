"""The code's one direction of dependence: library <- modes <- main.py (README, "Layout").

Read from the source with `ast` (every import, function-level ones too), so these tests need no
JAX and fail on the line that breaks the rule.
"""

import ast
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "idm_jax")

# The modes: what main.py's --mode (and `python -m idm_jax.publish`) runs. Everything else in
# idm_jax/ is the library, which never imports a mode.
MODES = {"idm_jax.runner", "idm_jax.evaluate_set", "idm_jax.baselines", "idm_jax.export",
         "idm_jax.continual", "idm_jax.consistency", "idm_jax.sweeps", "idm_jax.table1",
         "idm_jax.publish"}


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO)[:-len(".py")].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _sources() -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                out[_module_name(os.path.join(root, f))] = os.path.join(root, f)
    return out


SOURCES = _sources()


def _imports(path: str) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names taken from it) for every import statement in the file."""
    tree = ast.parse(open(path).read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                # `from idm_jax import data` takes a module; `from idm_jax.x import f` a name.
                found.append((node.lineno, sub, []) if sub in SOURCES else (node.lineno, node.module, [a.name]))
    return found


def _idm_edges(module: str) -> list[tuple[int, str]]:
    return [(line, target) for line, target, _ in _imports(SOURCES[module]) if target in SOURCES]


def test_the_layers_are_what_the_readme_says():
    assert MODES <= set(SOURCES), sorted(MODES - set(SOURCES))
    readme = open(os.path.join(REPO, "README.md")).read()
    for mode in MODES:
        assert f"{mode.split('.')[-1]}.py" in readme, f"README's layout does not name {mode}"


def test_the_library_never_imports_a_mode_main_or_configs():
    wrong = []
    for module, path in SOURCES.items():
        if module in MODES:
            continue
        for line, target, _ in _imports(path):
            if target in MODES or target.split(".")[0] in ("configs", "main", "benchmarks", "tests"):
                wrong.append(f"{os.path.relpath(path, REPO)}:{line} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_modes_never_import_configs_or_main():
    wrong = [f"{m}:{line} imports {t}" for m in MODES for line, t, _ in _imports(SOURCES[m])
             if t.split(".")[0] in ("configs", "main")]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles_counting_function_level_imports():
    graph = {m: sorted({t for _, t in _idm_edges(m) if t != m}) for m in SOURCES if m != "idm_jax"}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in graph.get(node, []):
            if nxt.startswith(node + "."):
                continue  # a package's __init__ importing its own modules is not a cycle
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_no_underscore_name_is_imported_across_modules():
    wrong = []
    for module, path in {**SOURCES, "main": os.path.join(REPO, "main.py")}.items():
        tree = ast.parse(open(path).read(), path)
        aliases = {}  # local name -> idm_jax module
        for line, target, names in _imports(path):
            wrong += [f"{module}:{line} imports {target}.{n}" for n in names
                      if n.startswith("_") and not n.startswith("__") and target.startswith("idm_jax")]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    if f"{node.module}.{a.name}" in SOURCES:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in SOURCES and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                wrong.append(f"{module}:{node.lineno} reaches {aliases[node.value.id]}.{node.attr}")
    assert not wrong, "\n".join(wrong)


def test_no_module_getattr_aliases_below_the_package_face():
    shims = [m for m, path in SOURCES.items() if m != "idm_jax"
             and any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__"
                     for n in ast.parse(open(path).read()).body)]
    assert not shims, shims


@pytest.mark.parametrize("config", ["configs/cifar10.py", "configs/quick.py", "configs/imagenet_subset.py"])
def test_configs_build_without_jax(config):
    """A config is data: building one imports neither JAX, flax nor optax."""
    module = config[:-3].replace("/", ".")
    code = (f"import sys; import {module} as m; c = m.get_config(''); "
            "heavy = sorted(n for n in ('jax', 'flax', 'optax', 'orbax') if n in sys.modules); "
            "print(c.ipc, heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[1:] == ["[]"], out.stdout
