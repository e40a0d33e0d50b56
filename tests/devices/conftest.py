from __future__ import annotations

import pytest
import trio

from .fakes import FakeContext


@pytest.fixture
def ctx(nursery: trio.Nursery) -> FakeContext:
    return FakeContext(nursery)
