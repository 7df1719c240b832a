"""Tests that hunt. Hypothesis generates configurations across the config groups
(model=tiny; policy full / kivi / offload / rag / specache with their knobs; workload static /
poisson / closed / trace; hardware link / budget / threads; the scheduler, the SLO, results_dir)
and traces and profiles with hostile values, runs each through the real entry point in this process
(`python -m runtime.bench | runtime.serve | simulator.run` via runpy, Hydra's main included), and
asserts that it either runs (exit 0, a result on disk whose numbers match what was asked) or ends
with ONE line `<prog>: error: ...` and exit status 2; never a traceback, a hang (pytest-timeout) or
a multi-line error. Valid values are drawn too, so both branches are exercised (each test asserts a
share of each). Fixed `max_examples`, derandomized (the `kvtestbed-hunt` settings profile), so a run
is reproducible and its time bounded. What the hunt found is tallied in tests/hostile_cases_c.md."""
from __future__ import annotations

import contextlib
import io
import json
import math
import runpy
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import runtime.bench  # noqa: F401  (registers the structured configs; imported once, not per example)
import runtime.serve  # noqa: F401
import simulator.run  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "profiles" / "cpu-intel-r-xeon-r-processor-2c.json"
pytestmark = pytest.mark.filterwarnings("ignore:.*found in sys.modules after import of package:RuntimeWarning",
                                        "ignore::UserWarning", "ignore::RuntimeWarning")

# fixed and derandomized: the same examples every run, in a bounded time (each example < ~1 s)
settings.register_profile("kvtestbed-hunt", max_examples=30, derandomize=True, deadline=None, database=None,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                  HealthCheck.filter_too_much])
HUNT = settings.get_profile("kvtestbed-hunt")
EXAMPLES = {"configs": 24, "results": 6, "traces": 12, "profiles": 12}      # 54 runs per suite run
PROGS = ("runtime.bench", "runtime.serve", "simulator.run")


def run_cli(prog: str, overrides: list[str], results: str) -> tuple[int, list[str]]:
    """`python -m <prog> overrides...` in this process: (exit status, non-empty stderr lines other
    than warnings and progress bars)."""
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    extra = ["warmup=false", "progress=false"] if prog != "simulator.run" else ["progress=false"]
    extra += ["repeats=1", "speed_index=false"] if prog == "runtime.bench" else []   # one run: `requests` is the batch
    argv, sys.argv = sys.argv, [prog, *overrides, *extra, f"results_dir={results}",
                                f"hydra.run.dir={tempfile.gettempdir()}/kvtestbed-hunt-hydra"]
    out, err = io.StringIO(), io.StringIO()
    rc = 0
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_module(prog, run_name="__main__")
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
            except Exception:              # a traceback: what the hunt looks for (a timeout passes through)
                import traceback

                rc, _ = 1, traceback.print_exc()
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)
    lines = [ln for ln in err.getvalue().splitlines()
             if ln.strip() and "warning" not in ln.lower() and "warn(" not in ln and "it/s" not in ln]
    return rc, lines


def ran_or_one_line(prog: str, overrides: list[str], results: str) -> tuple[int, list[str]]:
    rc, lines = run_cli(prog, overrides, results)
    cmd = f"python -m {prog} {' '.join(overrides)}"
    if rc == 0:
        assert not lines, (cmd, lines)
    else:
        assert rc == 2, (cmd, rc, lines[-12:])
        assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), (cmd, lines[-12:])
    return rc, lines


