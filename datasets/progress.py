"""One progress line for every long loop (prepare's passes, `cxr predict`'s files):
`label done/total unit  rate unit/s  ETA` on stderr.

On a terminal one line is redrawn in place (\\r); in a log file or pipe a line is written at most
every `every_s` seconds, and always for the last update, so logs stay short on 100k items.
Our own rather than tqdm's: tqdm writes \\r-joined updates into log files, where a line per
interval is what a user tailing a cluster job's log can read.
"""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, unit: str, *, stream=None, every_s: float = 10.0, enabled: bool = True):
        self.label, self.unit, self.every_s, self.enabled = label, unit, every_s, enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._start = time.perf_counter()
        self._last: float | None = None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        last = done >= total
        if not (self.tty or last or self._last is None or now - self._last >= self.every_s):
            return
        self._last = now
        elapsed = max(now - self._start, 1e-9)
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 else float("inf")
        line = (f"{self.label} {done}/{total} {self.unit}  {rate:.1f} {self.unit}/s  "
                + (f"ETA {format_duration(eta)}" if not last else f"{format_duration(elapsed)}"))
        if self.tty:
            # Pad over a longer previous line; the last update ends the line.
            print(f"\r{line:<70}", end="\n" if last else "", file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)


def format_duration(seconds: float) -> str:
    """`42 s`, `3 min 05 s`; `?` for an unknown (infinite) time. Progress lines and ETAs."""
    if seconds == float("inf"):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"
