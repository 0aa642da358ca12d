"""Optional native CPU kernels for the Sinkhorn engine (``sinkgd_ds.sinkhorn``).

The C++ source (``_cpu_source.py``) has a plain C ABI and no torch headers, so it builds in a couple of
seconds with the system C++ compiler; the shared library is cached (keyed by source, flags and CPU)
and loaded with ctypes. Nothing here is required: when no compiler is found or the build fails, one
warning is logged and the engine keeps using its pure-torch path, which stays the reference.

Environment:
  SINKGD_DS_KERNELS=0          never use the kernels (pure torch everywhere)
  SINKGD_DS_KERNEL_CACHE=DIR   where the built library lives (default ~/.cache/sinkgd_ds/kernels)
  SINKGD_DS_KERNEL_SPREAD=0    all threads on each local matrix in turn (default 1: whole matrices are
                               spread over the threads, which needs no barrier inside a matrix)
  CXX                          compiler to use (default: c++, g++, clang++ on PATH)

Prebuild (e.g. in a setup script): ``python -m sinkgd_ds.kernels`` (prints the library path).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from ._cpu_source import SOURCE

log = logging.getLogger("sinkgd_ds")

__all__ = ["available", "build", "library_path", "set_enabled", "supports", "DTYPE_CODES"]

ABI_VERSION = 7
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
_FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-fopenmp"],
    ["-O3"],  # e.g. Apple clang without libomp: serial, still one pass per iteration
)
_COMMON = ["-std=c++17", "-fPIC", "-shared", "-ffp-contract=off"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
# 1: spread whole matrices over the threads (no barriers inside a matrix); 0: all threads on each matrix
SPREAD = int(os.environ.get("SINKGD_DS_KERNEL_SPREAD", "1"))
_enabled = os.environ.get("SINKGD_DS_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def set_enabled(flag: bool) -> bool:
    """Turn the kernels on/off for this process (tests compare both paths). Returns the previous value."""
    global _enabled
    prev, _enabled = _enabled, bool(flag)
    return prev


def _cache_dir() -> Path:
    env = os.environ.get("SINKGD_DS_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sinkgd_ds" / "kernels"


def _cpu_fingerprint() -> str:
    """-march=native code must not run on another CPU that shares the cache: key it by the CPU."""
    parts = [platform.machine(), platform.system()]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features")):
                    parts.append(line.strip())
                if line.strip() == "":
                    break
    except OSError:
        parts.append(platform.processor())
    return "\n".join(parts)


def _compiler() -> str | None:
    for cand in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _key(cxx: str, flags: list[str]) -> str:
    h = hashlib.sha256()
    for part in (SOURCE, " ".join(flags + _COMMON), cxx, _cpu_fingerprint(), str(ABI_VERSION)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def library_path() -> Path | None:
    """Where the library for this source/CPU is (or would be) cached, for the first flag set."""
    cxx = _compiler()
    return None if cxx is None else _cache_dir() / f"sinkgd_cpu_{_key(cxx, _FLAG_SETS[0])}.so"


def _compile(cxx: str, flags: list[str], out: Path) -> str | None:
    """Build into ``out`` atomically (concurrent ranks may race; os.replace makes the last one win)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
        src = Path(tmp) / "sinkgd_cpu.cpp"
        src.write_text(SOURCE)
        tmp_so = Path(tmp) / out.name
        proc = subprocess.run([cxx, *flags, *_COMMON, str(src), "-o", str(tmp_so)], capture_output=True, text=True)
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout or "?").strip().splitlines()
            return lines[-1] if lines else "?"
        os.replace(tmp_so, out)
    return None


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.sk_abi_version.restype = i32
    lib.sk_has_openmp.restype = i32
    lib.sk_normalize.argtypes = [p, i32, i64, i64, p, i64, i64, p, i64, f32, p, p, p, i32]
    lib.sk_normalize.restype = i32
    lib.sk_normalize_many.argtypes = [i64, p, p, p, p, p, i64, i32, i32, p]
    lib.sk_normalize_many.restype = i32
    lib.sk_row_partial.argtypes = [p, i32, i64, i64, p, p, i32]
    lib.sk_row_partial.restype = i32
    lib.sk_col_partial.argtypes = [p, i32, i64, i64, p, p, i32]
    lib.sk_col_partial.restype = i32
    lib.sk_apply.argtypes = [p, i32, p, i32, i64, i64, p, p, f32, f32, i32, i32]
    lib.sk_apply.restype = i32
    lib.sk_apply_many.argtypes = [i64, p, f32, f32, i32, i32, i64, i64, i32]
    lib.sk_apply_many.restype = i32
    lib.sk_step_many.argtypes = [i64, p, p, p, p, p, i64, i32, i32, p, i64, p, f32, f32, i32, i32, i64, i64, i32]
    lib.sk_step_many.restype = i32
    lib.sk_fused_many.argtypes = [i64, p, p, p, p, p, i64, i32, i32, p, p, p, f32, f32, i32, i32, i64, i64]
    lib.sk_fused_many.restype = i32
    if lib.sk_abi_version() != ABI_VERSION:
        raise OSError("stale kernel library (ABI version mismatch)")
    return lib


def build(force: bool = False, verbose: bool = False) -> Path | None:
    """Build (or find in the cache) and load the library. Returns its path, None when unavailable."""
    global _lib, _tried
    with _lock:
        if _lib is not None and not force:
            return Path(_lib._name)
        _tried = True
        cxx = _compiler()
        if cxx is None:
            log.warning("sinkgd_ds: no C++ compiler found (set CXX); using the slower pure-torch Sinkhorn path")
            return None
        errors = []
        for flags in _FLAG_SETS:
            path = _cache_dir() / f"sinkgd_cpu_{_key(cxx, flags)}.so"
            try:
                if force or not path.exists():
                    if verbose:
                        print(f"[sinkgd_ds] building {path} with {cxx} {' '.join(flags)}")
                    err = _compile(cxx, flags, path)
                    if err is not None:
                        errors.append(f"{' '.join(flags)}: {err}")
                        continue
                _lib = _declare(ctypes.CDLL(str(path)))
                return path
            except OSError as e:  # unwritable cache, unloadable library, ...
                errors.append(f"{' '.join(flags)}: {e}")
        log.warning("sinkgd_ds: building the CPU kernels failed (%s); using the slower pure-torch Sinkhorn path",
                    errors[-1] if errors else "?")
        return None


def lib() -> ctypes.CDLL | None:
    """The loaded library, building it on first use; None when disabled or unavailable."""
    if not _enabled:
        return None
    if _lib is None and not _tried:
        build()
    return _lib


def available() -> bool:
    return lib() is not None


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def supports(t: torch.Tensor) -> bool:
    """Tensors the kernels take: plain (not a subclass such as a DTensor, whose data_ptr is not its data), CPU,
    fp32 or bf16, contiguous, with storage. Anything else goes to the torch path."""
    return type(t) in _PLAIN and t.is_cpu and t.dtype in DTYPE_CODES and t.is_contiguous() and t.data_ptr() != 0


def num_threads(numel: int) -> int:
    """torch's intra-op thread count, fewer for small work (a team costs a few microseconds)."""
    return max(1, min(torch.get_num_threads(), numel >> 15))
