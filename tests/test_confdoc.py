"""docs/configuration.md is generated (`python -m core.confdoc`) and must match the declarations:
the committed page is current, a newly declared policy shows up with its knobs, every schema key
of core/config.py is on the page."""
import dataclasses
import inspect
import re
import subprocess
import sys
from pathlib import Path

from core import config, confdoc
from core.policies import SPECS, PolicyConfig, declare

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    return subprocess.run([sys.executable, "-m", "core.confdoc", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_committed_page_is_current():
    # a fresh process: SPECS holds the shipped declarations only (no test's extra policy)
    r = _run("--check")
    assert r.returncode == 0, r.stderr + "\nrun `python -m core.confdoc` and commit docs/configuration.md"


def test_check_reports_a_stale_page_and_write_errors_in_one_line(tmp_path):
    page = tmp_path / "configuration.md"
    assert _run("--out", str(page)).returncode == 0
    assert _run("--check", "--out", str(page)).returncode == 0
    page.write_text(page.read_text() + "hand edit\n")
    r = _run("--check", "--out", str(page))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "stale" in r.stderr
    r = _run("--out", str(tmp_path / "no_such_dir" / "configuration.md"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "cannot write" in r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["configuration.md"]     # no temp file left behind


def test_a_newly_declared_policy_appears_with_its_knobs():
    @declare
    @dataclasses.dataclass
    class ThrowawayPolicyConfig(PolicyConfig):
        """A policy declared only by this test."""
        name: str = "throwaway_confdoc"
        zeta_knob: int = 17             # zeta rows kept per head for the test
        # a comment block above a knob is its meaning too
        eta_ratio: float = 0.25

    try:
        text = confdoc.render()
    finally:                                    # SPECS is a registry by discovery: drop the entry itself
        getattr(SPECS, "_entries", SPECS).pop("throwaway_confdoc")
    assert "### `policy=throwaway_confdoc`" in text
    assert "A policy declared only by this test." in text
    assert "| `zeta_knob` | `17` | zeta rows kept per head for the test |" in text
    assert "| `eta_ratio` | `0.25` | a comment block above a knob is its meaning too |" in text
    assert "throwaway_confdoc" not in confdoc.render()


def test_every_key_of_every_schema_in_core_config_is_on_the_page():
    text = (ROOT / "docs" / "configuration.md").read_text()
    schemas = [c for _, c in inspect.getmembers(config, inspect.isclass)
               if dataclasses.is_dataclass(c) and c.__module__ == config.__name__]
    assert len(schemas) >= 8
    for cls in schemas:
        for row in confdoc.rows_of(cls):          # nested schemas (LinkConfig, SloConfig) as dotted keys
            assert re.search(rf"\| `(\w+\.)*{re.escape(row.key)}` \|", text), (cls.__name__, row.key)
    for name in SPECS:                          # and every declared policy's knobs
        for f in dataclasses.fields(SPECS[name]):
            assert f"| `{f.name}` |" in text.split(f"### `policy={name}`")[1].split("###")[0], (name, f.name)


def test_comments_pair_with_their_fields():
    rows = {r.key: r for r in confdoc.rows_of(config.HardwareConfig)}
    assert rows["link.gbps"].meaning.startswith("null = no emulation")
    assert rows["profile"].meaning.endswith("the committed CPU profile (hardware=cpu|auto)")   # wrapped comment
    assert rows["device"].default == "auto" and rows["threads"].default is None
    assert "critical-path attribution" in {r.key: r for r in confdoc.rows_of(config.RunConfig)}["phases"].meaning
