"""Flush denormal floats to zero on every CPU thread that computes, not only on the caller's.

`torch.set_flush_denormal(True)` sets the calling thread's MXCSR and nothing else. The
OpenMP threads that run the other chunks of every parallel kernel (ATen's and Inductor's)
keep the mode they were created with, and a thread is created with its creator's mode: set
before torch's first parallel kernel, the flag reaches them all; set after, as a Trainer
built after loading data sets it, it reaches only the main thread. The other threads'
halves of every parallel kernel then compute on denormals, many times slower
(docs/performance.md).

So `flush_denormals` also runs `torch.set_flush_denormal` once on each thread of torch's
OpenMP pool, through the OpenMP runtime's own entry point for a parallel region
(`GOMP_parallel`, what `#pragma omp parallel` compiles to). Threads created later copy the
main thread's mode. Without a libgomp in torch's build it sets the main thread alone and
says so.
"""

from __future__ import annotations

import ctypes
import warnings
from pathlib import Path

import torch

_REGION = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def _libgomp() -> ctypes.CDLL | None:
    """The OpenMP runtime torch is linked with, if it is a libgomp already loaded here."""
    candidates = [Path(torch.__file__).parent / "lib" / "libgomp.so.1"]
    try:
        for line in Path("/proc/self/maps").read_text().splitlines():
            path = line.split()[-1]
            if "libgomp" in Path(path).name:
                candidates.append(Path(path))
    except OSError:
        pass
    for path in candidates:
        if path.exists():
            try:
                lib = ctypes.CDLL(str(path))
                lib.GOMP_parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint,
                                              ctypes.c_uint]
                lib.GOMP_parallel.restype = None
                return lib
            except (OSError, AttributeError):
                continue
    return None


def flush_denormals(on: bool = True) -> int:
    """Set (or, with on=False, clear) flush-to-zero and denormals-are-zero on the calling
    thread and on each of torch's intra-op threads. Returns how many threads were set."""
    if not torch.set_flush_denormal(on):
        return 0  # the CPU has no such mode
    threads = torch.get_num_threads()
    if threads == 1 or "OpenMP" not in torch.__config__.parallel_info():
        return 1
    gomp = _libgomp()
    if gomp is None:
        warnings.warn("flush_denormals: no libgomp found; denormals are flushed on the main "
                      "thread only, so parallel kernels may run slower", RuntimeWarning,
                      stacklevel=2)
        return 1
    seen: list[int] = []

    @_REGION
    def region(_):
        torch.set_flush_denormal(on)
        seen.append(1)

    gomp.GOMP_parallel(ctypes.cast(region, ctypes.c_void_p), None, threads, 0)  # returns
    return len(seen)  # after every thread ran `region`, which this frame keeps alive
