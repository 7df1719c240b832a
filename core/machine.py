"""Which machine this is and where this user's cache lives: every device fact in one place.

`machine_facts` / `fingerprint` / `this_fingerprint` name the machine state a profile was
measured on; `device_facts` is a profile's `device` section (those facts, its fingerprint, the
PCIe link, a file-name slug); `cache_root`, `resolve_device` and `memory_limits` serve both
halves. The speed index, which runs the model's kernels, is runtime/profile/speed.py. Why a
fingerprint and a speed index: docs/profiles.md.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
from pathlib import Path

import torch

from .errors import ConfigError

CACHE_ENV = "KVTESTBED_CACHE"
# a first-use profile is bracketed by the speed index (runtime/profile/first_use.py ensure): when
# after / before moved by more than this (either way) the machine changed speed while it was
# measured, and the profile is measured again (once; a second move: used, not cached)
PROFILE_SPEED_DRIFT = 0.20
ISA_FLAGS = re.compile(r"^(avx2|avx512\w*|amx\w*|fma|f16c)$")
# facts that name the same machine state; `torch_threads` is in: 1 or 2 threads is another speed
FINGERPRINT_KEYS = ("type", "cpu_model", "physical_cores", "logical_cores", "torch_threads", "l2_bytes",
                    "l3_bytes", "isa", "memory_bytes", "torch", "torch_build", "gpu_name", "gpu_sms",
                    "gpu_memory_bytes", "driver", "cuda", "pcie_gen", "pcie_width")


# ----------------------------------------------------------------------------- cache root

def cache_root(create: bool = True) -> Path:
    """The user's cache folder for kvtestbed; an unwritable one is a one-line ConfigError."""
    env = os.environ.get(CACHE_ENV)
    if env:
        root = Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "kvtestbed"
    if create:
        where = f"{CACHE_ENV}={env}" if env else f"cache folder {root}"
        if root.exists() and not root.is_dir():
            raise ConfigError(f"{where} is a file, not a folder; set {CACHE_ENV}=/a/writable/folder")
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"cache folder {root} is not writable ({e.strerror or e}); "
                              f"set {CACHE_ENV}=/a/writable/folder") from None
    return root


def speed_moved(before: float, after: float, limit: float = PROFILE_SPEED_DRIFT) -> bool:
    """Whether a speed index went from `before` to `after` by more than `limit` (either way):
    |after / before - 1| > limit."""
    return not (before > 0 and after > 0) or abs(after / before - 1.0) > limit


# ----------------------------------------------------------------------------- facts

def _cpu_info() -> tuple[str, set[str], int | None]:
    """(model name, flags, physical cores) from /proc/cpuinfo (empty on other systems)."""
    name, flags, cores = "", set(), set()
    phys = core = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            key, val = key.strip(), val.strip()
            if key == "model name" and not name:
                name = val
            elif key == "flags" and not flags:
                flags = set(val.split())
            elif key == "physical id":
                phys = val
            elif key == "core id":
                core = val
                cores.add((phys, core))
    except OSError:
        pass
    return name or platform.processor() or platform.machine(), flags, (len(cores) or None)


def _size(text: str) -> int | None:
    m = re.match(r"^\s*([\d.]+)\s*([KMG]?)i?B?", text.strip(), re.I)
    if not m:
        return None
    return int(float(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2).upper()])


def cache_sizes(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> dict[str, int | None]:
    """L2 and L3 bytes (per instance, as cpu0 sees them) from sysfs; lscpu as a fallback."""
    out: dict[str, int | None] = {"l2_bytes": None, "l3_bytes": None}
    try:
        for idx in sorted(root.glob("index*")):
            level = (idx / "level").read_text().strip()
            kind = (idx / "type").read_text().strip()
            if level in ("2", "3") and kind in ("Unified", "Data"):
                out[f"l{level}_bytes"] = _size((idx / "size").read_text())
    except OSError:
        pass
    if None in out.values():
        import subprocess

        try:
            text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
            for line in text.splitlines():
                key, _, val = line.partition(":")
                for lvl in ("2", "3"):
                    if key.strip() == f"L{lvl} cache" and out[f"l{lvl}_bytes"] is None:
                        out[f"l{lvl}_bytes"] = _size(val.split("(")[0])
        except (OSError, subprocess.SubprocessError):
            pass
    return out


def machine_facts(device: torch.device | str = "cpu") -> dict:
    """The facts a fingerprint is made of (see FINGERPRINT_KEYS), plus a few for reading."""
    import psutil

    device = torch.device(device)
    name, flags, physical = _cpu_info()
    facts = {"type": device.type, "cpu_model": name, "physical_cores": physical or psutil.cpu_count(logical=False),
             "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), **cache_sizes(),
             "isa": sorted(f for f in flags if ISA_FLAGS.match(f)),
             "memory_bytes": int(psutil.virtual_memory().total), "machine": platform.machine(),
             "torch": torch.__version__, "torch_build": torch.version.git_version[:12] if torch.version.git_version else None}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        facts.update({"gpu_name": p.name, "gpu_sms": p.multi_processor_count, "gpu_memory_bytes": int(p.total_memory),
                      "cuda": torch.version.cuda, **_nvml_facts(device.index or 0)})
    return facts


# GB/s per PCIe lane after line coding (gen3 128b/130b: 0.985)
PCIE_GBPS_PER_LANE = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}