def the_record(results: str, prog: str) -> dict:
    kind = "simulated" if prog == "simulator.run" else "measured"
    files = sorted(Path(results, kind).glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def check_record(rec: dict, prog: str, cfg: dict) -> None:
    """A run that exits 0 wrote what was asked: the request count, the tokens, finite times."""
    w = cfg["workload"]
    for key in ("throughput_tok_s", "ttft_s", "tpot_s"):
        v = rec.get(key)
        if key == "tpot_s" and (w["arrival"] == "trace" or w["gen_len"] == 1):
            continue                     # one token: no time per output token (NaN by definition)
        assert isinstance(v, (int, float)) and math.isfinite(v) and v >= 0, (key, v)
    assert rec["throughput_tok_s"] > 0 and math.isfinite(rec["throughput_tok_s"]), rec["throughput_tok_s"]
    if w["arrival"] == "static":
        assert rec["requests"] == w["batch"], (rec["requests"], w["batch"])
    elif w["arrival"] in ("poisson", "closed"):
        assert rec["requests"] == w["n_requests"], (rec["requests"], w["n_requests"])
    if w["arrival"] != "trace" and w.get("ignore_eos", True):
        assert rec["output_tokens"] == rec["requests"] * w["gen_len"], (rec["output_tokens"], w["gen_len"])
    if prog != "runtime.bench":
        assert rec["config"]["hardware"]["link"]["gbps"] == cfg["hardware"]["link"]["gbps"]


# ----------------------------------------------------------------------------- strategies

def knob(valid: list, hostile: list):
    """A (valid values, hostile values) pair: a drawn example picks from one or the other."""
    return valid, hostile


NAN = ["nan", "inf", "-inf"]
POLICY_KNOBS = {
    "full": {"kv_dtype": knob(["auto", "float32"], ["int3", "''", "nan"])},
    "offload": {"kv_dtype": knob(["auto", "float16"], ["fp8", "7"])},
    "kivi": {"bits": knob([2, 4], [0, 3, -1, 99, "nan", "two"]),
             "group_size": knob([8, 16], [0, -8, 5, 7, 10 ** 9, "inf"]),
             "residual": knob([16, 32], [0, -16, 12, 10 ** 12]),
             "one_bit_rule": knob(["specache"], ["nope", "''"])},
    "specache": {"bits": knob([2], [3, -2]),
                 "group_size": knob([8, 16], [0, 3]),
                 "residual": knob([16], [0, 10]),
                 "k": knob([0, 4, 64, 10 ** 9], [-1, -(10 ** 9), "nan", "1.5"]),
                 "prefetch": knob(["true", "false"], ["maybe", "2"]),
                 "gather": knob(["host"], ["nope", "''"])},
    "rag": {"selector": knob(["draft", "reuse", "full", "random", "epic", "cacheblend"], ["nope", "''", "oracle"]),
            "recompute_ratio": knob([0, 0.15, 1], [-0.1, 1.5, *NAN]),
            "chunk_len": knob([8], [0, -4, 10 ** 6, 2.5]),
            "draft_layers": knob([1, 2], [0, -1, 99]),
            "question_len": knob([8], [0, -8, 10 ** 6]),
            "tau_smooth": knob([0.4], [-1, 2, "nan"]),
            "span_max": knob([4], [0, -1]),
            "store": knob(["warm", "disk"], ["tape", "''"]),
            "store_max_bytes": knob(["null", 10 ** 9], [0, -1, "nan"]),
            "sink_tokens": knob([0], [-1, 10 ** 9]),
            "epic_prefix": knob(["null"], [0, -1])},
}
WORKLOAD_KNOBS = {
    "batch": knob([1, 2, 3], [0, -1, 10 ** 8, 10 ** 15, "abc", "2.5"]),
    "prompt_len": knob([8, 12, 16], [0, -5, 4000, 10 ** 9, "nan"]),
    "gen_len": knob([1, 2], [0, -1, 10 ** 6, 2049]),
    "prompt_len_min": knob(["null", 4], [0, -1, 100, 10 ** 9]),
    "seed": knob([0, 7], [-1, 2 ** 64, 2 ** 70, "x"]),
    "temperature": knob([0, 0.7], [-1, *NAN, 1e308]),
    "top_p": knob([1, 0.9], [0, -0.5, 1.5, *NAN]),
    "ignore_eos": knob(["true"], ["maybe"]),
}
ARRIVAL_KNOBS = {
    "poisson": {"rate": knob([200, 1000], [0, -1, *NAN, 1e-9, 1e300]),
                "n_requests": knob([1, 2, 3], [0, -1, 10 ** 9, 10 ** 15])},
    "closed": {"users": knob([1, 2], [0, -3, 10 ** 9]), "think_s": knob([0, 0.001], [-1, *NAN, 1e9]),
               "n_requests": knob([2, 3], [0, -2, 10 ** 12])},
}
HARDWARE_KNOBS = {
    "link.gbps": knob(["null", 4, 100], [0, -2, *NAN, 1e-300, 1e300]),
    "link.latency_us": knob([0, 5], [-1, *NAN, 1e12]),
    "kv_budget_bytes": knob(["null", 10 ** 9], [0, -1, 1, 10 ** 30, "nan"]),
    "host_memory_bytes": knob(["null", 10 ** 10], [0, -1, 1]),
    "threads": knob(["null", 1, 2], [0, -1, 10 ** 6, 10 ** 12]),
}
SCHEDULER_KNOBS = {
    "max_batch": knob([4, 256], [0, -1, 10 ** 15]),
    "order": knob(["prefill_first", "decode_first"], ["nope", "''"]),
    "ctx_bucket": knob([1, 16], [0, -16, 10 ** 12]),
}
SLO_KNOBS = {"ttft_s": knob(["null", 1.0], [0, -1, *NAN]), "tpot_s": knob(["null", 0.5], [0, -0.5, "nan"])}


@st.composite
def knob_overrides(draw, prefix: str, knobs: dict, hostile_p: float) -> list[str]:
    out = []
    for key, (good, bad) in knobs.items():
        if not draw(st.booleans()):            # left at its default about half the time
            continue
        pool = bad if draw(st.floats(0, 1)) < hostile_p else good
        out.append(f"{prefix}{key}={draw(st.sampled_from(pool))}")
    return out


@st.composite
def configs(draw):
    """(prog, overrides, tag): a command line across the config groups. About half of the
    examples draw valid values only; the rest draw each knob hostile with probability ~0.3."""
    prog = draw(st.sampled_from(PROGS))
    hostile_p = draw(st.sampled_from([0.0, 0.0, 0.3, 0.3]))
    policy = draw(st.sampled_from(sorted(POLICY_KNOBS)))
    arrival = "static" if prog == "runtime.bench" else draw(st.sampled_from(["static", "static", "poisson", "closed"]))
    if prog == "runtime.bench" and draw(st.floats(0, 1)) < hostile_p / 3:
        arrival = draw(st.sampled_from(["poisson", "closed"]))      # bench runs static batches only
    ov = ["model=tiny", f"policy={policy}", "workload=default" if arrival == "static" else f"workload={arrival}",
          "workload.prompt_len=16", "workload.gen_len=2"]
    if arrival != "static":
        ov += ["workload.n_requests=2", "workload.rate=500"] if arrival == "poisson" else \
            ["workload.n_requests=2", "workload.users=2", "workload.think_s=0"]
    else:
        ov += ["workload.batch=2"]
    if policy == "rag":                      # chunks of 8 and a question of 8: prompts of 8 n + 8
        ov += ["policy.chunk_len=8", "policy.question_len=8", "workload.prompt_len=24", "policy.draft_layers=1"]
        if prog == "runtime.bench":
            ov += ["workload.batch=1"]
    if policy in ("kivi", "specache"):
        ov += ["policy.group_size=8", "policy.residual=16"]
    ov += draw(knob_overrides("policy.", POLICY_KNOBS[policy], hostile_p))
    ov += draw(knob_overrides("workload.", {k: v for k, v in WORKLOAD_KNOBS.items()
                                            if not (policy == "rag" and k in ("prompt_len", "batch"))}, hostile_p))
    if arrival in ARRIVAL_KNOBS:
        ov += draw(knob_overrides("workload.", ARRIVAL_KNOBS[arrival], hostile_p))
    ov += draw(knob_overrides("hardware.", HARDWARE_KNOBS, hostile_p))
    if prog != "runtime.bench":
        ov += draw(knob_overrides("scheduler.", SCHEDULER_KNOBS, hostile_p))
        ov += draw(knob_overrides("slo.", SLO_KNOBS, hostile_p))
    if prog == "simulator.run" and draw(st.booleans()):
        ov += [f"fidelity={draw(st.sampled_from(['fast', 'detailed'] if hostile_p == 0 else ['fast', 'exact', '']))}"]
    return prog, ov, ("valid" if hostile_p == 0 else "hostile")


def _drop_duplicates(ov: list[str]) -> list[str]:
    """The last value of a key wins (Hydra refuses a key given twice)."""
    last = {}
    for o in ov:
        last[o.split("=", 1)[0]] = o
    return list(last.values())


def composed_dict(prog: str, overrides: list[str], results: str) -> dict:
    from omegaconf import OmegaConf

    from core.cli import compose_or_explain

    name = {"runtime.bench": "bench", "runtime.serve": "serve", "simulator.run": "simulate"}[prog]
    cfg = compose_or_explain(name, [*overrides, f"results_dir={results}"])
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.timeout(300)
def test_generated_configs_run_or_fail_in_one_line():
    outcomes = []

    @settings(HUNT, max_examples=EXAMPLES["configs"])
    @given(configs())
    def prop(case):
        prog, ov, tag = case
        ov = _drop_duplicates(ov)
        results = tempfile.mkdtemp(prefix="kvtestbed-hunt-")
        try:
            rc, _ = ran_or_one_line(prog, ov, results)
            if rc == 0:
                check_record(the_record(results, prog), prog, composed_dict(prog, ov, results))
            outcomes.append((tag, rc))
        finally:
            shutil.rmtree(results, ignore_errors=True)

    prop()
    ran = sum(1 for _, rc in outcomes if rc == 0)
    assert len(outcomes) == EXAMPLES["configs"]
    assert ran >= len(outcomes) // 6 and len(outcomes) - ran >= len(outcomes) // 3, outcomes


# ----------------------------------------------------------------------------- results_dir

@st.composite
def results_dirs(draw):
    kind = draw(st.sampled_from(["fresh", "nested", "file", "file_parent", "empty", "blank", "dotdot", "devnull"]))
    return draw(st.sampled_from(PROGS)), kind


def _results_path(kind: str, tmp: Path) -> str:
    (tmp / "afile").write_text("x")
    return {"fresh": str(tmp / "r"), "nested": str(tmp / "a" / "b" / "c"), "file": str(tmp / "afile"),
            "file_parent": str(tmp / "afile" / "r"), "empty": "''", "blank": "' '", "dotdot": str(tmp / "r" / ".."),
            "devnull": "/dev/null"}[kind]


@pytest.mark.timeout(120)
def test_results_dir_runs_or_fails_in_one_line():
    outcomes = []

    @settings(HUNT, max_examples=EXAMPLES["results"])
    @given(results_dirs())
    def prop(case):
        prog, kind = case
        tmp = Path(tempfile.mkdtemp(prefix="kvtestbed-hunt-"))
        try:
            where = _results_path(kind, tmp)
            ov = ["model=tiny", "workload.batch=1", "workload.prompt_len=8", "workload.gen_len=1"]
            rc, lines = run_cli(prog, ov, where)
            if rc == 0:
                assert kind in ("fresh", "nested", "dotdot"), (kind, lines)
                kinddir = "simulated" if prog == "simulator.run" else "measured"
                assert list(Path(where.strip("'"), kinddir).glob("*.json")), where
            else:
                assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), (kind, rc, lines)
            outcomes.append(rc)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    prop()
    assert 0 in outcomes and 2 in outcomes, outcomes


