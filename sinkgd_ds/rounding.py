"""Stochastic rounding of updates written into bf16 tensors: the reference, in plain torch.

Pure-bf16 training loses updates smaller than half a bf16 step of the weight: round-to-nearest maps
``1.0 - 1e-4`` back to ``1.0`` every time. Stochastic rounding rounds up with probability equal to the
fraction that round-to-nearest would drop, so the *expected* weight follows the exact update.

The rounding: add a uniform random 16-bit integer to the low 16 bits of the fp32 result's bit pattern and
keep the high 16 bits (NaN becomes the canonical quiet NaN 0x7FC0; inf stays inf; a finite value at the top
of the range may round up to inf, as round-to-nearest does near it).

The random bits come from a counter-based hash, so they need no RNG state and no optimizer state tensor:
they are a function of (seed, step, matrix, element). The element is its index in the *logical* matrix
(global row * global columns + global column), and the matrix is a CRC-32 of its name, so a matrix gets the
same bits in every layout (dense, ZeRO flat cuts mid-row, tensor-parallel slices, DTensor shards) and every
resume point. The native kernels (``sinkgd_ds.kernels``) and the Triton kernels
(``sinkgd_ds.backends.triton_kernels``) implement the same functions in uint32 arithmetic and are tested
against these bit for bit; here values are int64 tensors kept in [0, 2^32) (products are split so that
nothing overflows).

The fp32 value that is rounded is, for every backend and writer of a bf16 weight w with update u:
``y = (w * decay) - (alpha * u)``, each operation rounded once in fp32 (no fused multiply-add).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

__all__ = ["StochasticRounding", "flat_indices", "fmix32", "matrix_key", "random16", "stochastic_round_bf16",
           "stream_key", "update_target"]

MASK32 = 0xFFFFFFFF
SEED_LIMIT = 2**31  # seeds and step counters enter the kernels as int32 (the counter's low 31 bits)
_GOLDEN = 0x9E3779B9  # (any odd constant: keeps seed 0 from hashing a zero word)


def _mul32(h, c: int):
    """(h * c) mod 2^32 for 0 <= h < 2^32, without int64 overflow: c is split into 16-bit halves."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def fmix32(h):
    """MurmurHash3's 32-bit finaliser (a bijection of [0, 2^32) with full avalanche); int or int64 tensor."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def stream_key(seed: int, step: int, matrix: int) -> int:
    """The 32-bit key of one matrix at one step: every word passes through the finaliser in turn."""
    return fmix32(fmix32(fmix32((seed % SEED_LIMIT) ^ _GOLDEN) ^ (step % SEED_LIMIT)) ^ (matrix & MASK32))


def random16(stream: int, index: torch.Tensor) -> torch.Tensor:
    """Uniform 16-bit values (int64 in [0, 2^16)) for the elements ``index`` (int64, >= 0) of a stream.

    The index's two 32-bit halves enter apart; the key enters twice (xor, then add) so that two streams never
    give the same values to elements whose indices differ by the streams' xor."""
    h = fmix32((index & MASK32) ^ stream)
    h = fmix32((h + ((index >> 32) ^ stream)) & MASK32)
    return h >> 16


def stochastic_round_bf16(y: torch.Tensor, r16: torch.Tensor) -> torch.Tensor:
    """fp32 ``y`` to bf16: ``r16`` (int64 in [0, 2^16)) added to its bit pattern, the low 16 bits dropped."""
    u = y.float().view(torch.int32).to(torch.int64) & MASK32
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    bits = torch.where(nan, 0x7FC0, (u + r16) >> 16)  # (NaNs excluded, u + r16 < 2^32: no carry out)
    return (bits - ((bits & 0x8000) << 1)).to(torch.int16).view(torch.bfloat16)


def update_target(w: torch.Tensor, update: torch.Tensor, decay: float, alpha: float) -> torch.Tensor:
    """y = (w * decay) - (alpha * update) in fp32, one rounding per operation (the value every backend
    rounds). ``update`` (fp32) is consumed."""
    x = w.to(torch.float32, copy=True)
    if decay != 1.0:
        x.mul_(decay)
    return x.sub_(update.mul_(alpha))


def matrix_key(name: str) -> int:
    """A matrix's identity in the hash: CRC-32 of its name (the same on every rank, layout and resume)."""
    return zlib.crc32(name.encode())


def flat_indices(local_shape: tuple[int, ...], global_shape: tuple[int, ...], offset: tuple[int, ...], start: int,
                 end: int, device: torch.device | None = None) -> torch.Tensor:
    """Logical indices of elements [start, end) of a row-major box ``local_shape`` that sits at ``offset`` in a
    row-major ``global_shape``: the position each element has in the full tensor."""
    k = torch.arange(start, end, dtype=torch.int64, device=device)
    if tuple(local_shape) == tuple(global_shape):
        return k
    index, stride = torch.zeros_like(k), 1
    for d in reversed(range(len(global_shape))):
        index += (k % local_shape[d] + offset[d]) * stride
        k = k // local_shape[d]
        stride *= global_shape[d]
    return index


@dataclass(frozen=True)
class StochasticRounding:
    """How one step rounds updates written into bf16 tensors: the optimizer's seed and the step counter
    (``None`` in its place means round-to-nearest)."""

    seed: int
    step: int

    def stream(self, matrix: int) -> int:
        return stream_key(self.seed, self.step, matrix)

    @property
    def words(self) -> tuple[int, int]:
        """(seed, step) as the kernels take them: int32 values."""
        return self.seed % SEED_LIMIT, self.step % SEED_LIMIT
