"""A link of limited bandwidth: one token bucket per direction, shared by every connection.

Benchmarks serve checkpoints through a link of realistic speed (``HubServer(down_bps=100e6,
up_bps=50e6)``, or ``HUBSERVER_DOWN_BPS`` / ``HUBSERVER_UP_BPS``), so that a Hub-to-Hub pipeline can
be timed against what the network alone would take. One bucket per direction, not per connection:
parallel requests share the link, as they would share a real one.
"""

from __future__ import annotations

import os
import threading
import time


class TokenBucket:
    """``take(n)`` returns once ``n`` bytes fit the rate; a burst of ``rate * burst_s`` may pass at once.

    Debt-based: a taker that overdraws sleeps off its own debt outside the lock, and later takers
    see the debt, so the long-run rate holds across threads.
    """

    def __init__(self, rate: float, *, burst_s: float = 0.05) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        self.rate = float(rate)
        self.capacity = self.rate * burst_s
        self.tokens = self.capacity
        self.stamp = time.monotonic()
        self.lock = threading.Lock()

    def take(self, n: int) -> None:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            self.tokens -= n
            wait = -self.tokens / self.rate if self.tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)


def env_rate(name: str) -> float | None:
    """A bytes-per-second rate from the environment (``100e6`` or ``100MB``); unset or 0 means unlimited."""
    text = (os.environ.get(name) or "").strip().upper()
    if not text:
        return None
    scale = 1.0
    for suffix, factor in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3), ("B", 1.0)):
        if text.endswith(suffix):
            text, scale = text[: -len(suffix)], factor
            break
    rate = float(text) * scale
    return rate if rate > 0 else None


def bucket(rate: float | None) -> TokenBucket | None:
    return TokenBucket(rate) if rate else None


__all__ = ["TokenBucket", "bucket", "env_rate"]
