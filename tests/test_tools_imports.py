"""Imports run one way between the parts (docs/architecture.md): tools -> the plugin ->
kernels, and inside tools/ the shared folders (data/, evaluation/) and the allocators
import none of the pipeline that uses them. Read from the source, every import in a
file (module level and inside functions)."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = "vllm_neuronmlp.tools"


def absolute_imports(path):
    """Every module a file imports, as an absolute dotted name (relative imports are not used here)."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def files(folder):
    for base, dirs, names in os.walk(os.path.join(ROOT, folder)):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        yield from (os.path.join(base, n) for n in names if n.endswith(".py"))


def test_the_plugin_never_imports_the_tool():
    for path in files("vllm_neuronmlp"):
        bad = sorted(m for m in absolute_imports(path) if m.startswith(TOOLS))
        assert not bad, f"{path} imports {bad}"


@pytest.mark.parametrize("folder, allowed", [
    ("tools/data", ("data", "errors", "writer")),  # the default model is written atomically like a checkpoint
    ("tools/evaluation", ("data", "evaluation", "errors", "progress")),
    ("tools/allocation", ("allocation",)),
])
def test_shared_tool_folders_import_none_of_the_pipeline(folder, allowed):
    for path in files(folder):
        used = {m[len(TOOLS) + 1:].split(".")[0] for m in absolute_imports(path) if m.startswith(TOOLS + ".")}
        assert used <= set(allowed), f"{path} imports tools.{sorted(used - set(allowed))}"


def test_only_the_command_line_and_the_demo_import_the_commands():
    for path in files("tools"):
        rel = os.path.relpath(path, ROOT)
        if rel.startswith("tools/cli/") or rel == "tools/demo.py":
            continue
        bad = sorted(m for m in absolute_imports(path) if m.startswith(TOOLS + ".cli"))
        assert not bad, f"{rel} imports {bad}"
