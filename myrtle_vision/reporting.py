"""What a run shows its user: printed lines (:func:`say`, the package's one channel for them), a progress bar and
TensorBoard scalars."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from tqdm import tqdm

if TYPE_CHECKING:
    from .distributed import Processes


def say(message: str, procs: Processes | None = None, *, to: TextIO | None = None) -> None:
    """Every line this package prints for its user goes through here: ``message`` on stdout (``to``: stderr, for
    an error), flushed. With ``procs``, on rank 0 alone; without, from this process (a job of one process, or
    a line that is this process's own, as an error is)."""
    if procs is None or procs.is_main:
        print(message, file=to or sys.stdout, flush=True)


class ProgressBar:
    """A tqdm bar on a terminal; elsewhere (logs, CI) a plain line on stdout every 30 seconds."""

    def __init__(self, total: int, initial: int, desc: str, interval: float = 30.0):
        self.total, self.n, self.desc, self.interval = total, initial, desc, interval
        self.tqdm = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True) if sys.stderr.isatty() else None
        self.last_line = time.monotonic()

    def update(self, **postfix: str) -> None:
        self.n += 1
        if self.tqdm is not None:
            self.tqdm.set_postfix(postfix, refresh=False)
            self.tqdm.update(1)
        elif time.monotonic() - self.last_line >= self.interval or self.n == self.total:
            self.last_line = time.monotonic()
            say(f"{self.desc}: {self.n}/{self.total} " + " ".join(f"{k} {v}" for k, v in postfix.items()))

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()


class _NoProgressBar:
    tqdm = None

    def update(self, **postfix: str) -> None:
        pass

    def close(self) -> None:
        pass


class Reporter:
    """TensorBoard event files in ``log_dir``, a progress display and printed lines.

    A disabled reporter (a process other than rank 0) shows and writes nothing.
    """

    def __init__(self, log_dir: str | Path | None = None, enabled: bool = True):
        self.enabled = enabled
        self.writer, self.bar = None, None
        self.log_to(log_dir)

    def log_to(self, log_dir: str | Path | None) -> None:
        """Write TensorBoard event files in ``log_dir`` from now on (nothing, before it is given)."""
        if log_dir is not None and self.enabled and self.writer is None:
            from torch.utils.tensorboard import SummaryWriter  # (only where a writer is made: not in loader workers)

            self.writer = SummaryWriter(str(log_dir))

    def scalars(self, step: int, **values: float) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def image(self, tag: str, pil_image, step: int = 0) -> None:
        if self.writer is not None:
            import numpy as np

            self.writer.add_image(tag, np.asarray(pil_image), step, dataformats="HWC")

    def progress_bar(self, total: int, initial: int, desc: str) -> ProgressBar:
        self.close_bar()
        self.bar = ProgressBar(total, initial, desc) if self.enabled else _NoProgressBar()
        return self.bar

    def print(self, message: str) -> None:
        """A line on stdout that does not break the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None and self.bar.tqdm is not None:
            self.bar.tqdm.write(message)
        else:
            say(message)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.close_bar()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
