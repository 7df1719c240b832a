"""What moving K/V between host and device costs, as the runtime moves it (runtime/transfer.py).

`CopyCosts` is the part of simulator/costs.py `Costs` that prices copies: which engine a copy
occupies (`link_kind`, `engine`), how much it slows compute beside it, pinned H2D / D2H copies
and gathers of scattered rows, over the profile's transfer tables or an emulated link
(hardware.link: bytes/s and latency). docs/simulator.md says how copies overlap compute.
"""
from __future__ import annotations

from functools import cached_property

from core.errors import ConfigError

GATHERS = ("host", "device")


def _check_gather(mode: str) -> None:
    if mode not in GATHERS:
        raise ConfigError(f"policy.gather={mode!r} is not known; choose one of: {', '.join(GATHERS)}")


def _per_row(t, nbytes: float) -> float:
    """A gather table (by rows) read at `nbytes`, in rows of the table's own row size."""
    return t(nbytes / float(t.extra.get("row_bytes", 256)))


class CopyCosts:
    """Copy costs (seconds) of a Costs: reads self.profile, self.link, self.analytic, self.roofline
    and self.table (simulator/costs.py)."""

    @cached_property
    def overlap(self) -> dict:
        o = self.profile["transfers"].get("overlap")
        if not isinstance(o, dict) or "gemm_slowdown_with_copy" not in o:
            raise ConfigError(f"{self.path}: missing 'transfers.overlap.gemm_slowdown_with_copy'; re-profile")
        return o

    @property
    def link_kind(self) -> str:
        """How copies run, as the runtime runs them (runtime/transfer.py):
        - `device`: a GPU's copy engines, H2D and D2H each beside the compute stream;
        - `emulated`: one worker thread on a CPU box (hardware.link.gbps), both directions in
          one FIFO, beside compute;
        - `direct`: a CPU box without emulation: a copy is a memcpy on the compute thread,
          so it overlaps nothing."""
        if self.profile["device"].get("type") != "cpu":
            return "device"
        return "emulated" if self.link else "direct"

    def engine(self, name: str) -> str:
        """The engine a copy op (`h2d` / `d2h`) occupies under `link_kind`."""
        kind = self.link_kind
        if kind == "direct":
            return "compute"
        if kind == "emulated":
            return "h2d"
        return name

    @property
    def gemm_slowdown(self) -> float:
        """How much a copy running beside compute slows it (1: not at all)."""
        kind = self.link_kind
        if kind == "direct":
            return 1.0                      # the copy is not beside compute but in series with it
        if kind == "emulated":              # the bytes move on the caller's thread: see issue_cost
            return 1.0
        return float(self.overlap["gemm_slowdown_with_copy"])

    def issue_cost(self, nbytes: float) -> float:
        """Compute-thread seconds to issue copies of `nbytes`: the emulated link moves the bytes
        at once with a memcpy on the caller's thread (runtime/transfer.py EmulatedLink), and only
        their completion waits for the link. Zero elsewhere (a copy engine or DirectLink's copy,
        which is already an op of its own on the compute engine)."""
        if self.link_kind != "emulated" or nbytes <= 0:
            return 0.0
        return self.table("h2d_pinned")(nbytes)

    def h2d(self, nbytes: float) -> float:
        return self._copy(nbytes, "h2d_pinned")

    def d2h(self, nbytes: float) -> float:
        return self._copy(nbytes, "d2h_pinned")

    def _copy(self, nbytes: float, table: str) -> float:
        """One copy: over the emulated link by the deadline rule of runtime/transfer.py
        (latency + bytes / bandwidth), else the profile's pinned-copy table."""
        if nbytes <= 0:
            return 0.0
        if self.link:
            bw, latency = self.link
            return latency + nbytes / bw
        return self.table(table)(nbytes)

    def _transit(self, nbytes: float) -> float:
        """Gathered K and V crossing the emulated link: two copies (latency each) of `nbytes` in all."""
        bw, latency = self.link
        return 2 * latency + nbytes / bw

    def gather(self, nbytes: float, mode: str = "host", over_link: bool = True) -> float:
        """Fetch scattered 16-bit rows from host memory (`policy.gather`):
        - host: index_select into a staging buffer + one copy, by the gather table's own row size
          (roofline: host gather rate + the link);
        - device: a device kernel reads the rows from pinned host memory (UVA), no host pass:
          roofline at the link's rate; a measured GPU profile's `transfers.gather_device`; a CPU
          profile emulates it with the same index_select (there host and device are one memory),
          so it costs as `host`."""
        if nbytes <= 0:
            return 0.0
        _check_gather(mode)
        if self.analytic:
            return self.roofline.gather_device(nbytes) if mode == "device" else self.roofline.gather_host(nbytes)
        if mode == "device" and self.link_kind == "device":
            return _per_row(self.table("gather_device"), nbytes)
        rows = _per_row(self.table("gather"), nbytes)
        if self.link and over_link:   # the gathered K and V then cross the emulated link
            rows += self._transit(nbytes)
        return rows

    def gather_split(self, nbytes: float, mode: str = "host") -> tuple[float, float]:
        """`gather` as (compute-thread seconds, link seconds). Over an emulated link on a CPU box
        the runtime's fetch (runtime/kv/specache.py `fetch`) index_selects the rows into staging
        and memcpys them on the caller's thread (the gather table's own measurement: index_select
        + one copy); only the transit waits for the link (two copies, K and V: latency + bytes /
        bandwidth each). Elsewhere the whole gather is one op on the link's engine (a GPU's copy
        engines; without emulation, `engine("h2d")` is the compute thread anyway)."""
        if nbytes <= 0:
            return 0.0, 0.0
        if self.link_kind != "emulated" or self.analytic:
            return 0.0, self.gather(nbytes, mode)
        _check_gather(mode)
        return _per_row(self.table("gather"), nbytes), self._transit(nbytes)
