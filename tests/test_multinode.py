"""Several nodes, tested on this machine: two Linux network namespaces joined by a veth pair are two "nodes"
with their own addresses. launch/run_multinode.sh (torchrun's static rendezvous, the deepspeed launcher with
--no_ssh --node_rank, and Open MPI's mpirun started on node 0 with an rsh agent that enters the other node,
tests/jobs/netns_rsh.sh) runs the main job, ZeRO-2 SinkGD, with one and with two ranks per node; it must equal
a one-node run of the same world size bit for bit, and a run stopped on two nodes resumes on one.

The namespaces and addresses are created here, used only by this test and removed after it. Creating them
needs root (CAP_NET_ADMIN): without it the test is skipped with that reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .distributed import free_port

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--deepspeed_config", "configs/zero2_sinkgd.json", "--model", "tiny", "--steps", "4", "--set", "eval.every=2",
        "--set", "eval.sequences=4", "--set", "checkpoint.every=0", "--set", "train.log_every=1", "--no_progress"]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
       "VENV": str(Path(sys.executable).parent.parent)}


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


@pytest.fixture
def two_nodes():
    """Namespaces A and B, veth ends both named sgd0, addresses 10.231.N.1 and .2 (N from the pid)."""
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2) to create network namespaces with")
    tag = f"sgd{os.getpid() % 100000}"
    names, net = (f"{tag}a", f"{tag}b"), f"10.231.{os.getpid() % 200 + 20}"
    made = []
    try:
        for ns in names:
            r = _ip("netns", "add", ns)
            if r.returncode != 0:
                pytest.skip(f"cannot create network namespaces here (needs root / CAP_NET_ADMIN): {r.stderr.strip()}")
            made.append(ns)
        steps = [("link", "add", f"{tag}x", "netns", names[0], "type", "veth", "peer", "name", f"{tag}y", "netns",
                  names[1]),
                 ("-n", names[0], "link", "set", f"{tag}x", "name", "sgd0"),
                 ("-n", names[1], "link", "set", f"{tag}y", "name", "sgd0"),
                 ("-n", names[0], "addr", "add", f"{net}.1/24", "dev", "sgd0"),
                 ("-n", names[1], "addr", "add", f"{net}.2/24", "dev", "sgd0")]
        steps += [("-n", ns, "link", "set", dev, "up") for ns in names for dev in ("lo", "sgd0")]
        for step in steps:
            r = _ip(*step)
            assert r.returncode == 0, (step, r.stderr)
        yield names, f"{net}.1"
    finally:
        for ns in made:
            _ip("netns", "del", ns)  # (removes the veth pair with it)


def run_nodes(names, master: str, out: Path, extra: list[str], launcher: str = "torchrun", nproc: int = 1) -> None:
    """The job on both "nodes": one launcher per node (torchrun, deepspeed), or mpirun on node 0 alone."""
    port = str(free_port())
    procs = []
    nodes = f"{master} {master[:-1]}2" if launcher == "mpirun" else "node0 node1"
    for rank, ns in enumerate(names[:1] if launcher == "mpirun" else names):
        env = {**ENV, "NNODES": "2", "NODE_RANK": str(rank), "MASTER_ADDR": master, "MASTER_PORT": port,
               "NPROC": str(nproc), "GLOO_SOCKET_IFNAME": "sgd0", "LAUNCHER": launcher, "NODES": nodes,
               "MPI_RSH_AGENT": str(ROOT / "tests/jobs/netns_rsh.sh")}
        cmd = ["ip", "netns", "exec", ns, "env", *(f"{k}={v}" for k, v in env.items() if k in (
            "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC", "GLOO_SOCKET_IFNAME", "LAUNCHER", "NODES",
            "MPI_RSH_AGENT")), "bash", "launch/run_multinode.sh", *ARGS, "--out", str(out), *extra]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-3000:]


def one_node(out: Path, nproc: int, extra: list[str]) -> dict:
    proc = subprocess.run(["bash", "launch/run_torchrun.sh", *ARGS, "--out", str(out), *extra], cwd=ROOT,
                          env={**ENV, "NPROC": str(nproc), "MASTER_PORT": str(free_port())}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return summary(out)


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_two_nodes_equal_one_node_and_resume_across_node_counts(two_nodes, tmp_path):
    names, master = two_nodes
    ref = one_node(tmp_path / "one", 2, [])
    for launcher in ("torchrun", "deepspeed"):
        out = tmp_path / launcher
        run_nodes(names, master, out, [], launcher)
        got = summary(out)
        assert got["world"] == 2 and got["losses"] == ref["losses"] and got["val"] == ref["val"], launcher
    # stopped on two nodes after step 2, resumed on one node (same world size: the ZeRO-2 checkpoint loads)
    cut = tmp_path / "cut"
    run_nodes(names, master, cut, ["--stop_at_step", "2"])
    assert summary(cut)["step"] == 2
    resumed = one_node(cut, 2, ["--resume"])
    assert resumed["resumed_from"] == 2 and resumed["losses"] == ref["losses"]


def test_two_ranks_per_node_with_torchrun_and_mpirun_equal_one_node(two_nodes, tmp_path):
    """2 nodes x 2 ranks (micro batch 2 so the batch of 8 splits over 4 ranks) against 4 ranks on one node."""
    names, master = two_nodes
    ref = one_node(tmp_path / "one", 4, ["--micro_batch", "2"])
    for launcher in ("torchrun", "mpirun"):
        out = tmp_path / launcher
        run_nodes(names, master, out, ["--micro_batch", "2"], launcher, nproc=2)
        got = summary(out)
        assert got["world"] == 4 and got["losses"] == ref["losses"] and got["val"] == ref["val"], launcher
