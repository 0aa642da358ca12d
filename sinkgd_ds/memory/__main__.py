"""``python -m sinkgd_ds.memory``: the memory model from the command line.

    python -m sinkgd_ds.memory --model 1b --engine zero2 --world 8 --precision bf16
    python -m sinkgd_ds.memory --model tiny --vocab 4096 --optimizer scale --engine megatron-distopt --world 2
    python -m sinkgd_ds.memory --model 7b --engine zero3 --world 64 --gpu-memory-gib 80 --activation-gib 20
    python -m sinkgd_ds.memory --table > tables.md        # the tables of docs/memory.md

Prints bytes per parameter and GiB per rank by category (the keys of ``sinkgd_ds.memory.account``) with the
optimizers side by side, then the largest LLaMA of the papers' shape family that fits ``--gpu-memory-gib`` next
to the stated ``--activation-gib`` budget. Bad input exits with status 2 and a message naming the option.
"""

from __future__ import annotations

import argparse
import math
import sys

from .model import ENGINES, OPTIMIZERS, PRECISIONS, Setup
from .report import fit_table, markdown_tables, side_by_side
from .shapes import ShapeError, load_shape


class UsageError(ValueError):
    """Bad command-line input; the message names the option, the value and what is allowed."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m sinkgd_ds.memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="60m", help="tiny | 60m | 130m | 350m | 1b | 7b (configs/models), 13b | 33b "
                    "| 65b, or a JSON run config (default %(default)s)")
    ap.add_argument("--vocab", default=None, help="vocabulary size (default: the config's data.vocab_size; the job "
                    "uses its tokenizer's real size)")
    ap.add_argument("--optimizer", default="all", help="all | " + " | ".join(OPTIMIZERS) + " (default all)")
    ap.add_argument("--engine", default="zero1", help=" | ".join(ENGINES) + " (default %(default)s)")
    ap.add_argument("--world", default="8", help="data-parallel ranks (default %(default)s)")
    ap.add_argument("--precision", default="bf16", help=" | ".join(PRECISIONS) + " (bf16: bf16 weights, fp32 "
                    "masters; default %(default)s)")
    ap.add_argument("--gpu-memory-gib", default="80", help="GPU memory for the fit search (default %(default)s)")
    ap.add_argument("--activation-gib", default="0", help="activation budget per rank, GiB (default %(default)s)")
    ap.add_argument("--table", action="store_true", help="print the Markdown tables of docs/memory.md and exit")
    return ap.parse_args(argv)


def number(option: str, text: str, kind: type, minimum: float, allow_equal: bool = True) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise UsageError(f"{option} {text!r} is not a{'n integer' if kind is int else ' number'}") from None
    if not math.isfinite(value) or value < minimum or (value == minimum and not allow_equal):
        bound = f">= {minimum:g}" if allow_equal else f"> {minimum:g}"
        raise UsageError(f"{option} {text!r} is not allowed; it must be {bound}")
    return value


def choice(option: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise UsageError(f"{option} {value!r} is not allowed; use one of {', '.join(allowed)}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.table:
            print(markdown_tables(), end="")
            return 0
        optimizer = choice("--optimizer", args.optimizer, ("all", *OPTIMIZERS))
        setup = Setup(OPTIMIZERS[0], choice("--engine", args.engine, ENGINES),
                      int(number("--world", args.world, int, 1)), choice("--precision", args.precision, PRECISIONS))
        vocab = None if args.vocab is None else int(number("--vocab", args.vocab, int, 1))
        gpu = number("--gpu-memory-gib", args.gpu_memory_gib, float, 0, allow_equal=False)
        activations = number("--activation-gib", args.activation_gib, float, 0)
        name, shape = load_shape(args.model, vocab)
    except (UsageError, ShapeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    optimizers = OPTIMIZERS if optimizer == "all" else (optimizer,)
    print(side_by_side(shape, name, setup, optimizers))
    print()
    print(fit_table(setup, gpu, activations, vocab, optimizers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
