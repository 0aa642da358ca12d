"""GPU-check helper: ``torchrun tools/megatron_lm_runner.py PATH/pretrain_gpt.py [Megatron-LM args]``.

Runs Megatron-LM's script exactly as ``python -m megatron_patch.run`` does, with one difference that only the
GPU kit needs: the megatron-core wheel ships the dataset helpers prebuilt but not their Makefile, so rank 0's
``compile_helpers()`` (``make -C megatron/core/datasets``) would fail and exit; it is made a no-op here.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_patch.run import main  # noqa: E402


def use_prebuilt_helpers() -> None:
    import megatron.core.datasets.utils as dataset_utils

    def prebuilt() -> None:
        import megatron.core.datasets.helpers_cpp  # noqa: F401 - fails loudly if the wheel's helpers are missing

    dataset_utils.compile_helpers = prebuilt


if __name__ == "__main__":
    main(sys.argv[1:], prepare=use_prebuilt_helpers)
