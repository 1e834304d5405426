"""Closed-loop ranking clients over real HTTP, for the serving scenarios of issue 9: every answer is kept, with
its status (or the transport error), the version that scored it and the replica process that answered."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import numpy as np


@dataclass(frozen=True)
class Answer:
    sent_at: float
    """``time.monotonic()`` just before the request went out."""
    status: int | str
    """The HTTP status, or the transport error's repr when no response came."""
    version: int | None = None
    replica: str | None = None
    pid: int | None = None
    received_at: float | None = None
    """``time.monotonic()`` once the answer was in (None when no response came): a version that answered before
    a publish was serving before it."""

    @property
    def ok(self) -> bool:
        return self.status == 200


class RankingLoad:
    """``clients`` threads, each sending one ``POST {path}`` after the other (20 of 500 items for a random user)
    until stopped. ``retries`` re-sends a request that got no answer or a 5xx, at most that many times; each
    attempt is recorded, and ``outcomes`` counts only the last attempt of each request."""

    def __init__(self, url: str, clients: int = 4, path: str = "/v1/rank", retries: int = 0) -> None:
        self.url, self.path, self.retries = url, path, retries
        self._answers: list[list[list[Answer]]] = [[] for _ in range(clients)]  # client -> request -> attempts
        self._halt = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(k,), name=f"ranking-client-{k}", daemon=True)
                         for k in range(clients)]

    def _client(self, k: int) -> None:
        rng = np.random.default_rng(k)
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self._halt.is_set():
                body = {"user_id": int(rng.integers(0, 50)), "candidates": rng.choice(500, 20, replace=False).tolist()}
                attempts: list[Answer] = []
                while len(attempts) <= self.retries:
                    attempts.append(self._send(http, body))
                    if not _retryable(attempts[-1].status):
                        break
                self._answers[k].append(attempts)

    def _send(self, http: httpx.Client, body: dict) -> Answer:
        sent_at = time.monotonic()
        try:
            r = http.post(self.path, json=body)
        except httpx.HTTPError as exc:
            return Answer(sent_at, repr(exc))
        received_at = time.monotonic()
        if r.status_code != 200:
            return Answer(sent_at, r.status_code, received_at=received_at)
        result = r.json()
        return Answer(sent_at, 200, result["model_version"], result["replica"], result["pid"], received_at)

    def start(self) -> RankingLoad:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._halt.set()
        for t in self._threads:
            t.join(timeout=60)

    @property
    def requests(self) -> list[list[Answer]]:
        """Every request so far, each as its attempts in order."""
        return [attempts for per_client in self._answers for attempts in list(per_client)]

    @property
    def outcomes(self) -> list[Answer]:
        """The last attempt of each request: what its caller got in the end."""
        return [attempts[-1] for attempts in self.requests]

    @property
    def attempts(self) -> list[Answer]:
        return [a for attempts in self.requests for a in attempts]

    def latest_by_pid(self) -> dict[int, Answer]:
        """The newest successful answer of each replica process."""
        latest: dict[int, Answer] = {}
        for a in self.attempts:
            if a.ok and (a.pid not in latest or a.sent_at > latest[a.pid].sent_at):
                latest[a.pid] = a
        return latest


def _retryable(status: int | str) -> bool:
    return isinstance(status, str) or status >= 500


def tally(answers: list[Answer]) -> str:
    """``status: count`` over the answers, most common first."""
    return ", ".join(f"{status}: {n}" for status, n in Counter(a.status for a in answers).most_common())


__all__ = ["Answer", "RankingLoad", "tally"]
