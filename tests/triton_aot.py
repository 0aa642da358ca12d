"""Compile every Triton kernel variant the backend can launch, ahead of time, for a CUDA target (no GPU needed:
Triton's wheel carries the NVIDIA backend and ptxas). Run as a script without TRITON_INTERPRET (under the
interpreter ``triton.jit`` does not build compilable functions). Prints one line per variant; exit 1 on the
first kernel the compiler refuses, with its error (the interpreter accepts code the compiler does not: globals
that are not constexpr, names bound to different types in the branches of a runtime ``if``). The stochastic-
rounding variants of the update are compiled as the backend launches them (enable_fp_fusion=False), and their
PTX must hold no fused multiply-add: (W decay) - (alpha u) is rounded once per operation on every backend.

    python tests/triton_aot.py [capability, default 90 (H100/H200)]
"""

from __future__ import annotations

import itertools
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from sinkgd_ds.backends import triton_kernels as k  # noqa: E402
from sinkgd_ds.backends.triton_backend import TritonBackend  # noqa: E402

I64, F32, I32 = "*i64", "*fp32", "*i32"
PASS_ARGS = {"mats": I64, "segs": I64, "targets": F32, "progs": I64, "prows": I64, "partial": F32, "rowsum": F32,
             "colsum": F32, "flags": I32}


def variants():
    (rbr, rbc), (cbr, cbc), block = TritonBackend.ROW_TILE, TritonBackend.COL_TILE, TritonBackend.APPLY_BLOCK
    for have, emit in itertools.product((False, True), repeat=2):
        yield k.row_pass, PASS_ARGS, {"HAVE_COL": have, "EMIT": emit, "BR": rbr, "BC": rbc}
    for have in (False, True):
        yield k.col_pass, {**PASS_ARGS, "use_partial": "i32"}, {"HAVE_ROW": have, "BR": cbr, "BC": cbc}
    for have_row, have_col in ((True, True), (True, False), (False, True)):
        yield (k.finish_pass, {"mats": I64, "targets": F32, "row_progs": I64, "col_progs": I64, "rowsum": F32,
                               "colsum": F32, "flags": I32, "n_row_progs": "i32"},
               {"HAVE_ROW": have_row, "HAVE_COL": have_col, "BR": rbr, "BC": cbc})
    for gate, decay, stochastic in itertools.product((0, 1, 2), (False, True), (False, True)):
        yield (k.apply_pass, {"mats": I64, "segs": I64, "progs": I64, "gate": F32, "flags": I32, "decay": "fp32",
                              "alpha": "fp32", "seed": "i32", "step": "i32"},
               {"GATE": gate, "USE_DECAY": decay, "STOCHASTIC": stochastic, "BLOCK": block})


def main() -> int:
    target = GPUTarget("cuda", int(sys.argv[1]) if len(sys.argv) > 1 else 90, 32)
    for fn, args, consts in variants():
        src = ASTSource(fn=fn, signature={**args, **{name: "constexpr" for name in consts}}, constexprs=consts)
        stochastic = consts.get("STOCHASTIC", False)
        try:
            compiled = triton.compile(src, target=target, options={"enable_fp_fusion": False} if stochastic else None)
        except Exception as e:  # noqa: BLE001 - reported with the variant
            print(f"FAILED {fn.__name__} {consts}: {e}")
            return 1
        if stochastic and "fma." in compiled.asm["ptx"]:
            print(f"FAILED {fn.__name__} {consts}: fused multiply-add in the PTX of a stochastic-rounding variant")
            return 1
        print(f"ok {fn.__name__} {consts} cubin {len(compiled.asm['cubin'])} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
