"""``python -m megatron_patch.run pretrain_gpt.py [Megatron-LM args]``: run a Megatron-LM training script
with SinkGD / SCALE / SWAN available (``--optimizer sinkgd --sinkgd-iters 5 --sinkgd-lr-scale 0.05``).

Equivalent to adding ``import megatron_patch; megatron_patch.apply()`` at the top of the script. The script's
folder goes first on ``sys.path`` before anything imports ``megatron``, so a Megatron-LM checkout's
``megatron.core`` and ``megatron.training`` are used together even when another megatron-core is installed; a
mix of the two (which fails later in confusing ways) is refused with both paths.
"""

from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Callable


def megatron_roots() -> dict[str, str]:
    """Where each loaded part of megatron comes from (the folder holding its ``megatron`` package)."""
    roots = {}
    for part in ("megatron.core", "megatron.training"):
        module = sys.modules.get(part)
        if module is not None and getattr(module, "__file__", None):
            roots[part] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(module.__file__))))
    return roots


def check_one_megatron() -> None:
    roots = megatron_roots()
    if len(set(roots.values())) > 1:
        raise SystemExit("megatron_patch.run: megatron.core and megatron.training come from different places ("
                         + ", ".join(f"{k} from {v}" for k, v in roots.items()) + "); run the script of the "
                         "Megatron-LM checkout that matches the installed megatron-core, or uninstall one of them")


def main(argv: list[str] | None = None, prepare: Callable[[], None] | None = None) -> None:
    """``prepare`` (tools only) runs after the path is set and the patch applied, before the script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or not argv[0].endswith(".py"):
        raise SystemExit("usage: python -m megatron_patch.run SCRIPT.py [args ...]  (e.g. pretrain_gpt.py)")
    script = os.path.abspath(argv[0])
    if not os.path.isfile(script):
        raise SystemExit(f"megatron_patch.run: no such script {argv[0]!r}")
    loaded = sorted(m for m in sys.modules if m == "megatron" or m.startswith("megatron."))
    if loaded:
        raise SystemExit(f"megatron_patch.run: {loaded[0]} was imported before the script's folder could go first "
                         "on sys.path; run `python -m megatron_patch.run SCRIPT.py` directly")
    sys.path.insert(0, os.path.dirname(script))  # the script's own imports (megatron.training, gpt_builders)
    import megatron_patch

    megatron_patch.apply(training=True)
    check_one_megatron()
    if prepare is not None:
        prepare()
    sys.argv = [script, *argv[1:]]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
