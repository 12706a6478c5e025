"""What a test does when a server or tool it needs is not there: skip, saying why, or
fail when ``CI`` is set (CI must run every test, never pass by skipping)."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run this test, not skip it")
    pytest.skip(reason)
