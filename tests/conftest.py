"""Run every test in its own temporary working directory.

trial's C{mktemp()} makes paths relative to the working directory; under
pytest that would be the checkout.  The e2e daemons compute their paths
from this file's location, not the working directory.
"""

from __future__ import annotations

import pathlib

import pytest


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
