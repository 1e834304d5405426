"""Background work at a lower CPU priority than the work it serves, as databases run their compactions.

On Linux a thread has a niceness of its own, so a process can run its background thread below its request or
training threads. Niceness only goes up without privileges: a thread made nicer stays so, and a thread inside a
Ray worker (``RAY_worker_niceness``, 15 by default) starts at the worker's niceness, so a step count is added to
the thread's own niceness rather than an absolute value set (an absolute 10 inside a worker at 15 is refused).
"""

from __future__ import annotations

import contextlib
import os
import threading

LOWEST = 19
"""Linux's highest niceness: the lowest priority short of ``SCHED_IDLE``."""


def lower_thread_priority(steps: int) -> int | None:
    """Make the calling thread ``steps`` nicer than it is, at most :data:`LOWEST`. Returns its niceness after, or
    None where a thread's niceness cannot be read or set (not Linux): the thread then stays as it was."""
    if steps <= 0:
        return None
    with contextlib.suppress(AttributeError, OSError):
        tid = threading.get_native_id()
        nice = min(LOWEST, os.getpriority(os.PRIO_PROCESS, tid) + steps)
        os.setpriority(os.PRIO_PROCESS, tid, nice)
        return os.getpriority(os.PRIO_PROCESS, tid)
    return None


__all__ = ["LOWEST", "lower_thread_priority"]
