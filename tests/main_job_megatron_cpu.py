"""TEST-ONLY wrapper: run launch/pretrain_megatron.py on CPU ranks under tests/megatron_cpu_shim.py.

    torchrun --nproc_per_node 2 tests/main_job_megatron_cpu.py --model tiny --tp 2 ...

The launch script knows nothing of the shim: this wrapper installs it right after the script's own
``initialize_model_parallel`` (the shim's precondition), then runs the script as ``__main__``.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "launch" / "pretrain_megatron.py"
sys.path.insert(0, str(ROOT))

from megatron.core import parallel_state  # noqa: E402

from tests import megatron_cpu_shim  # noqa: E402

_initialize = parallel_state.initialize_model_parallel


def _initialize_then_shim(*args, **kwargs):
    out = _initialize(*args, **kwargs)
    megatron_cpu_shim.install()
    return out


parallel_state.initialize_model_parallel = _initialize_then_shim
sys.argv = [str(SCRIPT), *sys.argv[1:]]
runpy.run_path(str(SCRIPT), run_name="__main__")
