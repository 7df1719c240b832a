"""The Hydra entry points' shared command-line handling (runtime.bench, runtime.serve, simulator.run;
analysis.validate and analysis.sweep compose through `compose_or_explain`).

1. **Hydra's own errors become ours.** Before Hydra runs anything, `check_command_line` parses the
   overrides and composes every point of the command (each point of a multirun) with Hydra's compose
   API; an unknown group option, an unknown key, a wrong type or an unparsable override is one line
   `prog: error: ...` with the valid choices (and the nearest name for a typo), exit status 2. A
   mistake on the command line stops a sweep before its first point: nothing runs.
2. **A bad point in a multirun is recorded**, not the end of the sweep: `run_point` runs one point;
   in a multirun a failure (a ConfigError or anything else) is a CSV row with its error and the
   other points still run; every point's row goes to `<results_dir>/<kind>/sweeps/<sweep>.csv`
   (named after the sweep's own folder, unique per sweep), and the path is printed. The CSV's
   columns (every override its own, the full metric set) and the closing summary: core/sweeps.py.

The config keys and groups themselves: docs/configuration.md.
"""
from __future__ import annotations

import difflib
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable

from core.errors import ConfigError, WriteError, cli_errors
from core.files import check_results, check_writable, run_bytes
from core.interrupts import at_point, clean_exit, stops_sweep

CONF = Path(__file__).resolve().parents[1] / "conf"
MAX_CHECKED_POINTS = 1000          # a multirun larger than this is checked on its first points only
# a Hydra plugin's option (or its first word) -> the pyproject extra that installs it
PLUGIN_EXTRAS = {"joblib": "sweep", "optuna": "sweep", "ray": "ray", "submitit": "cluster"}


# ----------------------------------------------------------------------------- one-line errors

def nearest(word: str, choices) -> str:
    """'; did you mean X?' for a typo of one of `choices` (or the choices it starts, `h100` ->
    h100-pcie or h100-sxm), else ''."""
    choices = [str(c) for c in choices]
    word = str(word)
    starts = [c for c in choices if word and c.startswith(word) and c != word]
    if starts:
        return f"; did you mean {' or '.join(starts[:3])}?"
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f"; did you mean {close[0]}?" if close else ""


def _choices(options) -> list[str]:
    return sorted(o for o in options if not str(o).startswith("base_"))


def _first_line(e: BaseException | None) -> str:
    return str(e).strip().splitlines()[0].strip() if e is not None and str(e).strip() else type(e).__name__


def _node_keys(cfg, parts: list[str]) -> tuple[list[str], str, Any]:
    """Walk `parts` down `cfg`: (keys of the deepest node reached, the first missing part, that node)."""
    from omegaconf import DictConfig

    node = cfg
    for part in parts:
        if not isinstance(node, DictConfig) or part not in node:
            return (list(node.keys()) if isinstance(node, DictConfig) else []), part, node
        node = node._get_node(part)
    return [], "", node


def _unknown_key(override: str, key: str, base) -> str:
    """`key` is not in the config: name the level where it fails, its valid keys, the nearest."""
    parts = key.lstrip("+~").split(".")
    keys, missing, node = _node_keys(base, parts) if base is not None else ([], parts[-1], None)
    where = ".".join(parts[:parts.index(missing)]) if missing in parts else ""
    if where == "policy" and base is not None:
        from core.policies import SPECS

        name = base.policy.get("name")
        having = sorted(n for n, s in SPECS.items() if missing in getattr(s, "__dataclass_fields__", {}))
        alt = f"; policies with {missing}: {', '.join(having)} (policy=<name>)" if having else ""
        return (f"{override}: policy={name} has no knob {missing!r}; its knobs: {', '.join(keys)}"
                f"{nearest(missing, keys)}{alt}")
    level = f"in {where}" if where else "at the top level"
    listing = f"; valid keys {level}: {', '.join(map(str, keys))}" if keys else ""
    return f"{override}: no key {missing!r} {level}{listing}{nearest(missing, keys)}"


