"""The eval grid: samples x policies, one shared prefill per sample, resumable JSON lines.

Cost on CPU is dominated by prefill (seconds at 2K) while a policy's decode of a few tokens is a
fraction of that, so each sample is prefilled once in full precision (`engine.prefill_once`) and
every policy decodes from a copy of that cache. Exact, not an approximation: every policy's
prefill is full-precision attention over the prompt (see `runtime.kv.base.LayerKV`).

Resumable: each (sample, policy) result is one line appended to `<out>/<task>.jsonl` and fsynced
before the next starts, so a crash loses at most the point in flight. Appends are whole lines
under an exclusive `fcntl.flock`, after reading the lines other processes appended since (so two
processes on one file, e.g. `rag --shard 0/2` and `--shard 1/2`, neither lose nor duplicate rows). On restart, points with a
result line are skipped (a sample whose policies are all done is not even prefilled); points
whose line carries an "error" are tried again, so a grid run before a policy existed fills in
once it does. A policy that raises records {"error": "..."} for that point and the grid goes on.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from ..engine import prefill_once
from core.errors import ConfigError
from ..model import Transformer
from core.provenance import provenance
from core.results import write_json_atomic
from .data import PasskeySample, TextSample, TextTokenizer
from .score import score_passkey, score_ppl
from .specs import parse_spec


class ResultLog:
    """Append-only JSON lines keyed by (sample_id, policy), safe for several writing processes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: set = set()
        self._offset = 0
        with self._locked() as f:
            self._drop_torn_tail(f)
            self._read_new(f)

    def _locked(self):
        """The file opened for append and read, under an exclusive flock (released on close)."""
        log = self

        class _Lock:
            def __enter__(self):
                self.f = open(log.path, "a+b")
                fcntl.flock(self.f.fileno(), fcntl.LOCK_EX)
                return self.f

            def __exit__(self, *exc):
                fcntl.flock(self.f.fileno(), fcntl.LOCK_UN)
                self.f.close()

        return _Lock()

    @staticmethod
    def _drop_torn_tail(f) -> None:
        """A crash mid-write can leave a last line without its newline; cut it off, or the next
        append would glue a good record onto it (under the lock: no writer is mid-line)."""
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if not size:
            return
        f.seek(0)
        data = f.read()
        if not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)

    def _read_new(self, f) -> None:
        """Add the complete lines appended since the last read to `done`."""
        f.seek(self._offset)
        data = f.read()
        end = data.rfind(b"\n") + 1
        for line in data[:end].splitlines():
            if line.strip():
                r = json.loads(line)
                if "error" not in r:
                    self.done.add((r["sample_id"], r["policy"]))
        self._offset += end

    def refresh(self) -> None:
        """Pick up the rows other processes appended (done grows)."""
        with self._locked() as f:
            self._read_new(f)

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip() and line.endswith("\n")]

    def append(self, rec: dict) -> bool:
        """Append one record as a whole line (fsynced); False (nothing written) when a successful
        row of the same (sample_id, policy) is already in the file."""
        line = (json.dumps(rec, allow_nan=True, default=str) + "\n").encode()
        key = (rec["sample_id"], rec["policy"])
        with self._locked() as f:
            self._read_new(f)
            if key in self.done:
                return False
            f.seek(0, os.SEEK_END)
            if f.tell() > self._offset:          # a writer killed mid-line (no one else writes now)
                f.truncate(self._offset)
                f.seek(self._offset)
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
            self._offset = f.tell()
        if "error" not in rec:
            self.done.add(key)
        return True


@dataclass
class Task:
    """How one eval task turns a sample into a prompt, a score and the fields that describe it."""

    name: str
    prompt: Callable[[object], list[int]]
    score: Callable[[Transformer, object, object, object], dict]   # (model, policy, prefilled, sample)
    fields: Callable[[object], dict]


def passkey_task(tok: TextTokenizer, max_new_tokens: int = 8) -> Task:
    def fields(s: PasskeySample) -> dict:
        return {"length": s.length, "depth": s.depth, "index": s.index, "format": s.fmt,
                "passkey": s.passkey, "prompt_len": len(s.prompt), "needle_depth": s.needle_depth}

    return Task("passkey", lambda s: s.prompt,
                lambda m, p, pre, s: score_passkey(m, tok, p, pre, s, max_new_tokens), fields)


def ppl_task(last: int) -> Task:
    def fields(s: TextSample) -> dict:
        return {"context": s.context, "last": last, "index": s.index}

    if last < 1:
        raise ConfigError(f"--last {last} must be >= 1")
    return Task("ppl", lambda s: s.tokens[:-last], lambda m, p, pre, s: score_ppl(m, p, pre, s, last), fields)


def check_meta(out: Path, task: str, meta: dict) -> None:
    """Write <out>/<task>.run.json; refuse to resume into results of another model or KV dtype."""
    path = out / f"{task}.run.json"
    if path.exists():
        old = json.loads(path.read_text())
        for key in ("model", "kv_dtype"):
            if old.get(key) != meta.get(key):
                raise ConfigError(f"{path} was written with {key}={old.get(key)!r}, this run has "
                                  f"{meta.get(key)!r}; use another --out")
    write_json_atomic(path, meta)


def run_grid(model: Transformer, task: Task, samples: list, specs: list[str], out: Path, *,
             model_name: str, kv_dtype: str = "auto", progress: bool = True, meta: dict | None = None) -> Path:
    """Evaluate every (sample, policy) not yet in <out>/<task>.jsonl; returns that file's path."""
    out = Path(out)
    policies = {spec: parse_spec(spec, kv_dtype) for spec in specs}
    check_meta(out, task.name, {"task": task.name, "model": model_name, "kv_dtype": kv_dtype,
                                "policies": specs, **(meta or {}), "provenance": provenance(model.device)})
    log = ResultLog(out / f"{task.name}.jsonl")
    bar = tqdm(total=len(samples) * len(specs), desc=task.name, unit="pt", disable=not progress)
    for s in samples:
        todo = [spec for spec in specs if (s.id, spec) not in log.done]
        bar.update(len(specs) - len(todo))
        if not todo:
            continue
        t0 = time.perf_counter()
        pre = prefill_once(model, [task.prompt(s)], kv_dtype)
        prefill_s = time.perf_counter() - t0
        for spec in todo:
            bar.set_postfix_str(spec, refresh=False)
            base = {"task": task.name, "sample_id": s.id, "policy": spec, "model": model_name,
                    **task.fields(s), "prefill_s": prefill_s}
            log.append({**base, **_score_or_error(task, model, policies[spec], pre, s)})
            bar.update(1)
    bar.close()
    return log.path


def _score_or_error(task: Task, model, policy, pre, sample) -> dict:
    """A failing policy (not written yet, bad knob, a bug) is recorded, not fatal to the grid."""
    try:
        return task.score(model, policy, pre, sample)
    except Exception as e:  # noqa: BLE001 - recorded per point, by design
        return {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
