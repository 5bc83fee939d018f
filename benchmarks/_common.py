"""What the benchmark scripts (and the demo's summary) share: naming the machine, its matmul rate, timing on any
device, and RESULTS.md sections."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def timed(fn, device: torch.device) -> float:
    """Seconds that ``fn()`` takes, its device work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def write_section(heading: str, intro: str, marker: str, table: str) -> None:
    """Replace the table between ``marker``'s comments under ``heading`` in RESULTS.md (or add it), keeping the rest."""
    begin, end = f"<!-- {marker}: begin -->", f"<!-- {marker}: end -->"
    block = f"{begin}\n{table}\n{end}"
    text = (
        RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nWritten by the scripts in this folder.\n"
    )
    if heading not in text:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n{intro}\n"
    if begin in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        at = text.index(heading) + len(heading)
        nxt = text.find("\n## ", at)
        at = len(text.rstrip("\n")) if nxt < 0 else nxt
        text = text[:at].rstrip("\n") + "\n\n" + block + "\n" + text[at:]
    RESULTS.write_text(text)


def matmul_rate(device: torch.device, repeats: int, dtype: torch.dtype = torch.float32) -> float:
    """The best FLOP/s of square matrix products (n = 1024, 2048, 4096) in ``dtype``."""
    best = 0.0
    for n in (1024, 2048, 4096):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        reps = max(1, int(2e11 // (2 * n**3))) if device.type == "cuda" else 1
        fn = lambda a=a, b=b, reps=reps: [a @ b for _ in range(reps)]  # noqa: E731
        fn()
        best = max(best, 2 * n**3 * reps / statistics.median(timed(fn, device) for _ in range(repeats)))
    return best
