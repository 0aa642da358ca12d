"""Session setup shared by every test module.

Triton's interpreter runs the Triton backend's kernels on CPU tensors, which is how they are tested on
machines without a GPU; it must be chosen before anything imports triton (torch.compile does), so it is
set here, first. On a CUDA machine the kernels are compiled and run on the GPU instead.
"""

from __future__ import annotations

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


_SESSION_START = None


def pytest_sessionstart(session):
    global _SESSION_START
    import time

    _SESSION_START = time.time()


def pytest_sessionfinish(session, exitstatus):
    """Remove the DeepSpeed CPU allreduce buffers this session's jobs left in /dev/shm (66 MB per rank and run:
    DeepSpeed 0.19.8 never unlinks them; test workers and killed ranks do not reach launch/runstate.leave)."""
    import glob

    from launch.runstate import deepspeed_shm_prefix

    for path in glob.glob(f"{deepspeed_shm_prefix()}*"):
        try:
            if _SESSION_START is not None and os.stat(path).st_mtime >= _SESSION_START - 1:
                os.unlink(path)
        except OSError:
            pass