def explain(e: BaseException, overrides: list[str], base_cfg: Callable[[list[str]], Any] | None = None) -> str:
    """One line for a Hydra / OmegaConf composition error of `overrides` (the fix included)."""
    from hydra.errors import MissingConfigException, OverrideParseException

    msg = str(e)
    if isinstance(e, OverrideParseException):
        ov = str(e.override)
        if re.search(r"=\s*\[[^\]]*=", ov):
            return (f"cannot parse override {ov!r}: a list item with '=' in it must be quoted: "
                    f"{ov.split('=', 1)[0]}=['a.b=1'] (and the whole argument quoted for the shell: \"...\")")
        return f"cannot parse override {ov!r}: {_first_line(e)}; write key=value (group=option, a.b=1)"
    if isinstance(e, MissingConfigException) and getattr(e, "missing_cfg_file", None):
        missing = str(e.missing_cfg_file)
        group, _, option = missing.rpartition("/")
        for o in overrides:                      # the override as written (an option may hold a '/')
            k, _, v = o.lstrip("+~").partition("=")
            if missing == f"{k}/{v}":
                group, option = k, v
        options = _choices(e.options or [])
        if group:
            if not options:
                # a group of a plugin's (hydra/launcher/ray_local.yaml starts from the plugin's `ray`)
                asked = next((o.lstrip("+~") for o in overrides if o.lstrip("+~").startswith(f"{group}=")), "")
                extra = PLUGIN_EXTRAS.get(asked.partition("=")[2].split("_")[0]) or PLUGIN_EXTRAS.get(option.split("_")[0])
                if group.startswith("hydra/") and extra:
                    return (f"{asked or f'{group}={option}'}: its Hydra plugin is not installed (no {group}={option} "
                            f"config); pip install -e \".[{extra}]\"")
                return f"{group}={option}: there is no config group {group!r}"
            plugin = PLUGIN_EXTRAS.get(option) or PLUGIN_EXTRAS.get(option.split("_")[0])
            hint = (f" (a Hydra plugin that is not installed: pip install -e \".[{plugin}]\")"
                    if group.startswith("hydra/") and plugin else "")
            return (f"{group}={option}: no such option{hint}; choose one of {', '.join(options)}"
                    f"{nearest(option, options)}")
        return f"config {missing!r} not found: {_first_line(e)}"
    cause = e.__cause__
    m = re.search(r"Could not override '([^']+)'", msg) or re.search(r"Could not delete from config\. '([^']+)'", msg)
    if m:
        key = m.group(1)
        ov = next((o for o in overrides if o.lstrip("+~").split("=")[0] == key), key)
        base = _safe_base(base_cfg, overrides, ov)
        return _unknown_key(ov, key, base)
    m = re.search(r"Error merging override (\S+)", msg)
    if m:
        ov = m.group(1)
        key = ov.lstrip("+~").split("=")[0]
        text = _first_line(cause)
        if "does not support deletion" in text or ov.startswith("~"):
            return f"{ov}: {key} is part of the schema and cannot be deleted; set it instead ({key}=VALUE)"
        if "not in" in text or "Key '" in text:
            base = _safe_base(base_cfg, overrides, ov)
            return _unknown_key(ov, key, base)
        want = _expected_type(text)
        return f"{ov}: {text}{want}"
    m = re.search(r"Ambiguous value for argument '([^']+)'", msg)
    if m:
        return f"{m.group(1)} is a sweep (several values); add -m (--multirun) to run each, or give one value"
    if "Could not append to config. An item is already at" in msg:
        k = re.search(r"at '([^']+)'", msg)
        key = k.group(1) if k else "?"
        return f"+{key}=...: {key} exists already; set it without the '+' ({key}=VALUE)"
    if "Could not find" in msg or "In '" in msg:
        return _first_line(e)
    return _first_line(e) + (f" ({_first_line(cause)})" if cause is not None else "")


def _expected_type(text: str) -> str:
    for word, kind in (("Integer", "an integer"), ("Float", "a number"), ("bool", "true or false")):
        if word in text:
            return f"; give {kind}"
    return ""


def _safe_base(base_cfg, overrides: list[str], bad: str):
    if base_cfg is None:
        return None
    try:
        return base_cfg([o for o in overrides if o != bad and not o.startswith("+")])
    except Exception:
        try:
            return base_cfg([o for o in overrides if "=" in o and "." not in o.split("=")[0]])
        except Exception:
            return None


# ----------------------------------------------------------------------------- composing