# ----------------------------------------------------------------------------- traces

CELL = {
    "arrival_s": knob(["0", "0.001", "0.01", " 0.002 "], ["nan", "inf", "-inf", "-1", "", "abc", "1e12", "1e400",
                                                          "0x10", "NaN", "None"]),
    "prompt_len": knob(["8", "16", "12"], ["0", "-1", "16.5", "1e9", "nan", "", "x", "inf", "4000", "99999999999"]),
    "gen_len": knob(["1", "2"], ["0", "-2", "2.5", "nan", "", "1e6", "inf", "2049"]),
}


@st.composite
def traces(draw):
    """(prog, what to write at workload.trace, tag): a CSV with hostile cells, columns reordered,
    missing or extra, header-only, empty, binary, a directory or a missing file."""
    prog = draw(st.sampled_from(["runtime.serve", "simulator.run"]))
    if draw(st.integers(0, 2)) == 0:            # a third: a well-formed trace in one of the accepted forms
        shape, hostile_p = draw(st.sampled_from(["rows", "bom", "extra_column", "blank_lines", "quoted"])), 0.0
    else:
        shape = draw(st.sampled_from(["rows", "rows", "rows", "header_only", "empty", "directory", "missing",
                                      "binary", "no_header", "semicolon", "missing_column", "extra_column", "quoted"]))
        hostile_p = 0.3
    cols = ["arrival_s", "prompt_len", "gen_len"]
    if draw(st.booleans()):
        cols = draw(st.permutations(cols))
    n = draw(st.integers(1, 3))
    rows = []
    for _ in range(n):
        row = {}
        for c in cols:
            good, bad = CELL[c]
            row[c] = draw(st.sampled_from(bad if draw(st.floats(0, 1)) < hostile_p else good))
        rows.append(row)
    header = list(cols)
    if shape == "extra_column":
        header.append("note")
        for r in rows:
            r["note"] = "x"
    if shape == "missing_column":
        drop = draw(st.sampled_from(cols))
        header.remove(drop)
    body = [",".join(header)] + [",".join(r[c] for c in header) for r in rows]
    text = {"header_only": ",".join(header) + "\n", "empty": "", "no_header": "\n".join(body[1:]) + "\n",
            "semicolon": "\n".join(";".join(ln.split(",")) for ln in body) + "\n",
            "bom": "\ufeff" + "\n".join(body) + "\n", "blank_lines": "\n\n".join(body) + "\n\n",
            "quoted": "\n".join(",".join(f'"{c}"' for c in ln.split(",")) for ln in body) + "\n"}.get(
        shape, "\n".join(body) + "\n")
    return prog, shape, text, ("valid" if hostile_p == 0 and shape != "missing_column" else "hostile")


