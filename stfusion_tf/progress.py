"""A one-line text progress bar with throughput and ETA (conversion, evaluation)."""

import sys
import time


class Progress:
    """One-line progress: done/total clips, clips/s, ETA, and skipped inputs if any."""

    def __init__(self, total: int, label: str, stream=None, every: float = 0.5):
        self.total, self.label, self.every = total, label, every
        self.stream = stream if stream is not None else sys.stderr
        self.done = self.skipped = 0
        self.t0 = self.last = time.time()

    def update(self, ok: bool = True) -> None:
        self.skipped += 0 if ok else 1
        self.update_many(1)

    def update_many(self, n: int) -> None:
        self.done += n
        now = time.time()
        finished = self.total and self.done >= self.total
        if now - self.last < self.every and not finished:
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        line = f"\r[{self.label}] {self.done}/{self.total or '?'} clips  {rate:.1f} clips/s"
        if self.total:
            eta = max(self.total - self.done, 0) / rate if rate > 0 else 0.0
            line += f"  ETA {int(eta // 60)}:{int(eta % 60):02d}"
        if self.skipped:
            line += f"  skipped {self.skipped}"
        self.stream.write(line + ("\n" if finished else ""))
        self.stream.flush()
