"""Background threads made nicer than the threads they serve: by steps, capped at Linux's lowest priority, and
only the calling thread."""

from __future__ import annotations

import os
import threading

import pytest

from learner.priority import LOWEST, lower_thread_priority


def niceness() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def on_a_thread(fn):
    """``fn()`` on a new thread, its result returned here."""
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join(10)
    return out[0]


def test_a_thread_is_made_nicer_by_steps_and_the_others_keep_theirs() -> None:
    own = niceness()
    if own > LOWEST - 3:
        pytest.skip(f"this test runs at niceness {own}: no room for 3 steps below it")
    after, read = on_a_thread(lambda: (lower_thread_priority(3), niceness()))
    assert after == read == own + 3
    assert niceness() == own, "the calling thread only, not the process"


def test_steps_past_the_lowest_priority_stop_there_and_none_leave_the_thread_as_it_is() -> None:
    own = niceness()
    assert on_a_thread(lambda: (lower_thread_priority(LOWEST + 5), niceness())) == (LOWEST, LOWEST)
    assert on_a_thread(lambda: (lower_thread_priority(0), niceness())) == (None, own)