@pytest.mark.timeout(200)
def test_generated_traces_run_or_fail_in_one_line():
    outcomes = []

    @settings(HUNT, max_examples=EXAMPLES["traces"])
    @given(traces())
    def prop(case):
        prog, shape, text, tag = case
        tmp = Path(tempfile.mkdtemp(prefix="kvtestbed-hunt-"))
        try:
            path = tmp / "trace.csv"
            if shape == "directory":
                path.mkdir()
            elif shape == "binary":
                path.write_bytes(bytes(range(256)) * 3)
            elif shape != "missing":
                path.write_text(text)
            ov = ["model=tiny", "workload=trace", f"workload.trace={path}"]
            rc, _ = ran_or_one_line(prog, ov, str(tmp / "results"))
            if rc == 0:
                rec = the_record(str(tmp / "results"), prog)
                from core.workload import read_trace

                reqs = read_trace(str(path))
                assert rec["requests"] == len(reqs), (rec["requests"], len(reqs))
                assert rec["output_tokens"] == sum(r.gen_len for r in reqs), rec["output_tokens"]
                assert math.isfinite(rec["throughput_tok_s"]) and rec["throughput_tok_s"] > 0
            outcomes.append((shape, rc))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    prop()
    ran = sum(1 for _, rc in outcomes if rc == 0)
    assert ran >= len(outcomes) // 6 and len(outcomes) - ran >= len(outcomes) // 3, outcomes


