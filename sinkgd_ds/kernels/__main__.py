"""Prebuild the CPU kernels into the cache: ``python -m sinkgd_ds.kernels [--force]``. Exit 1 if unavailable."""

from __future__ import annotations

import sys

from . import build


def main() -> int:
    path = build(force="--force" in sys.argv[1:], verbose=True)
    if path is None:
        print("[sinkgd_ds] CPU kernels unavailable; the pure-torch path will be used")
        return 1
    print(f"[sinkgd_ds] CPU kernels ready: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
