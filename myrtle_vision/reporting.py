"""What a run shows its user: a tqdm bar, printed lines and TensorBoard scalars."""

from __future__ import annotations

import sys
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


class Reporter:
    """TensorBoard event files in ``log_dir`` plus a progress bar on stderr."""

    def __init__(self, log_dir: str | Path | None):
        self.writer = SummaryWriter(str(log_dir)) if log_dir is not None else None
        self.bar = None

    def scalars(self, step: int, **values: float) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def image(self, tag: str, pil_image, step: int = 0) -> None:
        if self.writer is not None:
            import numpy as np

            self.writer.add_image(tag, np.asarray(pil_image), step, dataformats="HWC")

    def progress(self, total: int, initial: int, desc: str) -> tqdm:
        self.close_bar()
        tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=tty,
                        mininterval=0.5 if tty else 30, file=sys.stderr)
        return self.bar

    def print(self, message: str) -> None:
        (self.bar.write if self.bar is not None else print)(message)
        sys.stdout.flush()

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.close_bar()
        if self.writer is not None:
            self.writer.close()