# ----------------------------------------------------------------------------- profiles

def _leaves(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(node, list) and node and not isinstance(node[0], (dict, list)):
        yield path, node                               # an axis or a row: mutated as a whole or by cell
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, (*path, i))
    else:
        yield path, node


def _profile_tree() -> dict:
    return json.loads(PROFILE.read_text())


LEAVES = [p for p, _ in _leaves(_profile_tree()) if p and p[0] in ("models", "transfers", "device", "memory")
          and (p[0] != "models" or p[1] == "tiny")]
HOSTILE_VALUES = [math.nan, math.inf, -math.inf, -1, 0, -1e-9, 1e300, "fast", None, [], {}, True, 10 ** 30]


@st.composite
def profiles(draw):
    """(mutation description, the mutated profile text or a non-file) for simulator.run."""
    how = draw(st.sampled_from(["value", "value", "value", "delete", "reverse", "none", "none", "truncate",
                                "directory", "missing", "empty", "not_object", "cell"]))
    p = _profile_tree()
    path = draw(st.sampled_from(LEAVES))
    node = p
    for k in path[:-1]:
        node = node[k]
    last = path[-1]
    desc = f"{how} {'.'.join(map(str, path))}"
    if how == "value":
        v = draw(st.sampled_from(HOSTILE_VALUES))
        node[last] = v
        desc += f"={v!r}"
    elif how == "cell" and isinstance(node[last], list) and node[last]:
        i = draw(st.integers(0, len(node[last]) - 1))
        v = draw(st.sampled_from(HOSTILE_VALUES))
        node[last][i] = v
        desc += f"[{i}]={v!r}"
    elif how == "delete":
        del node[last]
    elif how == "reverse" and isinstance(node[last], list):
        node[last] = node[last][::-1]
    text = json.dumps(p)
    if how == "truncate":
        text = text[: draw(st.integers(0, len(text) - 1))]
    if how == "empty":
        text = ""
    if how == "not_object":
        text = draw(st.sampled_from(["[]", "null", "42", '"profile"']))
    return how, desc, text