def _nvml(index: int) -> dict:
    """The driver and the PCIe link by pynvml: the *max* generation and width (an idle link
    trains down) and the current ones. Raises where there is no NVML (a container without it)."""
    import pynvml

    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(index)
    drv = pynvml.nvmlSystemGetDriverVersion()
    return {"driver": drv.decode() if isinstance(drv, bytes) else drv,
            "gen": pynvml.nvmlDeviceGetMaxPcieLinkGeneration(h), "width": pynvml.nvmlDeviceGetMaxPcieLinkWidth(h),
            "current": {"gen": pynvml.nvmlDeviceGetCurrPcieLinkGeneration(h),
                        "width": pynvml.nvmlDeviceGetCurrPcieLinkWidth(h)}}


def _nvml_facts(index: int) -> dict:
    """Driver and PCIe generation / width for the fingerprint; without NVML the rest still
    identifies the GPU, and the facts say why these are missing."""
    try:
        n = _nvml(index)
    except Exception as e:
        return {"driver": None, "pcie_gen": None, "pcie_width": None, "nvml": f"unavailable: {type(e).__name__}"}
    return {"driver": n["driver"], "pcie_gen": n["gen"], "pcie_width": n["width"]}


def pcie_link(index: int) -> dict:
    """A profile's `device.pcie`: max and current generation / width and the theoretical rate;
    without NVML it says so rather than guess."""
    try:
        n = _nvml(index)
    except Exception as e:
        return {"gen": None, "width": None, "source": f"unavailable: {type(e).__name__}"}
    gen, width = n["gen"], n["width"]
    per_lane = PCIE_GBPS_PER_LANE.get(gen)
    return {"gen": gen, "width": width, "current": n["current"],
            "theoretical_bytes_per_s": per_lane * width * 1e9 if per_lane else None, "source": "pynvml"}


def fingerprint(facts: dict) -> str:
    """A 12-hex-digit digest of the speed-relevant facts (FINGERPRINT_KEYS)."""
    core = {k: facts.get(k) for k in FINGERPRINT_KEYS}
    return hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()[:12]


_THIS: dict[tuple, str] = {}


def this_fingerprint(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    key = (device.type, device.index, torch.get_num_threads())
    if key not in _THIS:
        _THIS[key] = fingerprint(machine_facts(device))
    return _THIS[key]


def slug(name: str) -> str:
    """A file-name-safe lower-case form of a device name: runs of other characters become one '-'."""
    return re.sub(r"-+", "-", "".join(c.lower() if c.isalnum() else "-" for c in name)).strip("-")


def device_facts(device: torch.device) -> dict:
    """A profile's `device` section: name, type, memory, (CUDA) compute capability and PCIe link,
    (CPU) cores; the torch threads; `slug` (the profile's file name; the CPU's name and cores are
    the same on every VM of a kind); `facts` and their `fingerprint`, which tell those VMs apart."""
    import psutil

    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        facts = {"name": p.name, "type": "cuda", "memory_bytes": int(p.total_memory),
                 "compute_capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count}
        facts["pcie"] = pcie_link(device.index or 0)
    else:
        facts = {"name": _cpu_info()[0], "type": "cpu", "memory_bytes": int(psutil.virtual_memory().total),
                 "cores": os.cpu_count(), "machine": platform.machine()}
    facts["torch_threads"] = torch.get_num_threads()
    facts["slug"] = slug(facts["name"] if device.type == "cuda" else f"cpu-{facts['name']}-{os.cpu_count()}c")
    facts["facts"] = machine_facts(device)
    facts["fingerprint"] = fingerprint(facts["facts"])
    return facts


def resolve_device(name: str) -> torch.device:
    """hardware.device (auto | cpu | cuda[:N]) as a torch device; ConfigError when it is not here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            why = "this torch is a CPU build" if torch.version.cuda is None else "no GPU is visible"
            raise ConfigError(f"hardware.device={name} but CUDA is not available ({why}); "
                              "use hardware.device=cpu or hardware.device=auto")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"hardware.device={name!r} is not known; use auto, cpu or cuda[:N]")


def memory_limits(device: torch.device | str = "cpu") -> tuple[int, int | None]:
    """(host RAM bytes, device memory bytes or None on CPU): the limits core/feasibility.py holds a
    run's estimated need against (the machine's totals, as its fingerprint's facts count them)."""
    import psutil

    device = torch.device(device)
    host = int(psutil.virtual_memory().total)
    if device.type == "cuda":
        return host, int(torch.cuda.get_device_properties(device).total_memory)
    return host, None
