"""TensorFlow's CPU floating-point environment: denormals flushed to zero, on every thread.

TensorFlow runs its CPU kernels with the x86 FTZ and DAZ bits set (eager and graph alike; measured
with tensorflow 2.21: ``1e-38 * 0.01``, and a conv of ``1e-38`` inputs, give exactly 0, and a
denormal operand reads as 0). PyTorch keeps IEEE denormals, which x86 cores handle in microcode,
tens of times slower per operation. :func:`flush_denormals` gives a block the official
environment: on the calling thread and on the OpenMP team that torch's CPU kernels (and oneDNN's)
run on, restored afterwards. Only values below ``FLT_MIN`` (1.2e-38) differ.

Where it shows: the real d0 checkpoint on real photos produces no denormal activation at all, but
randomly initialised deep variants do, in the zero padding of letterboxed images (d7x at 1536²:
~1 % of the backbone's late activations), and they cost our d7x forward 6.6 → 9.6 s (same run).

The bits are per thread (``torch.set_flush_denormal`` sets the calling thread's only), so on
x86-64 Linux the OpenMP runtime torch loaded (libgomp, or Intel's or LLVM's, which export the same
entry point) runs glibc's ``fesetmode`` on every thread of the caller's team through
``GOMP_parallel``: the C library's own call on each thread, no Python (~8 µs a block). Elsewhere
only the calling thread is set.
"""
from __future__ import annotations

import contextlib
import ctypes
import platform
import re
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

__all__ = ["flush_denormals", "flushes_denormals"]

_FTZ_DAZ = 0x8040  # MXCSR bits 15 (flush to zero) and 6 (denormals are zero)


class _FeMode(ctypes.Structure):
    """glibc's ``femode_t`` on x86-64: the x87 control word and MXCSR."""
    _fields_ = [("control_word", ctypes.c_ushort), ("reserved", ctypes.c_ushort), ("mxcsr", ctypes.c_uint)]


def _team_setmode():
    """``(GOMP_parallel, fesetmode, fegetmode)`` for x86-64 Linux, or None where any is missing."""
    if not (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")):
        return None
    try:
        libm = ctypes.CDLL("libm.so.6")
        setmode, getmode = libm.fesetmode, libm.fegetmode  # glibc >= 2.25
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if re.search(r"/lib[gi]?omp[^/]*\.so", line)}
    except (OSError, AttributeError):
        return None
    torch_lib = str(Path(torch.__file__).parent)
    for path in sorted(paths, key=lambda p: (not p.startswith(torch_lib), p)):  # torch's own runtime first
        try:
            parallel = ctypes.CDLL(path).GOMP_parallel  # already loaded: the same runtime, the same pools
        except (OSError, AttributeError):
            continue
        parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        parallel.restype = None
        getmode.argtypes = [ctypes.POINTER(_FeMode)]
        return parallel, ctypes.cast(setmode, ctypes.c_void_p), getmode
    return None


_TEAM = _team_setmode()


def flushes_denormals() -> bool:
    """Whether the calling thread flushes denormals now (``1e-38 · 0.01`` gives 0, as in TensorFlow)."""
    with np.errstate(under="ignore"):
        return bool(np.float32(1e-38) * np.float32(0.01) == 0)


@contextlib.contextmanager
def flush_denormals(device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the block in TensorFlow's CPU environment: FTZ + DAZ on this thread and its OpenMP team.

    A no-op off the CPU and where the calling thread flushes already (nested blocks, a user's own
    ``torch.set_flush_denormal(True)``). The threads' modes are restored on exit.
    """
    if torch.device(device).type != "cpu" or flushes_denormals():
        yield
        return
    if _TEAM is None:  # the calling thread only
        if not torch.set_flush_denormal(True):
            yield  # this CPU cannot flush
            return
        try:
            yield
        finally:
            torch.set_flush_denormal(False)
        return
    parallel, setmode, getmode = _TEAM
    saved = _FeMode()
    getmode(ctypes.byref(saved))
    flush = _FeMode.from_buffer_copy(saved)
    flush.mxcsr |= _FTZ_DAZ
    # the caller is the team's master and runs fesetmode too; the team is the one torch's kernels get
    parallel(setmode, ctypes.addressof(flush), torch.get_num_threads(), 0)
    try:
        yield
    finally:
        parallel(setmode, ctypes.addressof(saved), torch.get_num_threads(), 0)
