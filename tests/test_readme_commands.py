"""Every command README.md and docs/**/*.md show is composed or dry-run, so a documented command cannot
stop parsing; every relative link in them points to a file of the repository.

Commands come from the ```bash blocks and from inline `python -m ...` / `python benchmarks/...`
/ `jupyter ...` / `pip ...` spans. Nothing runs:
- Hydra entry points (runtime.bench, runtime.serve, simulator.run): `core.cli.check_command_line`, the
  check `main` makes before Hydra runs (every point of a multirun composed, the launcher checked);
- analysis.validate / analysis.sweep: their own `compose_config` of the overrides;
- argparse commands (runtime.*, benchmarks/*.py): `main(argv)` with argparse stopped right after it
  parsed the arguments (a parse error is argparse's exit 2);
- `jupyter nbconvert`: the executable is there (`.[dev]`); `pip install -e ".[x]"`: the extra exists.
A command that needs an optional plugin that is not installed (joblib, Optuna, submitit) is parsed
but its composition is skipped, saying which plugin.
"""
from __future__ import annotations

import argparse
import importlib
import re
import runpy
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("**/*.md"))]
HYDRA = {"runtime.bench": "bench", "runtime.serve": "serve", "simulator.run": "simulate"}
COMPOSED = {"analysis.validate": "validate", "analysis.sweep": "sweep"}
PLUGINS = {"joblib": "hydra_plugins.hydra_joblib_launcher", "optuna": "hydra_plugins.hydra_optuna_sweeper",
           "submitit": "hydra_plugins.hydra_submitit_launcher", "ray": "hydra_plugins.hydra_ray_launcher"}
NOT_CHECKED = ("python -m pytest", "lint-imports", "ray start", "ray stop", "pip wheel")


def readme_commands(text: str | None = None) -> list[tuple[int, str]]:
    """(line, command) of every command the README shows."""
    text = README.read_text() if text is None else text
    lines = text.splitlines()
    out: list[tuple[int, str]] = []
    fence, lang, pending, start = False, "", "", 0
    for i, line in enumerate(lines, 1):
        if line.startswith("```"):
            fence, lang = (not fence), line[3:].strip()
            continue
        if fence and lang in ("bash", "sh", "shell"):
            body = re.sub(r"(^|\s)#\s.*$", "", line).rstrip()     # a trailing comment
            if not pending:
                start = i
            if body.endswith("\\"):
                pending += body[:-1] + " "
                continue
            cmd = " ".join((pending + body).split())
            pending = ""
            for part in cmd.split("&&"):
                if part.strip():
                    out.append((start, part.strip()))
    for m in re.finditer(r"`((?:python -m |python benchmarks/|jupyter |pip install )[^`]+)`", text):
        out.append((text[:m.start()].count("\n") + 1, " ".join(m.group(1).split())))
    return out


def normalise(cmd: str) -> list[str]:
    """Usage syntax out (`[--opt X]` groups, `...`, `a / b` alternatives: the first), env and nice
    prefixes off; the argv that remains."""
    cmd = re.sub(r"\s\[[^\]=]*\]", " ", " " + cmd).strip()       # [--batch 1 4 16], [overrides]; not a=[x]
    cmd = re.sub(r"(\S+)( / \S+)+", r"\1", cmd)                  # passkey / ppl / report
    argv = [a for a in shlex.split(cmd) if a != "..."]
    while argv and (re.fullmatch(r"[A-Z_]+=\S*", argv[0]) or argv[0] in ("nice", "taskset")):
        argv = argv[3:] if argv[0] in ("nice", "taskset") else argv[1:]
    return argv


class Parsed(BaseException):
    """Raised by argparse right after a successful parse: the dry run stops there."""


@pytest.fixture
def parse_only(monkeypatch):
    orig = argparse.ArgumentParser.parse_args
    orig_known = argparse.ArgumentParser.parse_known_args

    def parse_args(self, args=None, namespace=None):
        orig(self, args, namespace)
        raise Parsed

    def parse_known_args(self, args=None, namespace=None):
        res = orig_known(self, args, namespace)
        if self.prog and "hydra" not in self.prog:
            raise Parsed
        return res

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    return parse_known_args


def _skip_missing_plugins(argv: list[str]) -> None:
    from core.cli import command_points

    command_points([a for a in argv if not a.startswith("-")], "-m" in argv)     # the overrides parse, at least
    for a in argv:
        for name, module in PLUGINS.items():
            if name in a and ("hydra/launcher" in a or "optuna" in a):
                try:
                    importlib.import_module(module)
                except ImportError:
                    pytest.skip(f"{' '.join(argv)}: needs {module} (not installed); its overrides parse")


def doc_commands() -> list[tuple[str, int, str]]:
    """(file relative to the root, line, command) of every command README.md and docs/ show."""
    return [(str(f.relative_to(ROOT)), n, c) for f in DOCS for n, c in readme_commands(f.read_text())]


COMMANDS = doc_commands()


def test_readme_has_commands():
    assert len(COMMANDS) > 40
    mods = {normalise(c)[2] for _, _, c in COMMANDS if c.startswith("python -m ")}
    assert {"runtime.bench", "runtime.serve", "simulator.run", "analysis.validate", "analysis.sweep"} <= mods
    assert any(f == "README.md" for f, _, _ in COMMANDS)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("doc,line,cmd", COMMANDS, ids=[f"{f}:L{n}:{c[:60]}" for f, n, c in COMMANDS])
