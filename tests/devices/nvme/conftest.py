from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from devices.nvme import Nvme

from ..fakes import FakeContext
from .host import RAM, Host


@pytest.fixture
async def nvme_ctx(nursery: trio.Nursery) -> FakeContext:
    return FakeContext(nursery, ram_size=RAM)


@pytest.fixture
async def dev(nvme_ctx: FakeContext) -> AsyncIterator[Nvme]:
    d = Nvme(size="4M")
    d.attach(nvme_ctx)
    yield d
    d.detach()
    d.close()


@pytest.fixture
async def host(dev: Nvme, nvme_ctx: FakeContext) -> Host:
    h = Host(dev, nvme_ctx)
    h.enable_pci()
    await h.enable()
    return h
