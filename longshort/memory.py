"""Peak resident memory (RSS) of this process while a block runs: a stage's ``peak_rss_mb`` metric.

A daemon thread reads the process RSS every ``interval_s`` (``/proc/self/statm`` on Linux, psutil
elsewhere). Sampling can miss a spike shorter than the interval, so on Linux the kernel's high-water
mark (``VmHWM``) is read at both ends too: if it rose while the block ran, the block set the process's
all-time peak and that value is exact. The process is measured, not the block alone: stages that
run at the same time in one process (mapped score shards on threads) share one figure. Reading a
few bytes from ``/proc`` ten times a second costs nothing measurable.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
from pathlib import Path

_STATM = Path("/proc/self/statm")
_STATUS = Path("/proc/self/status")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _accelerator_in_use() -> bool:
    """Whether this process has started CUDA (torch is not imported for it: a process without torch has not)."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()


def free_accelerator_memory() -> None:
    """Collect garbage, then hand the CUDA caching allocator's unused blocks back to the driver.

    A vLLM engine runs in its own process and counts what this process's allocator keeps cached as used: it
    refuses to start unless its share of the GPU is free. A stage that trained in this process leaves its
    model's blocks in that cache, and reference cycles (DeepSpeed's hooks) that only a collection frees.
    Nothing to do in a process that never started CUDA (a CPU machine): there a full collection per stage
    only costs time (0.2-0.3 s each with the training libraries loaded, a minute of the test suite)."""
    if not _accelerator_in_use():
        return
    gc.collect()
    import torch  # noqa: PLC0415 - imported already (_accelerator_in_use)

    try:
        torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - a CUDA error is sticky: it raises here again, and must not replace the first
        logging.getLogger(__name__).warning("could not empty the CUDA cache", exc_info=True)


def current_rss_bytes() -> int | None:
    """The resident set size of this process now, or None where it cannot be read."""
    try:
        return int(_STATM.read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        pass
    try:
        import psutil  # noqa: PLC0415 - only where /proc is missing

        return int(psutil.Process().memory_info().rss)
    except Exception:  # noqa: BLE001 - no psutil, or a platform it cannot read: no figure
        return None


def high_water_bytes() -> int | None:
    """The kernel's peak RSS of this process so far (``VmHWM``), Linux only."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return None


class PeakRSS:
    """``with PeakRSS() as rss: ...`` then ``rss.peak_mb`` (None where RSS cannot be read)."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.interval_s = interval_s
        self._peak = 0
        self._hwm_start: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.peak_mb: float | None = None

    def _sample(self) -> None:
        rss = current_rss_bytes()
        if rss is not None and rss > self._peak:
            self._peak = rss

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> PeakRSS:
        self._hwm_start = high_water_bytes()
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        hwm_end = high_water_bytes()
        if hwm_end is not None and self._hwm_start is not None and hwm_end > self._hwm_start:
            self._peak = max(self._peak, hwm_end)
        self.peak_mb = round(self._peak / 2**20, 1) if self._peak else None
