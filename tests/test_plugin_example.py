"""The README's pytest-plugin example: a real guest drives examples/copyengine.py.

The guest (busybox) finds the device, binds uio_pci_generic (INTx), writes a source buffer
into the page the kernel command line reserves for DMA, programs SRC/DST/LEN/CTRL through
BAR0 with devmem, and reads back the copy and the interrupt count.
"""

from pathlib import Path

import pytest

from vfiouser_srv.pytest_plugin import GuestRunner

pytestmark = pytest.mark.qemu


@pytest.fixture
def vfu_model() -> str:
    return f"{Path(__file__).parents[1] / 'examples' / 'copyengine.py'}:CopyEngine"


def test_copy_engine_in_a_guest(vfu_guest: GuestRunner) -> None:
    run = vfu_guest.run([
        "vfu_find 0x1234 0xc0de && uio_bind",              # sets DEV and BAR0; INTx via uio
        "devmem $DMA_PAGE 64 0x21656d2079706f63",          # source: "copy me!"
        "bar_wr 0x00 $DMA_PAGE 64",                        # SRC
        "bar_wr 0x08 $((DMA_PAGE + 0x1000)) 64",           # DST
        "bar_wr 0x10 8",                                   # LEN
        "bar_wr 0x14 1",                                   # CTRL.GO
        "wait_irq",                                        # prints the interrupt count
        "devmem $((DMA_PAGE + 0x1000)) 64",                # the copy
    ])
    assert run.ok, run.describe()
    assert int(run[6].output) >= 1, run.describe()
    assert run[7].output == "0x21656D2079706F63", run.describe()
