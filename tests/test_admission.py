"""core/admission.py: the one set of admission rules that the SimPy scheduler and runtime.serve
both drive. One trace (everything arrives at t = 0, so the order is decided by the rules, not by
how fast either side runs) replayed through both: the same requests admitted in the same order,
in the same groups (a group = the requests prefilled together)."""
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from core.admission import Admission, Pool
from core.errors import ConfigError
from runtime import loaders
from runtime import serve
from simulator.costs import Costs
from simulator.policies import make_policy
from simulator.scheduler import Sim

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
PROFILE = ROOT / "profiles/cpu-intel-r-xeon-r-processor-2c.json"
LENGTHS = [(40, 6), (24, 3), (56, 8), (32, 4), (48, 5), (20, 7), (36, 2), (28, 3)]   # (prompt, gen)
KIVI = ["policy=kivi", "policy.bits=2", "policy.group_size=16", "policy.residual=16"]


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="serve", overrides=["model=tiny", *overrides])


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield loaders.from_config(_cfg().model, CPU)
    torch.set_num_threads(threads)


def groups(reqs, key) -> list[list[int]]:
    """Request ids in admission order, grouped by the iteration that admitted them."""
    out: dict = {}
    for r in sorted(reqs, key=lambda r: (r.admitted_s, r.id)):
        out.setdefault(key(r), []).append(r.id)
    return list(out.values())


@pytest.mark.parametrize("order", ["prefill_first", "decode_first"])
@pytest.mark.parametrize("policy", [["policy=full"], KIVI, ["policy=offload"]], ids=["full", "kivi2", "offload-host"])
def test_one_trace_same_admissions_in_simulator_and_runtime(tiny, tmp_path, order, policy):
    trace = tmp_path / "trace.csv"
    trace.write_text("arrival_s,prompt_len,gen_len\n" + "".join(f"0,{p},{g}\n" for p, g in LENGTHS))
    base = ["workload=trace", f"workload.trace={trace}", "scheduler.max_batch=3", f"scheduler.order={order}",
            "progress=false", *policy]
    cfg0 = _cfg(*base)
    shape = serve.kv_shape(tiny, cfg0.policy, CPU)
    twin = make_policy(cfg0.policy)
    # room for the two largest requests and a bit: the memory, not only max_batch, has to bind
    # (offload keeps its K/V on the host: there host memory binds, the device budget does not)
    on_host = "policy=offload" in policy
    room = sorted((twin.reserve_host_bytes if on_host else twin.reserve_bytes)(p + g, shape) for p, g in LENGTHS)
    budget = 10 ** 12 if on_host else room[-1] * 2 + 1000
    host = room[-1] * 2 + 1000 if on_host else None
    cfg = _cfg(*base, f"hardware.kv_budget_bytes={budget}", *([f"hardware.host_memory_bytes={host}"] if host else []))

    measured = serve.serve(tiny, cfg)
    costs = Costs.load(PROFILE, "tiny", allow_extrapolation=True)
    s = costs.shape
    costs.bind(s, s["n_layers"], shape.kv_elem)
    sim = Sim(costs, shape, twin, budget, max_batch=3, order=order, max_seq_len=tiny.args.max_seq_len,
              host_capacity=host)
    simulated = sim.run(cfg.workload)

    got_runtime = groups(measured.requests, key=lambda r: r.cohort)
    got_sim = groups(simulated, key=lambda r: r.admitted_s)
    assert got_runtime == got_sim
    assert sorted(i for g in got_sim for i in g) == list(range(len(LENGTHS)))
    assert max(len(g) for g in got_sim) <= 3 and len(got_sim) > 2      # max_batch and the budget both bound
    assert measured.max_batch_reached == sim.max_batch_reached


class R:
    def __init__(self, i, reserved, reserved_host=0):
        self.id, self.reserved, self.reserved_host = i, reserved, reserved_host


def test_rules_fifo_head_of_line_max_batch_and_host_memory():
    a = Admission(2, "prefill_first", Pool(100), Pool(10))
    for r in (R(0, 40), R(1, 70), R(2, 10)):
        a.arrive(r)
    assert [r.id for r in a.admit(0)] == [0]           # 1 does not fit; 2 would, but waits behind it (FIFO)
    a.release(R(0, 40))
    assert [r.id for r in a.admit(0)] == [1, 2]
    b = Admission(5, "prefill_first", Pool(100), Pool(10))
    for r in (R(0, 1, 6), R(1, 1, 6)):
        b.arrive(r)
    assert [r.id for r in b.admit(0)] == [0]           # host memory binds too
    c = Admission(5, "decode_first", Pool(100))
    c.arrive(R(0, 1))
    assert c.admit(1) == [] and [r.id for r in c.admit(0)] == [0]
    assert c.prefill_next([R(1, 1)], 0) and not c.prefill_next([], 0)
    with pytest.raises(ConfigError, match="scheduler.order='lifo'"):
        Admission(1, "lifo", Pool(1))
    with pytest.raises(ConfigError, match="scheduler.max_batch=0"):
        Admission(0, "prefill_first", Pool(1))
