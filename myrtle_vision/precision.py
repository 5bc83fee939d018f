"""The arithmetic of a ``train_config.precision``: its autocast context (training, validation, benchmarks)."""

from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device, precision: str):
    """The autocast context of a ``precision`` (``fp32``: none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