def _compose(config_name: str, overrides: list[str], conf_dir: Path, hydra_config: bool = True):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            return compose(config_name, overrides=overrides, return_hydra_config=hydra_config)
    finally:
        GlobalHydra.instance().clear()


def _check_appends(overrides: list[str], cfg, base) -> None:
    """`+a.b=v` adds a key Hydra does not know of: only into a free-form dict (model.args) or the
    hydra node; anything else is a typo that would be silently ignored."""
    from omegaconf import DictConfig, OmegaConf

    for ov in overrides:
        if not ov.startswith("+") or ov.startswith("++"):
            continue
        key = ov[1:].split("=")[0]
        if key.startswith("hydra.") or key.startswith("hydra/") or "/" in key:
            continue
        parts = key.split(".")
        parent = base
        for p in parts[:-1]:
            parent = parent.get(p) if isinstance(parent, DictConfig) else None
        if isinstance(parent, DictConfig) and OmegaConf.get_type(parent) is dict and parent is not base:
            continue
        raise ConfigError(_unknown_key(ov, key, base) + " ('+' adds a key that nothing reads)")


def compose_or_explain(config_name: str, overrides: list[str], conf_dir: Path = CONF, hydra_config: bool = False):
    """conf/<config_name>.yaml with `overrides`; any composition error is one ConfigError line."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides)
    try:
        cfg = _compose(config_name, overrides, conf_dir, hydra_config)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(explain(e, overrides, lambda ov: _compose(config_name, ov, conf_dir, False))) from None
    if any(o.startswith("+") and not o.startswith("++") for o in overrides):
        _check_appends(overrides, cfg, _safe_base(lambda ov: _compose(config_name, ov, conf_dir, False),
                                                   overrides, None))
    _check_model_args(cfg)
    return cfg


def _check_model_args(cfg) -> None:
    """model.args is a free-form dict (the ModelArgs shape), so Hydra cannot type it: every value
    there is a number or a boolean (dim, n_layers, ..., rope_base, tie_embeddings)."""
    from omegaconf import DictConfig

    model = cfg.get("model") if isinstance(cfg, DictConfig) else None
    args = model.get("args") if isinstance(model, DictConfig) else None
    for k, v in (args or {}).items():
        if not isinstance(v, (int, float)):
            raise ConfigError(f"model.args.{k}={v!r}: give a number (model.args is the model's shape: dim, "
                              "n_layers, n_heads, ...)")


def command_points(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The overrides of every point a command line runs (a multirun's discrete sweeps expanded;
    a non-discrete sweep, e.g. an Optuna interval, is left to its sweeper)."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as e:
        raise ConfigError(explain(e, overrides)) from None
    lists = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            if not multirun:
                raise ConfigError(f"{o.input_line} is a sweep (several values); add -m (--multirun) to run "
                                  "each, or give one value")
            if not o.is_discrete_sweep():
                continue
            lists.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            lists.append([o.input_line])
    return [list(p) for p in itertools.islice(itertools.product(*lists), MAX_CHECKED_POINTS)]


def check_command_line(prog: str, config_name: str, argv: list[str] | None = None, conf_dir: Path = CONF) -> None:
    """Compose every point of `argv` (Hydra's command line) before Hydra runs; one line, exit 2, on
    the first that does not compose. --help, --info, --shell-completion and custom config paths are
    left to Hydra."""
    from hydra._internal.utils import get_args_parser

    argv = sys.argv[1:] if argv is None else list(argv)
    args, _ = get_args_parser().parse_known_args(argv)
    if (args.help or args.hydra_help or args.info or args.shell_completion or args.config_path
            or args.config_dir or args.experimental_rerun):
        return
    name = args.config_name or config_name
    cfgs = []                              # returned: hydra_entry checks their results folders
    with cli_errors(prog):
        for i, point in enumerate(command_points(list(args.overrides), bool(args.multirun))):
            cfg = compose_or_explain(name, point, conf_dir, hydra_config=True)
            cfgs.append(cfg)
            if i == 0 and args.multirun:
                check_launcher(cfg.hydra.launcher)
    return cfgs


def check_launcher(launcher) -> None:
    """The multirun's launcher can start: its plugin is installed, and a Ray launcher aimed at a
    running cluster does not pass object_store_memory (Ray refuses it there, after the sweep began)."""
    import importlib

    target = str(launcher.get("_target_", ""))
    module = target.rpartition(".")[0]
    if module and not module.startswith("hydra._internal"):
        try:
            importlib.import_module(module)
        except ImportError as e:
            extra = next((x for w, x in PLUGIN_EXTRAS.items() if w in target.lower()), None)
            fix = f"pip install -e \".[{extra}]\"" if extra else "pip install -e \".[sweep]\" (joblib), \".[ray]\" (Ray)"
            raise ConfigError(f"hydra/launcher: {target} cannot be imported ({e}); install its plugin: {fix}") from None
    if target.endswith("RayLauncher"):
        init = launcher.ray.get("init") or {}
        if init.get("address") is not None and "object_store_memory" not in init:
            raise ConfigError(f"hydra.launcher.ray.init.address={init.get('address')}: the ray launcher then passes "
                              "object_store_memory, which Ray refuses for a running cluster; use "
                              "hydra/launcher=ray_local (conf/hydra/launcher/ray_local.yaml) or add "
                              "+hydra.launcher.ray.init.object_store_memory=null")
        if init.get("address") is not None and (problem := ray_cluster_problem(init.get("address"))):
            raise ConfigError(problem)      # not a ConnectionError traceback once the sweep has begun


# ----------------------------------------------------------------------------- sweep points

# a multirun's CSV and closing summary (core/sweeps.py); these names stay importable from here
from core.sweeps import (SweepSummary, ray_cluster_problem, record_stretched_line, sweep_csv,  # noqa: E402,F401
                         sweep_csv_of, sweep_row)


def run_point(prog: str, cfg, run: Callable[[Any], dict], table: Callable[[dict], str], *, kind: str,
              keys: tuple[str, ...], objective: str | None = None):
    """One point of a Hydra entry point. A single run: `run(cfg)`, its table, one line and exit 2
    on a ConfigError. In a multirun: the point's row (or its error) in the sweep CSV, the others go
    on; returns record[objective] (NaN for a failed point: what a sweeper such as Optuna reads)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get() if HydraConfig.initialized() else None
    if hc is None or hc.mode != RunMode.MULTIRUN:
        with cli_errors(prog):
            record = run(cfg)
        print(table(record))
        if line := record_stretched_line(record):    # what was read beyond a grid, how far
            print(line)
        return record.get(objective) if objective else None
    path = sweep_csv(cfg, kind)
    overrides = list(hc.overrides.task)
    at_point(path, hc.job.num, overrides)  # from here a point that cannot record itself stops the sweep, one line
    with stops_sweep(prog, code=2):
        check_writable(path.parent, "results_dir", need=run_bytes(cfg))
    try:
        record = run(cfg)
    except Exception as e:                 # a failing point is recorded, the sweep goes on (not past a lost write)
        with stops_sweep(prog, then=str(e) if isinstance(e, WriteError) else None):
            sweep_row(path, hc.job.num, overrides, None, f"{type(e).__name__}: {e}", keys)
        print(f"{prog}: point {hc.job.num} ({' '.join(overrides)}) failed: {e}", file=sys.stderr)
        print(f"sweep CSV: {path}")
        return math.nan if objective else None
    with stops_sweep(prog, detail=f"its result is in {record.get('path')}"):
        sweep_row(path, hc.job.num, overrides, record, None, keys)
    print(table(record))
    if line := record_stretched_line(record):
        print(line)
    print(f"sweep CSV: {path}")
    return record.get(objective) if objective else None


def hydra_entry(prog: str, config_name: str, task: Callable[[], Any], prepare: Callable | None = None):
    """main() of a Hydra entry point: the command line (1.) and its results folders (they resolve, have
    room) checked, `prepare(cfgs)` in a multirun, Hydra's main; Ctrl-C / SIGTERM: one line, exit 130 / 143."""
    def main():
        with clean_exit(prog):
            cfgs, multirun = check_command_line(prog, config_name) or [], {"-m", "--multirun"} & set(sys.argv[1:])
            with cli_errors(prog):         # before Hydra writes anything
                check_results(cfgs, bool(multirun))
                if prepare is not None and multirun and cfgs:
                    prepare(cfgs)
            return task()
    main.__doc__ = task.__doc__
    main.task = task
    return main

