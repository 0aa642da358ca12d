"""Our JSON under ``mpirun`` (Open MPI + mpi4py), no other launcher: OddLM at ZeRO 1-3 with SinkGD and SCALE.

Ranks come from MPI itself (mpi4py's COMM_WORLD); rank 0 picks a free loopback port and broadcasts
it, so DeepSpeed's own MPI discovery (which picks a non-loopback address) is not needed. Rank 0 saves
the per-config results, which tests/test_frontends.py compares with the dense reference.
"""

from __future__ import annotations

import os
import socket
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from tests.jobs.teardown import leave  # noqa: E402


def env_from_mpi() -> tuple[int, int]:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    port = None
    if comm.Get_rank() == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    port = comm.bcast(port, root=0)
    local = os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", str(comm.Get_rank()))
    os.environ.update(RANK=str(comm.Get_rank()), WORLD_SIZE=str(comm.Get_size()), LOCAL_RANK=local,
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return comm.Get_rank(), comm.Get_size()


def main() -> None:
    rank, world = env_from_mpi()
    from tests.ds_worker import ds_config, run_configs

    configs = [(f"{opt}-z{stage}", ds_config(opt, stage, world), {})
               for opt in ("SinkGD", "SCALE") for stage in (1, 2, 3)]
    results = run_configs(rank, world, configs)
    if rank == 0:
        torch.save(dict(world=world, results=results), sys.argv[1])
    from mpi4py import MPI

    leave(before_exit=MPI.Finalize)  # (in about 3 of 10 runs a rank aborted at exit without it)


if __name__ == "__main__":
    main()
