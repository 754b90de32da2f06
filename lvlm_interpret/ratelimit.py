"""A per-client request rate limit for the hosted mode, shared by the HTTP backend and the web page."""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict


class RateLimiter:
    """At most `per_minute` requests per client: each client has a bucket of `per_minute` requests that refills
    evenly over a minute, so a burst of `per_minute` passes and then one request per 60/`per_minute` s.

    Clients are keys (an address); a client idle for a minute has a full bucket again and is forgotten, and at
    most `max_clients` are remembered (the least recently seen is forgotten first), so memory stays bounded."""

    def __init__(self, per_minute: int, clock=time.monotonic, max_clients: int = 65536):
        if per_minute < 1:
            raise ValueError(f"per_minute must be at least 1, got {per_minute}")
        self.per_minute = per_minute
        self.max_clients = max_clients
        self._clock = clock
        self._refill_per_s = per_minute / 60.0
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client: (requests left, when)
        self._lock = threading.Lock()

    def retry_after(self, client: str) -> int | None:
        """Count a request from `client`: None if it may proceed, else the whole seconds until it may retry (the
        refused request is not counted)."""
        now = self._clock()
        with self._lock:
            self._forget_idle(now)
            left, then = self._buckets.pop(client, (float(self.per_minute), now))
            left = min(float(self.per_minute), left + (now - then) * self._refill_per_s)
            refused = left < 1.0
            self._buckets[client] = (left if refused else left - 1.0, now)
            if len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        return max(1, math.ceil((1.0 - left) / self._refill_per_s)) if refused else None

    def message(self, retry_after_s: int) -> str:
        return (f"too many requests from your address (at most {self.per_minute} a minute): retry in "
                f"{retry_after_s} s")

    def _forget_idle(self, now: float) -> None:
        """Drop clients whose bucket is full again (least recently seen first, so the scan stops early)."""
        while self._buckets:
            client, (left, then) = next(iter(self._buckets.items()))
            if left + (now - then) * self._refill_per_s < self.per_minute:
                break
            del self._buckets[client]
