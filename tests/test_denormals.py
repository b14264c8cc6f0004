"""Denormals flushed to zero on every thread that computes: a Trainer on the CPU sets the
mode on each of torch's OpenMP threads, not only on the calling one."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from study.denormals import flush_denormals
from study.train import Trainer


def _denormals_kept_per_chunk(n_chunks: int) -> list[bool]:
    """Whether each of `n_chunks` equal slices of a parallel multiply by 1 still holds the
    denormal 2^-129 it started from (False: flushed to zero by the thread that computed it)."""
    # 2^-129 by its bit pattern: a float literal would be flushed on its way in
    x = torch.full((4_000_000,), 1 << 20, dtype=torch.int32).view(torch.float32)
    y = x * 1.0  # large enough that every intra-op thread computes a slice
    return [bool((part != 0).any()) for part in y.chunk(n_chunks)]


def _flushed_threads_expected(threads: int) -> int:
    """How many threads flush_denormals documents it sets with `threads` intra-op threads
    here: none on a CPU without the mode; all of them where torch's OpenMP runtime is a
    libgomp (what CI runs: Linux wheels ship one); else the calling thread alone."""
    if not torch.set_flush_denormal(False):
        return 0
    try:
        libgomp = "libgomp" in Path("/proc/self/maps").read_text()  # the libraries loaded
    except OSError:  # no /proc: not Linux, not libgomp
        libgomp = False
    openmp = "OpenMP" in torch.__config__.parallel_info()
    return threads if openmp and libgomp else 1


def test_a_trainer_flushes_denormals_on_every_thread(tiny_config):
    """torch.set_flush_denormal reaches only the calling thread; the Trainer must reach the
    OpenMP threads too (the slow path was measured at 5x on the compiled Adam kernel). Where
    torch's threads are not libgomp's it flushes the calling thread alone, and says so."""
    threads = torch.get_num_threads()
    n = max(2, threads)  # at least two, so that one thread's mode cannot pass for all
    torch.set_num_threads(n)
    expected = _flushed_threads_expected(n)
    fallback = expected == 1 and "OpenMP" in torch.__config__.parallel_info()

    def warned():
        return pytest.warns(RuntimeWarning, match="no libgomp found") if fallback \
            else nullcontext()

    try:
        with warned():
            assert flush_denormals(on=False) == expected  # each of them cleared
        assert all(_denormals_kept_per_chunk(n))
        if expected == 0:  # no such mode: the Trainer flushes nothing
            Trainer(tiny_config.replace(device="cpu"))
            assert all(_denormals_kept_per_chunk(n))
            return
        torch.set_flush_denormal(True)  # the main thread alone: the others keep their slices
        assert _denormals_kept_per_chunk(n) != [False] * n
        with warned():
            Trainer(tiny_config.replace(device="cpu"))
        kept = _denormals_kept_per_chunk(n)
        assert kept == [False] * n if expected == n else kept != [False] * n
    finally:
        torch.set_num_threads(threads)
        flush_denormals()
