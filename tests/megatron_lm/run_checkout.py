"""TEST-ONLY, by hand (not in CI, which cannot fetch Megatron-LM): a Megatron-LM checkout's own pretrain_gpt.py on
CPU, through ``megatron_patch.run`` exactly as a user runs it, with the CUDA->CPU fixture installed first::

    torchrun --nproc_per_node 2 tests/megatron_lm/run_checkout.py /path/to/Megatron-LM/pretrain_gpt.py <flags>

The script's folder goes first on sys.path (megatron_patch.run), so the checkout's megatron.core is the one used.
docs/megatron.md records what ran at core_v0.16.1.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_patch.run import main  # noqa: E402
from tests.megatron_lm import cuda_on_cpu  # noqa: E402  (imports torch only; before the checkout's own tests/)


def prepare() -> None:
    cuda_on_cpu.install()
    try:  # the legacy fused kernels (JIT-compiled CUDA) that 0.16.1's initialize loads
        import megatron.legacy.fused_kernels as fused_kernels

        fused_kernels.load = lambda *a, **k: None
    except ImportError:
        pass


if __name__ == "__main__":
    main(sys.argv[1:], prepare=prepare)
