"""The README's Ray launcher command on a local cluster (`ray start --head`): a 3-point sweep.
slow (starts a Ray head, ~30 s on the 2-core box); skipped where hydra-ray-launcher is not installed
(pip install -e ".[ray]")."""
import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("hydra_plugins.hydra_ray_launcher")

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_three_point_sweep_on_local_ray_cluster(tmp_path):
    port = _free_port()
    ray_tmp = Path("/tmp") / f"kvt-ray-{os.getpid()}"      # Ray's socket paths must stay short
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}", "PYTHONWARNINGS": "ignore"}
    head = subprocess.Popen(["ray", "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false", f"--temp-dir={ray_tmp}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 90
        while subprocess.run(["ray", "status", f"--address=127.0.0.1:{port}"], env=env,
                             capture_output=True).returncode != 0:
            assert head.poll() is None, "ray start --head exited"
            assert time.time() < deadline, "the Ray head did not come up in 90 s"
            time.sleep(2)
        # the README's command, as written there
        p = subprocess.run([sys.executable, "-m", "simulator.run", "-m", "hydra/launcher=ray_local", "model=tiny",
                            "policy=specache", "policy.k=0,16,64", f"results_dir={tmp_path}"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        assert p.returncode == 0, p.stderr[-2000:]
        (sweep,) = (tmp_path / "simulated" / "sweeps").glob("*.csv")
        rows = list(csv.DictReader(sweep.open()))
        assert sorted(int(r["job"]) for r in rows) == [0, 1, 2]
        assert all(r["error"] == "" and float(r["throughput_tok_s"]) > 0 for r in rows)
    finally:
        head.send_signal(signal.SIGTERM)          # ray start --block stops the cluster it started
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
