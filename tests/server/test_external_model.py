"""`examples/copyengine.py` served by its file path from a real `vfiouser-srv serve` process
(and from a config file's `model` key), driven by our client: its copy and interrupt work."""

from __future__ import annotations

from pathlib import Path

from devices.sdk.interface import IrqIndex
from tests.server.test_cli import REPO, assert_clean_error, cli, run_cli
from vfiouser_srv.client import make_eventfd, open_client, wait_eventfd

CONFIG = 7
COMMAND_MEMORY_BUS_MASTER = 0x6

async def _copy_through(path: str) -> None:
    async with open_client(path) as client:
        await client.memory.add_ram(0x100000, 0x10000, shared=True)
        client.memory.write(0x100000, b"copy me please!!")
        await client.region_write(CONFIG, 0x04, COMMAND_MEMORY_BUS_MASTER.to_bytes(2, "little"))
        cap = (await client.region_read(CONFIG, 0x34, 1))[0]
        while cap:
            cap_id, nxt = await client.region_read(CONFIG, cap, 2)
            if cap_id == 0x11:  # MSI-X
                break
            cap = nxt
        assert cap, "no MSI-X capability"
        await client.region_write(CONFIG, cap + 2, (0x8000).to_bytes(2, "little"))
        with make_eventfd() as efd:
            await client.set_irq_eventfds(IrqIndex.MSIX, 0, [efd])
            await client.region_write(0, 0x00, (0x100000).to_bytes(8, "little"))
            await client.region_write(0, 0x08, (0x108000).to_bytes(8, "little"))
            await client.region_write(0, 0x10, (16).to_bytes(4, "little"))
            await client.region_write(0, 0x14, (1).to_bytes(4, "little"))
            assert await wait_eventfd(efd, timeout=5) == 1
        assert client.memory.read(0x108000, 16) == b"copy me please!!"


async def test_serve_copyengine_from_its_file(tmp_path: Path) -> None:
    path = str(tmp_path / "ce.sock")
    async with cli("serve", "./examples/copyengine.py:CopyEngine", "--socket-path", path) as srv:
        assert await srv.readline() == f"READY {path}"
        await _copy_through(path)
        assert await srv.terminate() == 0


async def test_config_model_key_takes_a_file(tmp_path: Path) -> None:
    path = str(tmp_path / "ce.sock")
    config = tmp_path / "ce.toml"
    config.write_text(
        f'[[device]]\nname = "ce"\nmodel = "{REPO}/examples/copyengine.py:CopyEngine"\n'
        f'socket = "{path}"\n'
    )
    async with cli("serve", "--config", str(config)) as srv:
        assert await srv.readline() == f"READY {path}"
        await _copy_through(path)
        assert await srv.terminate() == 0


async def test_a_model_file_with_an_error_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "mydev.py"
    bad.write_text("from devices.sdk import PciDevice\n\nclass Broken(PciDevice:\n    pass\n")
    res = await run_cli("serve", f"{bad}:Broken", "--socket-path", str(tmp_path / "s.sock"))
    assert res.returncode == 2
    assert_clean_error(res.stderr, f"{bad}: cannot import: SyntaxError", "(line 3)")
    assert res.stderr.decode().count("\n") == 1
    assert not (tmp_path / "s.sock").exists()
