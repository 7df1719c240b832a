"""The requests runtime.serve replays, as they become visible on its clock.

`ServedRequest` is the simulator's `core.workload.Request` plus the prompt tokens, the tokens
generated (and when each came) and the cohort it ran in; `Arrivals` releases the workload's requests at their arrival
times (open arrivals) or as the closed loop's users send them. How: docs/runtime.md.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np
import torch

from core.workload import Lengths, Request, open_arrivals


@dataclass
class ServedRequest(Request):
    """A simulator `Request` plus what the runtime needs and produces for it."""
    prompt: list[int] = field(default_factory=list, repr=False)
    tokens: list[int] = field(default_factory=list, repr=False)
    token_times: list[float] = field(default_factory=list, repr=False)   # each token's time on the replay's clock
    cohort: int = -1

    @property
    def finished(self) -> bool:
        return self.generated >= self.gen_len


class Arrivals:
    """The workload's requests as they become visible: open (static / poisson / gamma / trace: all known
    up front) or closed (`users` clients, each sending its next request `think_s` after its last one
    completed, as the simulator's `Sim.user`). Prompt tokens are seeded random ids drawn in request
    creation order (a static batch with fixed lengths gets exactly runtime.bench's prompts)."""

    def __init__(self, w, args, check):
        self.w, self.check = w, check
        special = {args.bos_id, args.eos_id, args.pad_id}
        self.low = max(special) + 1 if max(special) + 1 < args.vocab_size else 0
        self.vocab = args.vocab_size
        self.g = torch.Generator().manual_seed(int(w.seed))
        self.heap: list[tuple[float, int, ServedRequest]] = []
        self.seq = 0
        self.closed = w.arrival == "closed"
        if self.closed:
            self.total = int(w.n_requests)
            self.made = 0
            self.lengths = Lengths(w, np.random.default_rng(w.seed))
            for _ in range(w.users):
                self._make(0.0)
        else:
            reqs = open_arrivals(w)
            self.total = len(reqs)
            for r in reqs:
                self._push(r)

    def _push(self, r: Request) -> None:
        self.check(r)
        s = ServedRequest(r.id, r.arrival_s, r.prompt_len, r.gen_len, reserved=r.reserved,
                           reserved_host=r.reserved_host)
        s.prompt = torch.randint(self.low, self.vocab, (s.prompt_len,), generator=self.g).tolist()
        heapq.heappush(self.heap, (s.arrival_s, self.seq, s))      # ties: creation order
        self.seq += 1

    def _make(self, t: float) -> None:
        if self.made < self.total:
            self._push(Request(self.made, t, *self.lengths.pair()))
            self.made += 1

    def due(self, now: float) -> list[ServedRequest]:
        out = []
        while self.heap and self.heap[0][0] <= now:
            out.append(heapq.heappop(self.heap)[2])
        return out

    def next_time(self) -> float | None:
        return self.heap[0][0] if self.heap else None

    def completed(self, r: ServedRequest, now: float) -> None:
        if self.closed:
            self._make(now + float(self.w.think_s))

    @property
    def exhausted(self) -> bool:
        return not self.heap and (not self.closed or self.made >= self.total)
