"""Machinery shared by every family's launchers."""

from __future__ import annotations

import os

import torch

from ..autotune.spaces import pow2  # noqa: F401  (re-exported for the launchers)


def empty(shape, dtype, device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs; NaN-filled when SUBQUAD_POISON=1 (tests), so that an
    element a kernel forgets to write fails the comparison instead of passing by luck."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get("SUBQUAD_POISON", "0") not in ("", "0"):
        out.fill_(float("nan"))
    return out
