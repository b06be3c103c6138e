"""A one-shot wall-clock timer whose signal goes to the thread that made it (Linux).

``signal.setitimer`` offers one wall-clock timer per process (ITIMER_REAL, SIGALRM), and the
worker owns it for its stop deadline (``worker.loop``). A POSIX timer (``timer_create``) on
CLOCK_MONOTONIC is separate, takes any signal number, and with Linux's ``SIGEV_THREAD_ID``
interrupts one thread, so no other thread's system calls see its signal. Python does not
wrap ``timer_create``; this calls glibc through ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading

CLOCK_MONOTONIC = 1
SIGEV_THREAD_ID = 4  # Linux: deliver to the thread in sigev_tid


class _SigEvent(ctypes.Structure):
    # glibc's struct sigevent on 64-bit Linux: 64 bytes, the thread id first in the union.
    _fields_ = [
        ("sigev_value", ctypes.c_void_p),
        ("sigev_signo", ctypes.c_int),
        ("sigev_notify", ctypes.c_int),
        ("sigev_tid", ctypes.c_int),
        ("_pad", ctypes.c_int * 11),
    ]


class _TimeSpec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _ITimerSpec(ctypes.Structure):
    _fields_ = [("it_interval", _TimeSpec), ("it_value", _TimeSpec)]


def _libc() -> ctypes.CDLL:
    # glibc >= 2.34 has the timer calls in libc itself; older ones in librt.
    libc = ctypes.CDLL(None, use_errno=True)
    if hasattr(libc, "timer_create"):
        return libc
    name = ctypes.util.find_library("rt")
    if name is None:
        raise OSError("timer_create: not in libc and no librt")
    return ctypes.CDLL(name, use_errno=True)


def _timespec(seconds: float) -> _TimeSpec:
    whole = int(seconds)
    return _TimeSpec(whole, round((seconds - whole) * 1e9))


class ThreadTimer:
    """Sends ``signo`` to the thread that created it when an ``arm``-ed delay has passed."""

    def __init__(self, signo: int) -> None:
        if not sys.platform.startswith("linux"):
            raise OSError(f"per-thread POSIX timers need Linux, not {sys.platform}")
        if ctypes.sizeof(ctypes.c_void_p) != 8:
            raise OSError("per-thread POSIX timers: only the 64-bit struct sigevent is laid out")
        self.signo = signo
        self._libc = _libc()
        self._id = ctypes.c_void_p()
        event = _SigEvent()
        event.sigev_signo = signo
        event.sigev_notify = SIGEV_THREAD_ID
        event.sigev_tid = threading.get_native_id()
        if self._libc.timer_create(CLOCK_MONOTONIC, ctypes.byref(event), ctypes.byref(self._id)):
            raise OSError(ctypes.get_errno(), "timer_create failed")
        self._alive = True

    def arm(self, seconds: float) -> None:
        """Signal once, ``seconds`` from now (replacing any pending delay)."""
        spec = _ITimerSpec(_TimeSpec(0, 0), _timespec(seconds))
        if self._libc.timer_settime(self._id, 0, ctypes.byref(spec), None):
            raise OSError(ctypes.get_errno(), "timer_settime failed")

    def delete(self) -> None:
        if self._alive:
            self._libc.timer_delete(self._id)
            self._alive = False