def test_readme_command_parses(doc, line, cmd, parse_only, monkeypatch, capsys, tmp_path):
    if any(cmd.startswith(p) for p in NOT_CHECKED):
        pytest.skip("not a project command")
    argv = normalise(cmd)
    if argv[0] == "pip":
        extras = re.findall(r"\.\[([a-z,]+)\]", cmd)
        declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        for group in extras:
            for e in group.split(","):
                assert e in declared, f"{doc} line {line}: pip extra .[{e}] is not in pyproject.toml"
        return
    if argv[0] == "jupyter":
        exe = Path(sys.executable).parent / "jupyter"
        assert exe.exists(), f"{doc} line {line}: jupyter is not installed by .[dev]"
        p = subprocess.run([str(exe), argv[1], "--help"], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, f"{doc} line {line}: jupyter {argv[1]} missing: {p.stderr[-300:]}"
        return
    assert argv[0] == "python", cmd
    monkeypatch.chdir(ROOT)
    if argv[1] == "-m":
        module, args = argv[2], argv[3:]
        if module in HYDRA:
            from core.cli import check_command_line

            _skip_missing_plugins(args)
            importlib.import_module(module)              # registers its structured configs
            # the docs start a Ray cluster first (`ray start --head`, not run here): a running one is assumed
            monkeypatch.setattr("core.cli.ray_cluster_problem", lambda address: "")
            try:
                check_command_line(module, HYDRA[module], args)
            except SystemExit as e:
                pytest.fail(f"{doc} line {line}: {cmd}\n{capsys.readouterr().err.strip()} (exit {e.code})")
            return
        if module in COMPOSED:
            compose = importlib.import_module(module).compose_config
            compose(COMPOSED[module], args)
            return
        target = importlib.import_module(module if module != "runtime.profile" and module != "runtime.evals"
                                         else module + ".__main__")
        try:
            target.main(args)
        except Parsed:
            return
        except SystemExit as e:
            pytest.fail(f"{doc} line {line}: {cmd}: exit {e.code}: {capsys.readouterr().err.strip()[-500:]}")
        pytest.fail(f"{doc} line {line}: {cmd}: main() returned without parsing arguments")
    script = ROOT / argv[1]
    assert script.is_file(), f"{doc} line {line}: {argv[1]} does not exist"
    monkeypatch.setattr(sys, "argv", [str(script), *argv[2:]])
    monkeypatch.syspath_prepend(str(script.parent))      # as `python script.py` puts it first
    try:
        runpy.run_path(str(script), run_name="__main__")
    except Parsed:
        return
    except SystemExit as e:
        pytest.fail(f"{doc} line {line}: {cmd}: exit {e.code}: {capsys.readouterr().err.strip()[-500:]}")
    pytest.fail(f"{doc} line {line}: {cmd}: ran without parsing arguments")


def test_extraction_handles_the_readme_forms():
    text = ("x\n```bash\npython -m simulator.run -m a=1,2 \\\n    b=3   # note\npip install -e \".[dev]\" && "
            "python -m runtime.bench\n```\n`python -m runtime.profile [--model M ...] [--quick]` and\n"
            "`python -m runtime.evals passkey / ppl / report`\n")
    cmds = [c for _, c in readme_commands(text)]
    assert cmds[0] == "python -m simulator.run -m a=1,2 b=3"
    assert cmds[1:3] == ['pip install -e ".[dev]"', "python -m runtime.bench"]
    assert normalise(cmds[3]) == ["python", "-m", "runtime.profile"]
    assert normalise(cmds[4]) == ["python", "-m", "runtime.evals", "passkey"]
    assert normalise("OMP_NUM_THREADS=1 nice -n 19 python -m x a=[1,2]") == ["python", "-m", "x", "a=[1,2]"]


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def doc_links(text: str) -> list[tuple[int, str]]:
    """(line, target) of every markdown link outside code (fenced blocks and `spans`)."""
    out, fence = [], False
    for i, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            fence = not fence
            continue
        if not fence:
            out += [(i, m.group(1)) for m in LINK.finditer(re.sub(r"`[^`]*`", "", line))]
    return out


LINKS = [(str(f.relative_to(ROOT)), n, t) for f in DOCS for n, t in doc_links(f.read_text())]


def test_docs_have_links():
    assert any(f == "README.md" for f, _, _ in LINKS) and len(LINKS) > 20


@pytest.mark.parametrize("doc,line,target", LINKS, ids=[f"{f}:L{n}:{t}" for f, n, t in LINKS])
def test_doc_link_resolves(doc, line, target):
    """A relative link names a file (or folder) of this repository; no link leaves it: a clone
    has nothing outside, and the docs speak about this project only."""
    assert not re.match(r"[a-z][a-z0-9+.-]*:", target), f"{doc} line {line}: {target} links outside the repository"
    path = target.split("#", 1)[0]
    if not path:                                          # an anchor in the same page
        assert target[1:] in heading_slugs((ROOT / doc).read_text()), f"{doc} line {line}: no heading {target}"
        return
    resolved = ((ROOT / doc).parent / path).resolve()
    assert resolved.is_relative_to(ROOT), f"{doc} line {line}: {target} points outside the repository"
    assert resolved.exists(), f"{doc} line {line}: {target} does not exist ({resolved.relative_to(ROOT)})"
    if "#" in target and resolved.suffix == ".md":
        anchor = target.split("#", 1)[1]
        assert anchor in heading_slugs(resolved.read_text()), f"{doc} line {line}: no heading #{anchor} in {path}"


def heading_slugs(text: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation out, spaces to dashes."""
    heads = [line.lstrip("#").strip() for line in text.splitlines() if re.match(r"#{1,6} ", line)]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_link_extraction():
    text = "see [a](docs/a.md#x) and ![f](r/f.png)\n`[not](code)`\n```\n[no](link)\n```\n[in](#page)\n"
    assert doc_links(text) == [(1, "docs/a.md#x"), (1, "r/f.png"), (6, "#page")]