@pytest.mark.timeout(200)
def test_generated_profiles_run_or_fail_in_one_line():
    outcomes = []

    @settings(HUNT, max_examples=EXAMPLES["profiles"])
    @given(profiles(), st.sampled_from(["full", "kivi", "specache", "offload"]))
    def prop(case, policy):
        how, desc, text = case
        tmp = Path(tempfile.mkdtemp(prefix="kvtestbed-hunt-"))
        try:
            path = tmp / "profile.json"
            if how == "directory":
                path.mkdir()
            elif how != "missing":
                path.write_text(text)
            ov = ["model=tiny", f"policy={policy}", "workload.batch=2", "workload.prompt_len=16",
                  "workload.gen_len=2", f"hardware.profile={path}"]
            if policy in ("kivi", "specache"):
                ov += ["policy.group_size=8", "policy.residual=16"]
            rc, _ = ran_or_one_line("simulator.run", ov, str(tmp / "results"))
            if rc == 0:
                rec = the_record(str(tmp / "results"), "simulator.run")
                for key in ("throughput_tok_s", "ttft_s", "tpot_s"):
                    assert math.isfinite(rec[key]) and rec[key] > 0, (desc, key, rec[key])
            outcomes.append((desc, rc))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    prop()
    ran = sum(1 for _, rc in outcomes if rc == 0)
    assert ran >= 2 and len(outcomes) - ran >= len(outcomes) // 3, outcomes


# ----------------------------------------------------------------------------- what the hunt found

def _one_line(capsys, main, argv, prog):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    return err[0]


@pytest.mark.parametrize("override,needle", [
    ("hardware.threads=1000000", "hardware.threads=1000000 must be <= 1024"),        # was a segfault
    ("hardware.link.gbps=1e-300", "hardware.link.gbps=1e-300 must be >= 0.001"),     # was an OverflowError
    ("hardware.link.latency_us=1e12", "hardware.link.latency_us=1000000000000.0 must be <= 1e+06"),  # hours
])
def test_found_hardware_bounds(override, needle):
    from core.checks import check_config
    from core.cli import compose_or_explain
    from core.errors import ConfigError

    for name, runner in (("bench", "runtime.bench"), ("simulate", "simulator.run")):
        with pytest.raises(ConfigError, match=needle.replace("+", r"\+").replace(".", r"\.")):
            check_config(compose_or_explain(name, ["model=tiny", override]), runner)


def test_found_ragged_profile_table(tmp_path):
    from core.profile import schema

    p = json.loads(PROFILE.read_text())
    table = p["models"]["tiny"]["kernels"]["score_topk"]
    table["p50"][1] = 10 ** 30                          # a number where a row belongs: was a numpy traceback
    path = tmp_path / "p.json"
    path.write_text(json.dumps(p))
    with pytest.raises(schema.ProfileError, match=r"score_topk\.p50\[1\] is 1000000000000000000000000000000 where a row"):
        schema.load(path)


def test_found_sampling_nan():
    from core.errors import ConfigError
    from runtime.engine import SamplingParams

    for kw, needle in ((dict(temperature=math.nan), "temperature=nan is not a finite number"),
                       (dict(temperature=math.inf), "temperature=inf"), (dict(top_p=math.nan), "top_p=nan")):
        with pytest.raises(ConfigError, match=needle):
            SamplingParams(**kw)


@pytest.mark.parametrize("argv,needle", [
    (["--policy", "nope", "Hi"], "policy='nope' is not known"),           # before the model loads
    (["--temperature", "nan", "Hi"], "temperature=nan is not a finite number"),
    (["--kv-dtype", "int3", "Hi"], "policy.kv_dtype='int3' is not known"),
])
def test_found_generate_checks_before_loading(argv, needle, capsys):
    from runtime.generate import main

    assert needle in _one_line(capsys, main, argv, "runtime.generate")


