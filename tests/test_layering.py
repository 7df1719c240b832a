"""One direction of imports and twins by name: the import-linter contracts of pyproject.toml
hold, and the runtime and simulator registries name the same policies as the declarations."""
import subprocess
import sys
from pathlib import Path

from core.policies import SPECS
from runtime.kv import POLICIES
from simulator.policies import TWINS

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    cmd = [str(lint)] if lint.exists() else [sys.executable, "-m", "importlinter.cli"]
    r = subprocess.run([*cmd, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_registries_hold_the_same_policies():
    assert set(POLICIES) == set(TWINS) == set(SPECS) == {"full", "offload", "kivi", "specache", "rag"}
    for name, twin in TWINS.items():
        assert issubclass(twin, SPECS[name]) and twin.name == name      # a twin is its declaration + graphs


def test_twins_and_runtime_policies_live_in_files_of_their_name():
    for name in SPECS:
        assert (ROOT / "runtime" / "kv" / f"{name}.py").is_file()
        assert (ROOT / "simulator" / "policies" / f"{name}.py").is_file()
        assert (ROOT / "core" / "policies" / f"{name}.py").is_file()
        assert (ROOT / "conf" / "policy" / f"{name}.yaml").is_file()
        assert TWINS[name].__module__ == f"simulator.policies.{name}"
        assert POLICIES[name].__module__ == f"runtime.kv.{name}"
