"""Shared test settings: small thread count, deterministic seeds."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


def require(condition: bool, reason: str) -> None:
    """Skip when an optional part is missing, except in CI (LENS_REQUIRE_ALL=1) where it must exist."""
    if condition:
        return
    if os.environ.get("LENS_REQUIRE_ALL") == "1":
        pytest.fail(f"LENS_REQUIRE_ALL=1 but {reason}")
    pytest.skip(reason)
