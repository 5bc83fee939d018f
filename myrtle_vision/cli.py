"""What every entry script shares: common flags, device choice, and turning user errors into exit 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

from .errors import UserError, reason
from .reporting import say
from .tta import MODES


def parser(description: str, config: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    if config:
        p.add_argument("-c", "--config", required=True, help="train config JSON (train_configs/*.json)")
        p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    return p


def add_force_argument(p: argparse.ArgumentParser, output: str, earlier: str) -> None:
    """--force: replace the ``output`` file even when it is not ``earlier`` (an earlier one is replaced anyway)."""
    p.add_argument(
        "--force",
        action="store_true",
        help=f"replace {output} file that is not {earlier} (an earlier one is replaced anyway)",
    )


def add_split_argument(p: argparse.ArgumentParser, default: str | None = "test", says: str = "test") -> None:
    p.add_argument(
        "--split",
        choices=("train", "val", "test"),
        default=default,
        help="the split to evaluate, with the evaluation transforms (transform_ops_val) whatever it is "
        f"(default: {says})",
    )


def add_tta_argument(p: argparse.ArgumentParser) -> None:
    """--tta: test-time augmentation (myrtle_vision.tta), the same flag in test.py, test_quantize.py and predict.py."""
    p.add_argument(
        "--tta",
        choices=tuple(MODES),
        default="none",
        help="test-time augmentation: also run each image flipped (flip: 2 views, the image and its horizontal "
        "flip) or in all 8 rotations and flips of the square (dihedral), and predict from the average of their "
        "softmax; costs the views times the forward passes (2x, 8x; and the accelerator's work per image, if "
        "deployed so) (default: none)",
    )


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
        say("error: " + " ".join(str(e).splitlines()), to=sys.stderr)  # one line, whatever it quotes
        code = e.exit_code
    except (MemoryError, RuntimeError) as e:
        # torch.OutOfMemoryError (CUDA) is a RuntimeError; the CPU allocator raises a plain one
        if (
            isinstance(e, RuntimeError)
            and not isinstance(e, torch.OutOfMemoryError)
            and "can't allocate memory" not in str(e)
        ):
            raise
        say(
            f"error: out of memory ({reason(e)[:300]}); lower train_config.local_batch_size (gradient accumulation "
            "keeps global_batch_size) or use a smaller model",
            to=sys.stderr,
        )
        code = 3
    except KeyboardInterrupt:
        say("interrupted", to=sys.stderr)
        code = 130
    sys.stdout.flush()
    sys.exit(code or 0)
