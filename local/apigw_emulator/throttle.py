"""Token-bucket throttling with API Gateway's two numbers: a steady rate (requests/s) and a burst.

Hand-written (a dozen lines) rather than a dependency: the PyPI limiters are either async-only or model
fixed windows, and API Gateway's documented model is exactly a token bucket.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class TokenBucket:
    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic):
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("throttle rate must be positive and burst at least 1")
        self.rate = rate_per_s
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._updated = clock()
        self._lock = threading.Lock()

    def try_take(self) -> bool:
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
            self._updated = now
            if self._tokens >= 1:
                self._tokens -= 1
                return True
            return False


class Throttle:
    """One bucket per API key (a usage plan's per-client limit), or one for the whole stage without keys."""

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self._rate, self._burst, self._clock = rate_per_s, burst, clock
        TokenBucket(rate_per_s, burst, clock)  # validate now, not on the first request
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def allow(self, key: str | None) -> bool:
        with self._lock:
            bucket = self._buckets.get(key or "")
            if bucket is None:
                bucket = self._buckets[key or ""] = TokenBucket(self._rate, self._burst, self._clock)
        return bucket.try_take()
