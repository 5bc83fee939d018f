"""What every entry script shares: common flags, device choice, and turning user errors into exit 2."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch

from .errors import UserError


def parser(description: str, config: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    if config:
        p.add_argument("-c", "--config", required=True, help="train config JSON (train_configs/*.json)")
        p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    return p


def resolve_device(name: str | None) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def main_guard(main: Callable[[], int | None]) -> None:
    """Run ``main``; a UserError becomes one line on stderr and exit status 2."""
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.stdout.flush()
    sys.exit(code or 0)
