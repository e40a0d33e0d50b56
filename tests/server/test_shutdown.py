"""SIGTERM while a client is connected: the server must still exit promptly and cleanly.

Regression: the device task group did not signal that it had stopped when an outer
cancellation (shutdown) ended it, so the session's shielded detach waited forever and the
launcher had to SIGKILL the server after every QEMU run.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from tests.engines.params import ENGINE_PARAMS
from vfiouser_srv.client import make_eventfd, open_client


@pytest.mark.parametrize("engine", ENGINE_PARAMS)
async def test_sigterm_with_connected_client_exits_promptly(tmp_path: Path, engine: str) -> None:
    sock = tmp_path / "edu.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vfiouser_srv", "serve", "edu", "--socket-path", str(sock),
         "--engine", engine],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await trio.to_thread.run_sync(proc.stdout.readline)
        assert line.decode().strip() == f"READY {sock}"
        async with open_client(str(sock)) as client:
            await client.memory.add_ram(0, 1 << 20, shared=True)
            with make_eventfd() as efd:
                await client.set_irq_eventfds(0, 0, [efd])
                assert await client.region_read(0, 0, 4) == (0x010000ED).to_bytes(4, "little")
                start = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                rc = await trio.to_thread.run_sync(proc.wait, 10)
                assert rc == 0
                assert time.monotonic() - start < 3
                # The server closed our connection on its way out.
                await client.wait_disconnected()
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
