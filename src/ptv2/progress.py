"""Training progress that reads well wherever it goes: a tqdm bar on a terminal; elsewhere (SLURM, CI, `> log`) one
log line per tenth of an epoch, or after LINE_SECONDS without one, instead of a carriage-return redraw per step."""

from __future__ import annotations

import logging
import sys
import time

from tqdm.auto import tqdm

log = logging.getLogger("ptv2")


def quiet_library_bars() -> None:
    """Off the terminal (SLURM, CI, `| tee log`), the libraries' own bars (transformers' weight loading, hub
    downloads) would redraw into the log line by line: turned off. Every command calls this before it loads a
    model (cli.main); training also at this module's import."""
    if sys.stderr.isatty():
        return
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    disable_progress_bars()
    transformers_logging.disable_progress_bar()


quiet_library_bars()
LINES_PER_EPOCH = 10  # a line each time another tenth of the epoch is done
LINE_SECONDS = 300.0  # and at least one every 5 minutes on long epochs
# An evaluated split of at most this many batches shows no progress: it is over in moments, and ten lines for
# a few batches would only crowd the log before its result line.
FEW_BATCHES = 4


def epoch_progress(
    iterable, total: int, desc: str, enabled: bool = True, initial: int = 0, stream=None, unit: str = "steps"
):
    """Wrap a training epoch's batches (unit "steps") or a split's evaluation batches (unit "batches"): a bar when
    `stream` (default stderr, where tqdm draws) is a terminal, else ProgressLines; nothing when disabled. Either way
    the result iterates like `iterable` and has set_postfix()."""
    stream = sys.stderr if stream is None else stream
    if enabled and stream.isatty():
        singular = {"steps": "step", "batches": "batch"}[unit]  # tqdm's rate reads "2.5step/s"
        return tqdm(iterable, total=total, initial=initial, desc=desc, leave=False, file=stream, unit=singular)
    return ProgressLines(iterable, total, desc, enabled, initial, unit=unit)


class ProgressLines:
    """Yields the items of `iterable`; after each one, logs `desc: done/total steps (percent), postfix, elapsed, left`
    when another 1/LINES_PER_EPOCH of `total` is done or LINE_SECONDS have passed since the last line."""

    def __init__(
        self, iterable, total: int, desc: str, enabled=True, initial=0, clock=time.monotonic, unit: str = "steps"
    ):
        self.iterable, self.total, self.desc, self.enabled, self.unit = iterable, total, desc, enabled, unit
        self.initial = self.done = initial  # a resumed epoch starts past its finished batches
        self.clock, self.postfix = clock, {}
        self.started = self.last_line = clock()
        self.next_mark = self._mark_after(initial)

    def _mark_after(self, done: int) -> int:
        """The first step count past `done` that ends another 1/LINES_PER_EPOCH of the epoch: ceil(k * total / N)."""
        k = done * LINES_PER_EPOCH // max(self.total, 1) + 1
        return -(-k * self.total // LINES_PER_EPOCH)

    def set_postfix(self, **values) -> None:
        self.postfix = values

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.done += 1
            now = self.clock()
            if self.enabled and (self.done >= self.next_mark or now - self.last_line >= LINE_SECONDS):
                self._line(now)

    def _line(self, now: float) -> None:
        elapsed = now - self.started
        parts = [f"{self.desc}: {self.done}/{self.total} {self.unit} ({100 * self.done / max(self.total, 1):.0f}%)"]
        parts += [f"{key} {value}" for key, value in self.postfix.items()]
        parts.append(f"{elapsed:.0f} s")
        if self.initial < self.done < self.total:
            left = elapsed / (self.done - self.initial) * (self.total - self.done)
            parts.append(f"~{left:.0f} s left" + (" in the epoch" if self.unit == "steps" else ""))
        log.info(", ".join(parts))
        self.last_line, self.next_mark = now, self._mark_after(self.done)
