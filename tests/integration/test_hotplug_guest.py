"""QEMU hot-plug end to end (docs/operations.md, "Hot-plug with QEMU"), one boot.

The guest starts with no vfio-user device, a free PCIe root port (`hp0`) and a QMP socket.
Each round: `device-add` on our control socket, QMP `device_add vfio-user-pci` on `hp0`; the
guest's pciehp sees the card (for nvme: the driver binds, a pattern is written and read
back). Then `device-del` on our side: the server signals REQ; QEMU acts on it only if it
wired a REQ eventfd (`query-sessions` shows it; QEMU 11.1's vfio-user-pci does not), so the
test issues QMP `device_del` unless DEVICE_DELETED came by itself. The guest ejects the
function, the session ends, our socket is gone, and the next round adds a device again.

Rounds: edu; nvme with `interrupts=msi`; the same nvme again (the re-add); last, nvme with
its default MSI-X. QEMU 11.1's vfio-user-pci aborts in `memory_region_del_subregion` when it
finalizes any ejected function that has MSI-X (its instance_finalize deletes the PBA
overlay from a BAR container that unrealize already dropped; not our layout: every MSI-X
device, whatever the server), so the MSI-X round goes last and its unplug is reported as an
expected failure when QEMU dies with exactly that assertion; with a fixed QEMU it must pass.

Skip/fail policy: as for every ``qemu`` test (see conftest).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio

from vfiouser_srv.qemu import ConfigFile
from vfiouser_srv.qemu.launcher import new_run_dir, run_guest, serve_device
from vfiouser_srv.qemu.qmp import QmpClient, open_qmp

pytestmark = [pytest.mark.qemu, pytest.mark.usefixtures("qemu_ready")]

MIB = 1 << 20
#: seconds to wait for QEMU to unplug on our REQ alone (when it wired a REQ eventfd)
REQ_GRACE = 20.0
#: (model, device name, options) per round; the third is the re-add of the second; the MSI-X
#: nvme goes last because QEMU 11.1 dies when it is ejected (module docstring)
MSI_NVME = {"size": "16M", "interrupts": "msi"}
ROUNDS: list[tuple[str, str, dict[str, str]]] = [
    ("edu", "hp-edu", {}),
    ("nvme", "hp-nvme", MSI_NVME),
    ("nvme", "hp-nvme", MSI_NVME),
    ("nvme", "hp-nvme", {"size": "16M"}),
]
BDF = "0000:01:00.0"  # the only device behind hp0, the only bridge of config `none`
QEMU_UNPLUG_ABORT = "memory_region_del_subregion: Assertion"

GUEST = r"""#!/bin/sh
# test_hotplug_guest.py's guest: per round, wait for the hot-plugged function, use it, wait
# for its removal.
res() { echo "RESULT $1=$2"; }
wait_for() {  # wait_for CONDITION TENTHS
    i=0
    while ! eval "$1" && [ $i -lt "$2" ]; do usleep 100000; i=$((i + 1)); done
    eval "$1"
}
F=/sys/bus/pci/devices/""" + BDF + r"""
yes "vfiouser hotplug pattern" | head -c 1048576 > /tmp/pat
res slots "$(ls /sys/bus/pci/slots 2>/dev/null | tr '\n' ' ')"
n=0
for model in $(echo "$vfu_rounds" | tr ',' ' '); do
    n=$((n + 1))
    echo "STAGE plug$n"
    wait_for '[ -e $F ]' 1800 || { res plug$n FAIL; exit 1; }
    res class$n "$(cat $F/class)"
    if [ "$model" = nvme ]; then
        # the controller may come back under a new instance number after a re-add
        wait_for 'ls /dev/nvme*n1 >/dev/null 2>&1' 600 || { res disk$n FAIL; exit 1; }
        D=$(ls /dev/nvme*n1 | head -1)
        res driver$n "$(basename "$(readlink $F/driver)")"
        res irq$n "$(ls $F/msi_irqs 2>/dev/null | wc -l)"
        dd if=/tmp/pat of=$D bs=1048576 count=1 oflag=direct 2>/dev/null || res write$n FAIL
        res readback$n "$(dd if=$D bs=1048576 count=1 iflag=direct 2>/dev/null |
                          md5sum | cut -d' ' -f1)"
    fi
    dmesg | grep -iE 'pciehp' | tail -3 | sed 's/^/INFO dmesg: /'
    echo "STAGE unplug$n"
    if wait_for '[ ! -e $F ]' 1800; then res removed$n yes; else res removed$n FAIL; fi
