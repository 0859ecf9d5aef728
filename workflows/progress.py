"""The job's one progress display, on the driver, fed with the metadata rows the pipeline returns: images done of
the total, images per second, time left and the τ of the latest batch. A terminal gets a live bar (tqdm); other
output (a log, `ray job submit`) a plain line at most every `every_s` seconds, and one at the end."""

import math
import sys
import time
from collections.abc import Callable
from typing import TextIO

import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

PLAIN_EVERY_S = 30.0


class JobProgress:
    def __init__(self, total: int | None, stream: TextIO | None = None, every_s: float = PLAIN_EVERY_S,
                 clock: Callable[[], float] = time.monotonic, tty: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.total, self.done, self.tau = total, 0, None
        self.every_s, self.clock = every_s, clock
        self.started = self.printed = clock()
        live = self.stream.isatty() if tty is None else tty
        self.bar = tqdm(total=total, unit="img", file=self.stream, dynamic_ncols=True) if live and total else None

    def update(self, rows: pa.Table) -> None:
        """Count a batch's rows (ok or error: each is one image of the total dealt with)."""
        self.done += rows.num_rows
        if self.total:  # rows of a failed attempt may be generated again
            self.done = min(self.total, self.done)
        tau = pc.mean(rows["tau"]).as_py() if rows.num_rows else None
        self.tau = tau if tau is not None else self.tau
        if self.bar is not None:
            self.bar.update(self.done - self.bar.n)
            if self.tau is not None:
                self.bar.set_postfix_str(f"τ={self.tau:.3f}")
        elif self.clock() - self.printed >= self.every_s:
            self._print()

    def line(self) -> str:
        elapsed = self.clock() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        tau = "dense" if self.tau is None else f"{self.tau:.3f}"
        if not self.total:  # a streamed plan: its size is known once it is read
            return f"progress: {self.done} images, {rate:.2f} images/s, τ {tau}"
        left = (self.total - self.done) / rate if rate else math.inf
        eta = "?" if math.isinf(left) else time.strftime("%H:%M:%S", time.gmtime(left))
        share = 100 * self.done / self.total if self.total else 100.0
        return f"progress: {self.done}/{self.total} images ({share:.0f}%), {rate:.2f} images/s, ETA {eta}, τ {tau}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.total:
            self._print()

    def _print(self) -> None:
        self.printed = self.clock()
        print(self.line(), file=self.stream, flush=True)
