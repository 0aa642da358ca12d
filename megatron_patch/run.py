"""``python -m megatron_patch.run pretrain_gpt.py [Megatron-LM args]``: run a Megatron-LM training script
with SinkGD / SCALE / SWAN available (``--optimizer sinkgd --sinkgd-iters 5 --sinkgd-lr-scale 0.05``).

Equivalent to adding ``import megatron_patch; megatron_patch.apply()`` at the top of the script.
"""

from __future__ import annotations

import os
import runpy
import sys


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or not argv[0].endswith(".py"):
        raise SystemExit("usage: python -m megatron_patch.run SCRIPT.py [args ...]  (e.g. pretrain_gpt.py)")
    script = os.path.abspath(argv[0])
    sys.path.insert(0, os.path.dirname(script))  # the script's own imports (megatron.training, gpt_builders)
    import megatron_patch

    megatron_patch.apply(training=True)
    sys.argv = [script, *argv[1:]]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
