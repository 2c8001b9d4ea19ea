"""Peak resident memory of this process over a block of code, and giving freed memory back.

On Linux the kernel's high-water mark (``VmHWM``) is reset through ``/proc/self/clear_refs`` and read
after the block: exact and free. Where that is missing, or the reset is accepted without effect
(checked once with a probe of fresh pages), the RSS is sampled every millisecond by a thread instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_PROBE_BYTES = 64 * 2**20


def _status_bytes(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"{field} missing from {_STATUS}")
    return int(match.group(1)) * 1024


def touch_fresh_pages(nbytes: int) -> None:
    """Map ``nbytes`` of new anonymous memory, write every page, unmap it: a transient RSS rise that the
    allocator cannot serve from memory it already holds (as it can for a tensor)."""
    with mmap.mmap(-1, nbytes) as block:
        for offset in range(0, nbytes, mmap.PAGESIZE):
            block[offset] = 1


def _reset_kernel_peak() -> None:
    _CLEAR_REFS.write_text("5")  # "5" resets VmHWM to the current RSS (Linux >= 4.0)


@functools.cache
def _kernel_peak_works() -> bool:
    """Whether VmHWM can be reset and then records a transient allocation.

    Checked once with a 64 MB probe of fresh pages: a reset accepted without effect would hide every peak.
    """
    try:
        _reset_kernel_peak()
        before = _status_bytes("VmRSS")
        touch_fresh_pages(_PROBE_BYTES)
        return _status_bytes("VmHWM") >= before + _PROBE_BYTES * 0.9
    except OSError:
        return False


def current_rss() -> int | None:
    """Resident set size of this process in bytes, or None where neither /proc nor psutil tells."""
    try:
        return _status_bytes("VmRSS")
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss


@contextmanager
def peak_rss() -> Iterator[dict[str, Any]]:
    """Measure the peak RSS over the block into the yielded dict (``peak_bytes``, ``method``).

    ``start_bytes`` is the RSS when the block began: the peak minus it is what the block added on top of
    what the process already held (which, in a long-lived process, includes memory freed earlier but
    kept by the allocator, so the difference is a lower bound of the block's own need).
    """
    report: dict[str, Any] = {"peak_bytes": None, "start_bytes": None, "method": "unavailable"}
    if _kernel_peak_works():
        _reset_kernel_peak()
        report["start_bytes"] = current_rss()
        yield report
        report.update(peak_bytes=_status_bytes("VmHWM"), method="VmHWM reset via /proc/self/clear_refs")
        return
    first = current_rss()
    if first is None:
        yield report
        return
    report["start_bytes"] = first
    stop, samples = threading.Event(), [first]

    def sample() -> None:
        while not stop.is_set():
            samples[0] = max(samples[0], current_rss() or 0)
            stop.wait(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield report
    finally:
        stop.set()
        sampler.join()
        samples[0] = max(samples[0], current_rss() or 0)
        report.update(peak_bytes=samples[0], method="RSS sampled every 1 ms")


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Return the C heap's free pages to the kernel. glibc keeps freed blocks of a few MB in the heap
    (its mmap threshold rises as large blocks are freed), so a loop that frees one decoder block and
    allocates the next grew the resident size with depth: 0.46 -> 1.25 GiB over 8 blocks of a
    1024-wide model, flat at 0.56 GiB with this call after each block."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
