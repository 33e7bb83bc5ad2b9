"""The import graph of kernels/, read from the source (module-level and function-level
imports alike): it has no cycle, and its layers point one way --

    launch -> blocking (the selector) -> xuv, mlp, baselines (the kernels) -> strip_plan
    everything -> nki_compat -> sim/ (the emulator), which imports nothing outside sim/

-- and nothing in kernels/ imports the plugin or the tool."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(ROOT, "kernels")
INSTALLED = "vllm_neuronmlp.kernels"     # setup.py maps kernels/ to this name


def modules(root=KERNELS):
    """{dotted name under `kernels`: path} of every module and package in kernels/."""
    out = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), os.path.dirname(root))[:-3]
                name = rel.replace(os.sep, ".")
                out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = \
                    os.path.join(folder, f)
    return out


def imports(name, path, known):
    """[(imported module, line, scope)] of one module: every `import` / `from ... import`
    anywhere in it (scope "module", or "function" inside a function body); an imported
    name that is itself a module counts as that module, anything else as the module it
    comes from. `vllm_neuronmlp.kernels...` is read as `kernels...`; other names outside
    kernels/ are kept as written."""
    tree = ast.parse(open(path).read(), path)
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    found = []

    def local(target):
        return "kernels" + target[len(INSTALLED):] if target.startswith(INSTALLED) else target

    def visit(node, scope):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((local(a.name), child.lineno, scope) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.rsplit(".", child.level - 1)[0] if child.level > 1 else package
                    base += "." + child.module if child.module else ""
                else:
                    base = local(child.module)
                for a in child.names:
                    whole = base + "." + a.name
                    found.append((whole if whole in known else base, child.lineno, scope))
            inner = "function" if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                     ast.Lambda)) else scope
            visit(child, inner)

    visit(tree, "module")
    return found


def graph():
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}, known


def find_cycle(edges):
    """One cycle of the directed graph {node: {node, ...}} as a list of nodes, or None."""
    state, stack = {}, []

    def dfs(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                cycle = dfs(m)
                if cycle:
                    return cycle
        stack.pop()
        state[n] = "done"
        return None

    for n in sorted(edges):
        if n not in state:
            cycle = dfs(n)
            if cycle:
                return cycle
    return None


def internal_edges():
    g, known = graph()
    return {a: {t for t, _, _ in found if t in known and t != a} for a, found in g.items()}


def test_cycle_finder_finds_cycles_through_any_number_of_modules():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"y"}}) == ["y", "y"]


def test_the_graph_sees_function_level_and_package_imports():
    """The reader is not blind to lazy imports: nki_compat imports the emulator inside
    `Kernel.__call__`, and `from . import sim` is an import of the sim package."""
    g, _ = graph()
    assert ("kernels.sim.nki_api", "function") in {(t, scope) for t, _, scope in g["kernels.nki_compat"]}
    assert any(t == "kernels.sim" for t, _, _ in g["kernels.blocking"])
    assert {"kernels.strip_plan", "kernels.nki_compat"} <= {t for t, _, _ in g["kernels.xuv"]}


def test_kernels_import_graph_is_acyclic():
    cycle = find_cycle(internal_edges())
    assert cycle is None, "import cycle in kernels/: " + " -> ".join(cycle)


def test_layers_point_one_way():
    edges = internal_edges()
    kernels = ("kernels.xuv", "kernels.mlp", "kernels.baselines")
    assert {"kernels.xuv", "kernels.mlp"} <= edges["kernels.blocking"]      # selector -> kernels
    for k in kernels:
        assert "kernels.strip_plan" in edges[k]                            # kernels -> plan
        assert not edges[k] & {"kernels.blocking", "kernels.launch"}, k
    assert not {e for e in edges["kernels.strip_plan"] if not e.startswith("kernels.sim")}
    assert "kernels.blocking" in edges["kernels.launch"]
    assert not any("kernels.launch" in targets for targets in edges.values())


@pytest.mark.parametrize("name", sorted(n for n in modules() if n.startswith("kernels.sim")))
def test_the_emulator_imports_nothing_outside_itself(name):
    g, known = graph()
    outside = [(t, line) for t, line, _ in g[name]
               if t.startswith("kernels") and not t.startswith("kernels.sim")]
    assert not outside, f"{name} imports {outside}"


def test_kernels_import_neither_the_plugin_nor_the_tool():
    """Nor torch or vLLM at module level (kernels/launch.py imports torch inside its
    device functions only)."""
    g, _ = graph()
    for name, found in g.items():
        for target, line, scope in found:
            top = target.split(".")[0]
            assert top not in ("tools", "vllm_neuronmlp"), f"{name}:{line} imports {target}"
            assert scope == "function" or top not in ("torch", "vllm"), \
                f"{name}:{line} imports {target} at module level"
