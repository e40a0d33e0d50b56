"""The README's device example works as written, through the real server and client."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio

from devices.sdk.interface import IrqIndex
from vfiouser_srv.client import make_eventfd, open_client, wait_eventfd
from vfiouser_srv.server import Server

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from copyengine import CopyEngine

from tests.engines.params import ENGINE_PARAMS

CONFIG = 7
COMMAND_MEMORY_BUS_MASTER = 0x6


@pytest.mark.parametrize("engine", ENGINE_PARAMS)
async def test_readme_copy_engine(tmp_path: Path, engine: str) -> None:
    server = Server()
    dev = CopyEngine()
    server.add_device("ce", dev, socket_path=str(tmp_path / "ce.sock"), engine=engine)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        async with open_client(str(tmp_path / "ce.sock")) as client:
            await client.memory.add_ram(0x100000, 0x10000, shared=True)
            client.memory.write(0x100000, b"copy me please!!")
            await client.region_write(CONFIG, 0x04, COMMAND_MEMORY_BUS_MASTER.to_bytes(2, "little"))
            assert dev.msix is not None
            ctrl = dev.msix.offset + 2
            await client.region_write(CONFIG, ctrl, (0x8000).to_bytes(2, "little"))  # enable
            with make_eventfd() as efd:
                await client.set_irq_eventfds(IrqIndex.MSIX, 0, [efd])
                await client.region_write(0, 0x00, (0x100000).to_bytes(8, "little"))
                await client.region_write(0, 0x08, (0x108000).to_bytes(8, "little"))
                await client.region_write(0, 0x10, (16).to_bytes(4, "little"))
                await client.region_write(0, 0x14, (1).to_bytes(4, "little"))
                assert await wait_eventfd(efd, timeout=5) == 1
            assert client.memory.read(0x108000, 16) == b"copy me please!!"
        nursery.cancel_scope.cancel()