@pytest.mark.parametrize("extra,needle", [
    (["--threads", "-1"], "--threads=-1 must be >= 1"),                  # was a RuntimeError traceback
    (["--threads", "1000000"], "--threads=1000000 must be <= 1024"),      # was an allocation failure
    (["--seed", "-1"], "--seed=-1 must be >= 0"),                         # was a numpy SeedSequence traceback
    (["--lengths", "-5"], "--lengths=-5 must be >= 1"),
    (["--depths", "nan"], "--depths=nan is not a finite number"),
    (["--max-new-tokens", "0"], "--max-new-tokens=0 must be >= 1"),
    (["--out", "/dev/null"], "--out: /dev/null is a file, not a folder"),   # was a FileExistsError traceback
])
def test_found_evals_numbers(extra, needle, capsys, tmp_path):
    from runtime.evals.__main__ import main

    argv = ["passkey", "--model", "tiny", "--n", "1", "--no-progress", "--lengths", "300", "--depths", "0.5",
            *(["--out", str(tmp_path / "o")] if "--out" not in extra else []), *extra]
    assert needle in _one_line(capsys, main, argv, "runtime.evals")


def test_found_profile_command(capsys, tmp_path):
    from runtime.profile.__main__ import main

    assert "--repeats=0 must be >= 1" in _one_line(capsys, main, ["--model", "tiny", "--quick", "--repeats", "0",
                                                                  "--out", str(tmp_path / "p.json")], "runtime.profile")
    (tmp_path / "list.json").write_text("[]")
    assert "not a profile" in _one_line(capsys, main, ["--model", "tiny", "--quick", "--out",
                                                       str(tmp_path / "list.json")], "runtime.profile")
    assert "is a directory" in _one_line(capsys, main, ["--model", "tiny", "--quick", "--out", str(tmp_path)],
                                         "runtime.profile")


def test_found_cache_env_naming_a_file(capsys, tmp_path, monkeypatch):
    from runtime.cache import main

    (tmp_path / "f").write_text("x")
    monkeypatch.setenv("KVTESTBED_CACHE", str(tmp_path / "f"))
    line = _one_line(capsys, main, [], "runtime.cache")
    assert "KVTESTBED_CACHE=" in line and "is a file, not a folder" in line


def test_found_sweep_arguments(capsys, tmp_path):
    from analysis.sweep import main

    (tmp_path / "f").write_text("x")
    line = _one_line(capsys, main, ["experiment=smoke"], "analysis.sweep")
    assert "experiment=smoke is not a sweep" in line and "sweep_k_bits_r" in line
    line = _one_line(capsys, main, ["experiment=sweep_k_bits_r", f"results_dir={tmp_path / 'f'}"], "analysis.sweep")
    assert "is a file, not a folder" in line                  # before the points (was a traceback after them)
    line = _one_line(capsys, main, ["experiment=sweep_k_bits_r", f"evals_dir={tmp_path / 'f'}"], "analysis.sweep")
    assert f"evals_dir={tmp_path / 'f'} is a file" in line   # was silently no quality joined
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "passkey.csv").write_bytes(b"\x00\x01garbage")
    line = _one_line(capsys, main, ["experiment=sweep_k_bits_r", f"evals_dir={tmp_path / 'ev'}",
                                    f"results_dir={tmp_path / 'r'}"], "analysis.sweep")
    assert "passkey.csv lacks column policy" in line
    line = _one_line(capsys, main, ["sweep.grids=[{name:g,axes:{policy.k:[]}}]", "sweep.base=['model=tiny']"],
                     "analysis.sweep")
    assert "axes.policy.k=[]: an axis is a non-empty list" in line      # was a KeyError traceback


def test_found_sweep_whose_every_point_fails(capsys, tmp_path):
    from analysis.sweep import main

    main(["sweep.grids=[{name:g,axes:{nokey.x:[1]}}]", "sweep.base=['model=tiny']", f"results_dir={tmp_path}",
          "progress=false"])                           # was a KeyError traceback after the points
    out = capsys.readouterr().out
    assert "FAILED model=tiny nokey.x=1" in out and "(0 ok, 1 failed)" in out
