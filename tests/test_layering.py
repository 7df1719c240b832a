"""One direction of imports and twins by name: the import-linter contracts of pyproject.toml
hold, the runtime and simulator registries name the same policies as the declarations and as
conf/policy/*.yaml, and no source file outside tests holds a hand-written list of them (a policy
is found by its name: core/policies/registry.py)."""
import ast
import subprocess
import sys
from pathlib import Path

from core.policies import SPECS
from runtime.kv import POLICIES
from simulator.policies import TWINS

ROOT = Path(__file__).resolve().parents[1]
NAMES = {p.stem for p in (ROOT / "conf" / "policy").glob("*.yaml")}     # the in-tree policies
SOURCE = ("core", "runtime", "simulator", "analysis", "benchmarks")


def test_import_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    cmd = [str(lint)] if lint.exists() else [sys.executable, "-m", "importlinter.cli"]
    r = subprocess.run([*cmd, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_registries_hold_the_same_policies():
    assert len(NAMES) >= 5
    assert set(POLICIES) == set(TWINS) == set(SPECS) == NAMES
    for name, twin in TWINS.items():
        assert issubclass(twin, SPECS[name]) and twin.name == name      # a twin is its declaration + graphs
        assert POLICIES[name].declaration is SPECS[name]                 # a runtime cache names its declaration


def test_twins_and_runtime_policies_live_in_files_of_their_name():
    for name in NAMES:
        assert (ROOT / "runtime" / "kv" / f"{name}.py").is_file()
        assert (ROOT / "simulator" / "policies" / f"{name}.py").is_file()
        assert (ROOT / "core" / "policies" / f"{name}.py").is_file()
        assert TWINS[name].__module__ == f"simulator.policies.{name}"
        assert POLICIES[name].__module__ == f"runtime.kv.{name}"
        assert SPECS[name].__module__ == f"core.policies.{name}"


def _name_lists(tree: ast.AST):
    """(line, names) of every literal list / tuple / set / dict and `from x import ...` in a module."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.List, ast.Tuple, ast.Set, ast.Dict)):
            items = node.keys if isinstance(node, ast.Dict) else node.elts
            yield node.lineno, {i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)}
        elif isinstance(node, ast.ImportFrom):
            yield node.lineno, {a.name for a in node.names}


def test_no_source_file_lists_every_policy():
    """Adding a policy in tree takes its four files and nothing else: a list naming them all
    (a registry dict, an import of every module) would have to be edited too."""
    found = []
    for top in SOURCE:
        for path in sorted((ROOT / top).rglob("*.py")):
            for line, names in _name_lists(ast.parse(path.read_text(), str(path))):
                if NAMES <= names:
                    found.append(f"{path.relative_to(ROOT)}:{line}")
    assert not found, f"hand-written lists of every policy name (look them up by name instead): {found}"