done
"""


def wipe(img: Path) -> None:
    with img.open("r+b") as f:
        f.write(bytes(MIB))


def pattern() -> bytes:
    line = b"vfiouser hotplug pattern\n"
    return (line * (MIB // len(line) + 1))[:MIB]


class Stages:
    """`STAGE name` console lines as trio events."""

    def __init__(self) -> None:
        self.seen: dict[str, trio.Event] = {}
        self.console: list[str] = []

    def event(self, name: str) -> trio.Event:
        return self.seen.setdefault(name, trio.Event())

    def on_line(self, line: str) -> None:
        self.console.append(line)
        if line.startswith("STAGE "):
            self.event(line.split()[1]).set()


async def control(path: Path, command: str, **args: Any) -> Any:
    """One command on a fresh connection to our control socket."""
    async with open_qmp(path, capabilities=False) as ctl:
        return await ctl.execute(command, **args)


async def unplug(ctl_path: Path, qmp: QmpClient, name: str, sock: Path,
                 note: dict[str, Any]) -> None:
    """`device-del` on our side; QMP `device_del` unless QEMU acts on REQ by itself."""
    [session] = [s for s in await control(ctl_path, "query-sessions") if s["device"] == name]
    note["irq_eventfds"] = session["irq_eventfds"]
    since = len(qmp.events)
    reply: dict[str, Any] = {}
    t0 = trio.current_time()

    async def device_del() -> None:
        reply.update(await control(ctl_path, "device-del", device=name, interval=1.0,
                                   deadline=90.0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(device_del)
        note["req_unplug"] = False
        if session["irq_eventfds"].get("REQ"):  # QEMU could act on REQ: give it the chance
            with trio.move_on_after(REQ_GRACE):
                await qmp.wait_event("DEVICE_DELETED", since=since, match={"device": "vfu0"})
                note["req_unplug"] = True
        try:
            if not note["req_unplug"]:
                await qmp.execute("device_del", id="vfu0")
                with trio.fail_after(60):
                    await qmp.wait_event("DEVICE_DELETED", since=since,
                                         match={"device": "vfu0"})
        except EOFError:
            note["qemu_gone"] = True  # QEMU died: the session ends with its socket all the same
        note["unplug_seconds"] = round(trio.current_time() - t0, 1)
    note["requests"] = reply.get("requests")
    assert "error" not in reply, reply
    assert not sock.exists(), "the device socket outlived device-del"
    assert name not in [d["name"] for d in await control(ctl_path, "query-devices")]


async def test_hot_plug_use_unplug_and_re_add(qemu_configs: ConfigFile) -> None:
    run_dir = await new_run_dir("hotplug")
    short = Path(tempfile.mkdtemp(prefix="vfu-hp-"))
    ctl_path, qmp_path, edu_sock = short / "ctl.sock", short / "qmp.sock", short / "edu.sock"
    img = run_dir / "disk.img"
    with img.open("wb") as f:
        f.truncate(16 * MIB)
    stages = Stages()
    notes: list[dict[str, Any]] = []

    async def host_side() -> None:
        async with open_qmp(qmp_path) as qmp:
            for k, (model, name, options) in enumerate(ROUNDS, 1):
                note: dict[str, Any] = {"model": model}
                notes.append(note)
                sock = short / f"{name}.sock"
                if model == "nvme":
                    options = {**options, "backing": str(img)}
                    await trio.to_thread.run_sync(wipe, img)  # each round writes it anew
                await stages.event(f"plug{k}").wait()
                dev = await control(ctl_path, "device-add", model=model, name=name,
                                    socket=str(sock), options=options)
                assert dev["name"] == name and sock.exists()
                await qmp.execute("device_add", driver="vfio-user-pci", id="vfu0", bus="hp0",
                                  socket={"type": "unix", "path": str(sock)})
                await stages.event(f"unplug{k}").wait()
                await unplug(ctl_path, qmp, name, sock, note)

    try:
        # The server starts with a placeholder edu (a config needs a device); the devices
        # under test come and go through the control socket.
        async with serve_device("edu", edu_sock, run_dir=run_dir,
                                extra_args=["--control", str(ctl_path)]) as server:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(host_side)
                res = await run_guest(
                    "none", configs=qemu_configs, run_dir=run_dir, test=GUEST.encode(),
                    guest_env={"rounds": ",".join(m for m, _, _ in ROUNDS)}, root_ports=1,
                    qmp_socket=qmp_path, on_line=stages.on_line, timeout=300)
                with trio.move_on_after(30):  # the last device-del may still finish
                    while len(notes) < len(ROUNDS) or "requests" not in notes[-1]:
                        await trio.sleep(0.1)
                nursery.cancel_scope.cancel()
            assert server.running, "our server died"
            await server.stop()
    finally:
        shutil.rmtree(short, ignore_errors=True)
    stderr = await trio.to_thread.run_sync(res.stderr_path.read_text)
    tail = "\n".join(res.console[-40:])
    info = f"{res.summary()}\nnotes: {notes}\nqemu stderr: {stderr}\n--- console ---\n{tail}"
    print(info)
    got = res.result_dict
    assert len(notes) == len(ROUNDS) and all("requests" in n for n in notes), info
    for k, (model, _, _) in enumerate(ROUNDS, 1):
        assert got.get(f"class{k}") == ("0x010802" if model == "nvme" else "0x00ff00"), info
    want = hashlib.md5(pattern()).hexdigest()
    for k, (model, _, options) in enumerate(ROUNDS, 1):
        if model == "nvme":
            assert got.get(f"driver{k}") == "nvme" and got.get(f"readback{k}") == want, info
            if options.get("interrupts") == "msi":  # one MSI vector: the MSI variant is live
                assert got.get(f"irq{k}") == "1", info
    assert (await trio.to_thread.run_sync(img.read_bytes))[:MIB] == pattern()
    clean = len(ROUNDS) - 1  # every round before the MSI-X nvme ejects without QEMU dying
    for k in range(1, clean + 1):
        assert got.get(f"removed{k}") == "yes", info
        assert not notes[k - 1].get("qemu_gone"), info
    if notes[-1].get("qemu_gone") and QEMU_UNPLUG_ABORT in stderr:
        pytest.xfail("QEMU 11.1 aborts when the guest ejects an MSI-X vfio-user-pci device "
                     f"({QEMU_UNPLUG_ABORT} ...); every other round, the MSI nvme re-add "
                     "included, ejected cleanly")
    assert res.ok and got.get(f"removed{len(ROUNDS)}") == "yes", info
