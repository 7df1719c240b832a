"""Which profile a simulation reads and which machine it predicts (simulator/run.py's lookup half).

- `hardware.profile` wins; else (hardware=cpu|auto) a profile of this machine, looked up at the
  thread count the point describes (core/profile/lookup.py `point_profile`: hardware.threads,
  else torch's default for this machine's cores, never the worker's own), or the one a multirun's
  parent resolved and handed down (`hand_off_profiles`); else the committed CPU profile
  (DEFAULT_PROFILE), which predicts the VM it was measured on: `fallback_warning` says so.
- `machine_note`: the result's `predicts` (this machine or the profile's), `threads`,
  `worker_threads`; `profile_source`: its `profile_from`.

docs/simulator.md (cluster launchers), docs/profiles.md (which profile).
"""
from __future__ import annotations

from pathlib import Path

import torch

from core.machine import resolve_device
from core.profile import lookup
from core.provenance import REPO

DEFAULT_PROFILE = "profiles/cpu-intel-r-xeon-r-processor-2c.json"


def machine_note(costs, device: str = "cpu", threads=None) -> dict:
    """Which machine a profile predicts: this one (its fingerprint at the point's thread count,
    hardware.threads else this machine's default) or the one it names."""
    threads = lookup.point_threads(threads)
    here = lookup.fingerprint_at(resolve_device(device), threads) if device in ("cpu", "auto") else None
    fp = costs.profile["device"].get("fingerprint")
    return {"profile_fingerprint": fp, "machine_fingerprint": here,
            # the thread count the machine was looked up at, and the one this (worker) process runs
            "threads": threads, "worker_threads": torch.get_num_threads(),
            "predicts": "this machine" if fp and fp == here else
            f"{costs.profile['device']['name']} ({costs.profile['provenance']['kind']}, fingerprint {fp or 'none'})"}


def profile_source(hw, model: str, path: Path) -> str:
    """How a run came by its profile: `hardware.profile`, `sweep` (a multirun's parent resolved it
    and handed it down), `lookup` (found here), or `committed` (none of this machine's: the
    committed CPU profile)."""
    if hw.get("profile") is not None:
        return "hardware.profile"
    got = lookup.handed_down(hw.get("device"), model, hw.get("threads"))
    if got is not None and got[0] is not None and got[0].is_file():
        return "sweep"
    return "committed" if Path(path).resolve() == (REPO / DEFAULT_PROFILE).resolve() else "lookup"


def fallback_warning(hw, record: dict) -> str:
    """The line a run that looked for this machine's profile (hardware=cpu|auto, no
    hardware.profile) prints when it predicted another machine's instead; '' otherwise."""
    prov = record.get("provenance") or {}
    if hw.get("profile") is not None or hw.get("device") not in ("cpu", "auto") or prov.get("predicts") == "this machine":
        return ""
    return (f"simulator.run: warning: no profile of this machine (fingerprint {prov.get('machine_fingerprint')}, "
            f"{prov.get('threads')} torch threads) has model={record.get('model')} in {lookup.cache_dir()} or profiles/; "
            f"this run predicts {prov.get('predicts')} from {prov.get('profile')} (measure this machine: "
            f"python -m runtime.profile --model {record.get('model')})")


def hand_off_profiles(cfgs) -> None:
    """A multirun's parent (core/cli.py check_command_line): every point that looks its profile up
    gets it resolved once here, handed to the workers (core/profile/lookup.py hand_off)."""
    lookup.hand_off([(c.hardware.device, c.model.name, c.hardware.get("threads")) for c in cfgs
                     if c.hardware.get("profile") is None and c.hardware.get("device") in ("cpu", "auto")])
