"""How many bad samples a data pipeline may skip before it stops: counts, a rate-limited warning, the limit."""

from __future__ import annotations

import logging
import math
import time

from mm_llama.errors import DataError

log = logging.getLogger("mm_llama.data")


class SkipCounter:
    """Counts samples read and skipped, warns (rate-limited) and raises `DataError` when too many are skipped.

    Read means read from a shard, good or bad, whether or not it was delivered yet (a shuffle buffer holds thousands);
    a damaged region read again (a resampled shard drawn again) is skipped and counted again.

    The limit: skipped > max_fraction × max(read, streams / max_fraction). For one stream at 1 % the first bad sample
    is tolerated, a second one within the first 200 read is not, and beyond that the plain fraction applies.

    A DataLoader worker reads its own shard draws and applies the limit to its own counts plus `elsewhere`, an upper
    bound on the good samples the other workers have reported to the main process meanwhile (they are part of what was
    read): it raises where the main process would, except that it tolerates only its own first bad sample, and it
    still raises when it reads nothing but bad samples, which the main process never sees. The main process applies
    the limit to the counts all n workers report with their items, with streams = n: one bad sample tolerated per
    worker, so n workers that each meet the same damaged shard early do not stop a run one stream would not stop.

    Args:
        max_fraction: the tolerated fraction of skipped samples in [0, 1] (0: none at all).
        streams: the DataLoader workers whose counts are summed (1 for none).
        warn_every: at most one warning per this many seconds; None for none (the main process, whose workers warn).
    """

    def __init__(self, max_fraction: float, *, streams: int = 1, warn_every: float | None = 5.0):
        self.max_fraction, self.streams, self.warn_every = max_fraction, streams, warn_every
        self.read = self.skipped = self.pending = 0  # pending: skipped since the last `take`
        self.reported = (0, 0)  # (read, skipped) at the last `report`
        self.shard = self.reason = ""
        self.elsewhere = 0
        self._last_warning = -math.inf

    def good(self) -> None:
        self.read += 1

    def bad(self, shard: str, reason: str, n: int = 1) -> None:
        """Count `n` skipped samples of `shard`; raises `DataError` once the limit is passed."""
        self.read, self.skipped, self.pending = self.read + n, self.skipped + n, self.pending + n
        self.shard, self.reason = shard, reason
        now = time.monotonic()
        if self.warn_every is not None and now - self._last_warning >= self.warn_every:
            self._last_warning = now
            log.warning("skipped %d bad sample(s) of %d read so far; latest in shard %s: %s",
                        self.skipped, self.read, shard, reason)
        # max(f·read, s) is f·max(read, s/f) without the rounding of s/f (f = 0.03 would make the floor 0.99…).
        floor = self.streams if self.max_fraction > 0 else 0
        if self.skipped > max(self.max_fraction * (self.read + self.elsewhere), floor):
            raise DataError(
                f"too many bad samples: {self.skipped} of {self.read} read were skipped "
                f"({self.skipped / self.read:.2%}); max_skip_fraction={self.max_fraction} tolerates at most "
                f"max({self.max_fraction} x samples read, {floor}). Latest in shard {shard}: {reason}")

    def add(self, read: int, skipped: int, shard: str, reason: str) -> None:
        """Count `read` samples of which `skipped` were bad (a worker's `report`); raises like `bad`."""
        self.read += read - skipped
        if skipped:
            self.bad(shard, reason, skipped)

    def take(self) -> tuple[int, str, str]:
        """(skipped since the last call, latest shard, latest reason): the bad samples a delivered sample follows."""
        n, self.pending = self.pending, 0
        return n, self.shard, self.reason

    def report(self) -> tuple[int, int]:
        """(read, skipped) since the last call: what a worker tells the main process with its next item."""
        last, self.reported = self.reported, (self.read, self.skipped)
        return self.read - last[0], self.skipped - last[1]
