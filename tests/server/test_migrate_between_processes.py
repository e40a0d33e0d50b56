"""Migration between two `vfiouser-srv serve` processes, driven by our client.

tests/server/test_migrate_between_servers.py runs the same scenarios with two servers in the
test's own process (where a test can reach into them); here each side is a real server
process, as a VMM would see them: nothing is shared but the disk image and what travels in
the migration stream.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.server.test_cli import cli
from vfiouser_srv.client import open_client

from .test_migrate_between_servers import migrate_edu_mid_dma, migrate_nvme_with_queued_io


@pytest.mark.parametrize("shared", [True, False], ids=["mmap", "messages"])
async def test_edu_migrates_between_processes(tmp_path: Path, shared: bool) -> None:
    src, dst = str(tmp_path / "src.sock"), str(tmp_path / "dst.sock")
    async with cli("serve", "edu", "--socket-path", src) as a_srv, cli(
        "serve", "edu", "--socket-path", dst
    ) as b_srv:
        assert await a_srv.readline() == f"READY {src}"
        assert await b_srv.readline() == f"READY {dst}"
        async with open_client(src) as a, open_client(dst) as b:
            await migrate_edu_mid_dma(a, b, shared)
        assert await a_srv.terminate() == 0
        assert await b_srv.terminate() == 0


@pytest.mark.parametrize("shared", [True, False], ids=["mmap", "messages"])
async def test_nvme_migrates_between_processes(tmp_path: Path, shared: bool) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4 << 20))
    src, dst = str(tmp_path / "src.sock"), str(tmp_path / "dst.sock")
    opts = f"backing={disk}"
    async with cli("serve", "nvme", "--socket-path", src, "--set", opts) as a_srv, cli(
        "serve", "nvme", "--socket-path", dst, "--set", opts
    ) as b_srv:
        assert await a_srv.readline() == f"READY {src}"
        assert await b_srv.readline() == f"READY {dst}"
        async with open_client(src) as a, open_client(dst) as b:
            await migrate_nvme_with_queued_io(a, b, shared)
        assert await a_srv.terminate() == 0
        assert await b_srv.terminate() == 0
